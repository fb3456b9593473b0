"""Discovery: orders placed at a collection point, found in the LIS by the patient's phone.

- ``phones``: free-text phone fields → E.164 (``phonenumbers``).
- ``matching``: the policy, a pure function: attach an order to one site user, or review.
- ``job``: who is asked about this run, the LIS calls, the inserts (``DiscoveryJob``).
- ``review``: the list of orders a person must attach by hand (``labsync review``).

docs/discovery.md says what the policy does and why. The ``[discovery]`` table is read by
``labsync.config.discovery``.
"""
