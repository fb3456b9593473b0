"""labsync's one clock: naive UTC, as labsync's own DATETIME columns hold it.

Everything that needs "now" takes a ``now`` callable defaulting to ``utc_now``, so a test
controls time by passing its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from labsync.errors import Interrupted


def utc_now() -> datetime:
    """Now in UTC, without a time zone (labsync's columns are naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def site_time(now_utc: datetime, zone: ZoneInfo) -> datetime:
    """UTC (naive) → the site's naive local time, as its DATETIME columns hold it."""
    return now_utc.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)


def utc_naive(moment: datetime) -> datetime:
    """An aware time as naive UTC (a naive one is taken as UTC already)."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def interruptible_sleep(stop: threading.Event) -> Callable[[float], None]:
    """A ``sleep`` for LIS retry waits that a stopping daemon cuts short (``Interrupted``)."""

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise Interrupted("labsync is stopping")

    return sleep
