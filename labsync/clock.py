"""labsync's one clock: naive UTC, as labsync's own DATETIME columns hold it.

Everything that needs "now" takes a ``now`` callable defaulting to ``utc_now``, so a test
controls time by passing its own.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Now in UTC, without a time zone (labsync's columns are naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)
