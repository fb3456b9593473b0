"""The reports this process has handed out in the feed lately, so that a read that re-reads
its ``overlap`` does not hand the same versions out again.

Each read from a cursor at rest searches ``_lastUpdated=gt{cursor − overlap}``: it must, to
catch a report the server committed late with an earlier time, but it also finds every
report of the last ``overlap`` again. Handing those out again is harmless (the engine
skips a version it has applied) but not free, and with results arriving steadily it is
most of what a quiet read returns. So each page's reports are remembered, and passed over
when they come again at the same ``versionId`` and ``lastUpdated``.

Only once the engine has applied the page: a page counts as applied when the next read
starts from the cursor that page gave (the engine stores the cursor in the transaction
that applies the page, and reads on from it only after that). A page whose transaction
failed is read again from the older cursor, and everything on it is handed out again.
Memory is all this is: a restart hands the overlap out once more.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

Entry = tuple[str, str | None, datetime]  # (report id, versionId, lastUpdated to the ms)


class RecentReports:
    """Reports handed out within ``keep`` of the newest, by id; thread-safe."""

    def __init__(self, keep: timedelta) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._applied: dict[str, tuple[str | None, datetime]] = {}
        self._pending: tuple[str | None, list[Entry]] = (None, [])

    def reading_from(self, cursor: str | None) -> None:
        """A read starts at ``cursor``: the page that gave it was applied, if it was ours."""
        with self._lock:
            given, entries = self._pending
            self._pending = (None, [])
            if cursor is not None and cursor == given:
                for rid, version, at in entries:
                    self._applied[rid] = (version, at)

    def applied(self, rid: str, version: str | None, at: datetime) -> bool:
        """Whether this report, at this version and time, is on a page already applied."""
        with self._lock:
            return self._applied.get(rid) == (version, at)

    def handed_out(self, cursor: str | None, entries: list[Entry], newest: datetime) -> None:
        """The reports of the page that gives ``cursor``; and forget what the overlap can no
        longer reach."""
        with self._lock:
            self._pending = (cursor, entries)
            horizon = newest - self._keep
            for rid in [r for r, (_v, at) in self._applied.items() if at < horizon]:
                del self._applied[rid]
