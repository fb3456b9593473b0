"""The site's side of the FHIR change-feed benchmark: its pending orders, when each completed
order's rows appeared, and whether every one was written exactly once.

``Watcher`` polls ``local_lab_orders`` every ``every`` seconds for the orders the lab has
completed and the site has not yet shown completed. An order's status and its result rows
are written in one transaction, so the status is the row's arrival. A delivery is dated at
the start of the first query that saw it: the commit came after the previous query began
and before this one did, so the delay measured is an upper bound, ``every`` (plus a query)
at most above the truth.
"""

from __future__ import annotations

import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, text
from sqlalchemy.exc import SQLAlchemyError

from bench.polling_sim import percentile


def seed_site(engine: Engine, ids: list[str], *, order_date: date | None = None) -> None:
    """Exactly these orders on the site, all pending (``received``), four per user."""
    users = max(1, (len(ids) + 3) // 4)
    day = order_date or date.today()
    with engine.begin() as conn:
        for table in ("local_lab_results", "local_lab_orders", "b_user"):
            conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text(
            "INSERT INTO b_user (ID, LOGIN, ACTIVE, NAME, LAST_NAME, EMAIL, DATE_REGISTER) "
            "VALUES (:id, :login, 'Y', 'Анна', 'Иванова', :email, '2025-01-01')"),
            [{"id": u, "login": f"user{u}", "email": f"patient{u}@example.org"}
             for u in range(1, users + 1)])
        rows = [{"id": i + 1, "ext": ext, "user": i % users + 1, "day": day}
                for i, ext in enumerate(ids)]
        for start in range(0, len(rows), 10_000):
            conn.execute(text(
                "INSERT INTO local_lab_orders (ID, USER_ID, EXTERNAL_ORDER_ID, ORDER_DATE, STATUS)"
                " VALUES (:id, :user, :ext, :day, 'received')"), rows[start:start + 10_000])


class Watcher(threading.Thread):
    """When each order the lab completed first showed as completed in the site's table."""

    CHUNK = 1000

    def __init__(self, engine: Engine, every: float = 0.2) -> None:
        super().__init__(name="bench-fhir-watcher", daemon=True)
        self.engine, self.every = engine, every
        self.changed: dict[str, float] = {}  # external id → monotonic time of the LIS change
        self.seen: dict[str, float] = {}  # external id → monotonic time it was first seen
        self.queries = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._query = text("SELECT EXTERNAL_ORDER_ID FROM local_lab_orders WHERE STATUS = "
                           "'completed' AND EXTERNAL_ORDER_ID IN :ids").bindparams(
            bindparam("ids", expanding=True))

    def expect(self, external_id: str, changed: float) -> None:
        with self._lock:
            self.changed[external_id] = changed

    def outstanding(self) -> list[str]:
        with self._lock:
            return [e for e in self.changed if e not in self.seen]

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            waiting = self.outstanding()
            try:
                found = self._completed(waiting) if waiting else []
            except SQLAlchemyError:  # a server hiccup: the next round sees it; counted
                self.errors += 1
                found = []
            with self._lock:
                for external_id in found:
                    self.seen.setdefault(external_id, started)
            self._halt.wait(max(0.0, self.every - (time.monotonic() - started)))

    def _completed(self, waiting: list[str]) -> list[str]:
        found: list[str] = []
        with self.engine.connect() as conn:
            for start in range(0, len(waiting), self.CHUNK):
                found += conn.execute(self._query, {"ids": waiting[start:start + self.CHUNK]}
                                      ).scalars().all()
                self.queries += 1
        return found

    def wait_all(self, timeout: float) -> bool:
        """Until every change expected was seen, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.outstanding():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.every, 0.1))
        return True

    def close(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def delays(self) -> list[float]:
        with self._lock:
            return [self.seen[e] - t for e, t in self.changed.items() if e in self.seen]

    def summary(self) -> dict[str, Any]:
        delays = self.delays()
        return {"completed_in_lis": len(self.changed), "delivered": len(delays),
                "not_delivered": len(self.changed) - len(delays),
                "delay_median_s": _round(percentile(delays, 0.5)),
                "delay_p95_s": _round(percentile(delays, 0.95)),
                "delay_max_s": _round(max(delays, default=None)),
                "delay_min_s": _round(min(delays, default=None)),
                "watch_every_s": self.every, "watch_errors": self.errors}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def verify(engine: Engine, pdf_dir: Path, *, completed: list[str], results: int
           ) -> dict[str, Any]:
    """Whether the site holds exactly what the lab completed, each once: these orders
    completed and no other, ``results`` rows each without a duplicate, one ready mail each,
    no correction mail, one PDF each."""
    queries = {
        "completed": "SELECT COUNT(*) FROM local_lab_orders WHERE STATUS = 'completed'",
        "ready_mails": "SELECT COUNT(*) FROM b_event WHERE EVENT_NAME = 'LAB_RESULTS_READY'",
        "other_mails": "SELECT COUNT(*) FROM b_event WHERE EVENT_NAME <> 'LAB_RESULTS_READY'",
        "result_rows": "SELECT COUNT(*) FROM local_lab_results",
        "orders_with_wrong_row_count": "SELECT COUNT(*) FROM (SELECT ORDER_ID FROM "
            "local_lab_results GROUP BY ORDER_ID HAVING COUNT(*) <> :k) AS w",
        "duplicate_results": "SELECT COUNT(*) FROM (SELECT 1 FROM local_lab_results"
                             " GROUP BY ORDER_ID, TEST_CODE HAVING COUNT(*) > 1) AS d",
        "event_log_rows": "SELECT COUNT(*) FROM b_event_log",
    }
    with engine.connect() as conn:
        found: dict[str, Any] = {k: int(conn.execute(text(q), {"k": results}).scalar() or 0)
                                 for k, q in queries.items()}
        if completed:
            done = set(conn.execute(text(
                "SELECT EXTERNAL_ORDER_ID FROM local_lab_orders WHERE STATUS = 'completed'")
            ).scalars())
            found["completed_not_in_lis"] = len(done - set(completed))
            found["completed_in_lis_missing"] = len(set(completed) - done)
        else:
            found["completed_not_in_lis"] = found["completed"]
            found["completed_in_lis_missing"] = 0
    files = [p for p in pdf_dir.rglob("*.pdf") if not p.name.startswith(".")] \
        if pdf_dir.exists() else []
    found["pdf_files"] = len(files)
    expected = len(completed)
    found["expected"] = expected
    found["exactly_once"] = (
        found["completed"] == found["ready_mails"] == found["pdf_files"] == expected
        and found["result_rows"] == expected * results
        and found["completed_not_in_lis"] == found["completed_in_lis_missing"] == 0
        and found["orders_with_wrong_row_count"] == found["duplicate_results"] == 0
        and found["other_mails"] == 0)
    return found
