"""The fault queue the fake servers share: spoil the next N matching requests, first in first.

``fake_qlab.FakeQlab``, ``fake_fhir.FakeFhir`` and ``lims_server.LimsServer`` queue faults
by endpoint and key (an order's external id; for FHIR an identifier or a resource id) and
count their logged requests the same way. Each server still checks its own endpoint names
and arguments before it adds: the queue takes what it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["ANY_ENDPOINT", "FaultQueue", "count_requests"]

ANY_ENDPOINT = "*"

F = TypeVar("F")


@dataclass
class _Injection(Generic[F]):
    endpoint: str
    key: str | None
    fault: F
    remaining: int | None


class FaultQueue(Generic[F]):
    """Faults waiting for their requests. Thread-safe: tests add while handlers take.

    An injection matches a request when its endpoint is ``"*"`` or the request's and its key
    is None or the request's; ``take`` hands out the first match in the order they were added.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._injections: list[_Injection[F]] = []

    def add(self, endpoint: str, key: str | None, fault: F, times: int | None = 1) -> None:
        """Queue ``fault`` for the next ``times`` matching requests (None: every one)."""
        with self._lock:
            self._injections.append(_Injection(endpoint, key, fault, times))

    def clear(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._injections.clear()

    def take(self, endpoint: str, key: str | None) -> F | None:
        """The first fault matching this request, counted down; None when none matches."""
        with self._lock:
            for index, injection in enumerate(self._injections):
                if injection.endpoint in (ANY_ENDPOINT, endpoint) and injection.key in (None, key):
                    if injection.remaining is not None:
                        injection.remaining -= 1
                        if injection.remaining == 0:
                            del self._injections[index]
                    return injection.fault
        return None


def count_requests(
    seen: Iterable[tuple[str, str | None]], endpoint: str | None = None, key: str | None = None
) -> int:
    """How many ``(endpoint, key)`` pairs of ``seen`` match; a None filter matches any."""
    return sum(1 for ep, k in seen if endpoint in (None, ep) and key in (None, k))
