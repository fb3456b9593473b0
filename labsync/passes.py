"""What one pass did, and the problems it reports once for the whole pass.

``PassSummary`` is the pass's tally (``pass.finished``, ``labsync_passes``, the metrics).
``PassProblems`` collects what is a problem of the host or of the LIS rather than of one
order (a PDF folder refusing writes, the LIS refusing the key or not answering) and writes
one admin-log line for each at the pass's end, instead of one per order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.breaker import AUTH
from labsync.errors import StoreError
from labsync.execute import Applied
from labsync.store import bitrix
from labsync.store.db import TextFitter
from labsync.store.tx import run_tx

log = structlog.get_logger("labsync.sync")


@dataclass
class PassSummary:
    """What one pass did. ``pending``: still waiting in the LIS; ``failed``: will be retried."""

    pass_id: int | None = None
    checked: int = 0
    completed: int = 0
    cancelled: int = 0
    pending: int = 0
    corrected: int = 0
    rechecked: int = 0  # completed orders asked again for corrections, none found
    failed: int = 0
    skipped: int = 0
    events: int = 0
    duration_s: float = 0.0
    outcome: str = "ok"  # ok | lis_auth | lis_unreachable | interrupted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def count(self, applied: Applied) -> None:
        self.events += applied.events
        if applied.outcome == "skipped":
            self.skipped += 1
            return
        self.checked += 1
        setattr(self, applied.outcome, getattr(self, applied.outcome) + 1)


class PassProblems:
    """The pass's problems that are not one order's, each told to the admin log once."""

    def __init__(self, engine: Engine, fitter: TextFitter, *, site_id: str, pdf_dir: Path,
                 site_time: Callable[[], datetime]) -> None:
        self.engine = engine
        self.fitter = fitter
        self.site_id = site_id
        self.pdf_dir = pdf_dir
        self.site_time = site_time
        self.disk_held: dict[str, list[str]] = {}  # PDF folder problem → the orders it held

    def new_pass(self) -> None:
        self.disk_held = {}

    def disk(self, reason: str, external_id: str) -> None:
        self.disk_held.setdefault(reason, []).append(external_id)

    def report_disk(self) -> None:
        """One admin-log line per PDF folder problem of the pass, with the orders it held."""
        for reason, held in self.disk_held.items():
            shown = ", ".join(held[:10]) + (f" and {len(held) - 10} more" if len(held) > 10
                                             else "")
            log.error("pdf.folder_refused", reason=reason, orders=len(held))
            self._admin_log(
                f"The PDF folder {self.pdf_dir} refused writes ({reason}): {len(held)} "
                f"completed order(s) held back this pass ({shown}); they are retried on the "
                "next pass. Check the disk and pdf.dir.", "pdf.folder_problem_not_recorded")

    def report_halt(self, reason: str) -> None:
        """Why the pass stopped asking the LIS (``labsync.breaker``)."""
        if reason == AUTH:
            message = ("the LIS refused labsync's API key (HTTP 401/403); no orders were "
                       "asked about for the rest of this pass: check lis.api_key")
        else:
            message = ("the LIS did not answer (every request failed, retries included); "
                       "the rest of this pass's orders were left for the next pass: check "
                       "lis.base_url and the LIS")
        self._admin_log(message, "lis.halt_not_recorded")

    def order_note(self, external_id: str, message: str) -> None:
        """One order's problem that does not fail it (a PDF refused while the order may go
        on without one): told to the admin log once, however often it is seen again."""
        def once(conn: Any) -> None:
            if not bitrix.has_event_log(conn, self.fitter, item_id=external_id,
                                        description=message):
                bitrix.add_event_log(conn, self.fitter, item_id=external_id,
                                     description=message, now_site=self.site_time(),
                                     site_id=self.site_id)
        try:
            run_tx(self.engine, once)
        except (StoreError, SQLAlchemyError) as exc:
            log.error("order.note_not_recorded", error=str(exc))

    def _admin_log(self, message: str, failed_event: str) -> None:
        try:
            run_tx(self.engine, partial(
                bitrix.add_event_log, fitter=self.fitter, item_id="labsync",
                description=message, now_site=self.site_time(), site_id=self.site_id,
                severity="ERROR"))
        except (StoreError, SQLAlchemyError) as exc:
            log.error(failed_event, error=str(exc))
