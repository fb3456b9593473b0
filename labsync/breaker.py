"""One LIS circuit breaker: when asking the LIS more this run is pointless, and why.

The sync pass and discovery both ask the LIS many times a run. Two things end their asking
early: the LIS refused the credentials (every further request would be refused too), or
it failed so many requests in a row, with no answer in between, that it is taken to be
down (the rest would only queue up retries and fill the logs; the work is asked again
next run anyway). ``Breaker`` counts, and tells its caller the one time it trips, for the
caller to say so in its own words; it is safe across worker threads.
"""

from __future__ import annotations

import threading

# After this many transient LIS failures in a row, with no answer in between, the LIS is
# taken to be down for the rest of the run.
UNREACHABLE_AFTER = 10

AUTH = "lis_auth"
UNREACHABLE = "lis_unreachable"


class Breaker:
    """Open (``tripped``) once the LIS refused the key or failed ``limit`` times in a row."""

    def __init__(self, limit: int = UNREACHABLE_AFTER) -> None:
        self.limit = limit
        self.reason = ""  # AUTH | UNREACHABLE once tripped
        self._tripped = threading.Event()
        self._streak = 0
        self._lock = threading.Lock()

    @property
    def tripped(self) -> bool:
        return self._tripped.is_set()

    @property
    def streak(self) -> int:
        return self._streak

    def reset(self) -> None:
        """A new run: closed again, no failures counted."""
        with self._lock:
            self._tripped.clear()
            self.reason, self._streak = "", 0

    def answered(self) -> None:
        """The LIS answered (a 4xx or bad data counts: the LIS is there)."""
        with self._lock:
            self._streak = 0

    def failed(self) -> bool:
        """A transient failure; True if this one tripped the breaker."""
        with self._lock:
            self._streak += 1
            if self._streak < self.limit:
                return False
        return self.trip(UNREACHABLE)

    def refused(self) -> bool:
        """The LIS refused the credentials; True if this tripped the breaker."""
        return self.trip(AUTH)

    def trip(self, reason: str) -> bool:
        """Open the breaker; True the first time, False if it was open already."""
        with self._lock:
            if self._tripped.is_set():
                return False
            self.reason = reason
            self._tripped.set()
        return True
