"""One sync pass: ask the LIS about every pending order and bring the site up to date.

Per order, in two steps:

1. *observe* (worker threads, at most ``lis.max_concurrency`` at once): ask the LIS for the
   order's status and results; for a completed order, stage its PDF in a temporary file.
   No database work happens here.
2. *apply* (the pass's own thread, one order at a time): in ONE database transaction, lock
   the order's row, check it is still pending and still the same user's, move the staged
   PDF into place, write the result rows, the status, ``SYNCED_AT``, the mail event and
   labsync's bookkeeping, then commit.

Nothing reaches the database before the PDF is safe on disk, so a failed PDF download leaves
the order exactly as it was (the brief's PHP agent inserts the results and then fails, and
inserts them again next time). A crash before the commit leaves the old state; after it,
the new one. Every failure stays with its order: logged, written to ``b_event_log``, retried
on a later pass.
"""

from __future__ import annotations

import contextvars
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.config import Config
from labsync.errors import LabsyncError, LisAuthError, StoreError
from labsync.lis.base import LisClient
from labsync.model import LisOrder, OrderStatus
from labsync.notify import BitrixNotifier
from labsync.pdfs import PdfStore, StagedPdf, is_safe_name
from labsync.results import results_hash, to_rows
from labsync.store import bitrix, orders
from labsync.store.db import TextFitter, classify_db_error, describe_db_error

log = structlog.get_logger("labsync.sync")

MAX_BACKOFF = 6 * 3600.0
TX_ATTEMPTS = 3


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def failure_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds before a failing order is asked again: 1 min, 2, 4… up to 6 h, ±20 % jitter."""
    base = min(60.0 * 2 ** max(failures - 1, 0), MAX_BACKOFF)
    return base * (rng or random).uniform(0.8, 1.2)


@dataclass
class PassSummary:
    """What one pass did. ``pending``: still waiting in the LIS; ``failed``: will be retried."""

    pass_id: int | None = None
    checked: int = 0
    completed: int = 0
    cancelled: int = 0
    pending: int = 0
    failed: int = 0
    skipped: int = 0
    events: int = 0
    duration_s: float = 0.0
    outcome: str = "ok"  # ok | lis_auth | interrupted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Observation:
    """What a worker learned about one order: the LIS's answer and a staged PDF, or an error."""

    order: orders.PendingOrder
    lis_order: LisOrder | None = None
    pdf: StagedPdf | None = None
    error: LabsyncError | None = None
    skipped: bool = False


@dataclass
class _Applied:
    outcome: str  # completed | cancelled | pending | skipped
    events: int = 0
    notes: list[str] = field(default_factory=list)


class SyncEngine:
    """Runs passes over the pending orders; ``sync-once`` and the scheduler call ``run_pass``."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        lis: LisClient,
        fitter: TextFitter,
        *,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.engine = engine
        self.lis = lis
        self.fitter = fitter
        self.now = now
        self.pdfs = PdfStore(config.pdf.dir, config.pdf.max_bytes)
        self.notifier = BitrixNotifier(config.notify, fitter)
        self._auth_failed = threading.Event()

    # -- the pass ---------------------------------------------------------------------------

    def run_pass(
        self, *, due_only: bool = True, stop: threading.Event | None = None
    ) -> PassSummary:
        """One pass over every pending order that is due.

        Raises ``StoreError`` if the database is unreachable; everything else is confined to
        its order.
        """
        started = time.monotonic()
        summary = PassSummary()
        self._auth_failed.clear()
        swept = self.pdfs.sweep()
        if swept:
            log.info("pdf.temp_swept", files=swept)
        summary.pass_id = self._db(lambda conn: orders.record_pass(conn, {
            "STARTED_AT": self.now(), "HOST": socket.gethostname()[:255], "PID": os.getpid(),
        }))
        log.info("pass.started", pass_id=summary.pass_id)
        workers = max(1, self.config.lis.max_concurrency)
        with ThreadPoolExecutor(workers, thread_name_prefix="labsync-lis") as pool:
            for page in self._pages(due_only):
                if (stop and stop.is_set()) or self._auth_failed.is_set():
                    break
                futures = [pool.submit(contextvars.copy_context().run, self._observe, o)
                           for o in page]
                self._apply_all(futures, summary, stop)
        if self._auth_failed.is_set():
            summary.outcome = "lis_auth"
            self._report_auth_failure()
        elif stop and stop.is_set():
            summary.outcome = "interrupted"
        summary.duration_s = round(time.monotonic() - started, 3)
        self._db(lambda conn: orders.finish_pass(conn, summary.pass_id or 0, {
            "FINISHED_AT": self.now(), "CHECKED": summary.checked,
            "COMPLETED": summary.completed, "CANCELLED": summary.cancelled,
            "PENDING": summary.pending, "FAILED": summary.failed, "EVENTS": summary.events,
            "OUTCOME": summary.outcome, "DURATION_MS": int(summary.duration_s * 1000),
        }))
        log.info("pass.finished", **summary.as_dict())
        return summary

    def _pages(self, due_only: bool) -> Iterator[list[orders.PendingOrder]]:
        after = 0
        size = self.config.sync.page_size
        now = self.now()
        while True:
            page = self._db(lambda conn, after=after: orders.pending_page(
                conn, after_id=after, limit=size, now_utc=now, due_only=due_only))
            if not page:
                return
            yield page
            after = page[-1].id
            if len(page) < size:
                return

    def _apply_all(
        self, futures: list[Future[_Observation]], summary: PassSummary,
        stop: threading.Event | None,
    ) -> None:
        for future in futures:
            if (stop and stop.is_set()) and not future.running() and future.cancel():
                continue
            obs = future.result()
            if obs.skipped or isinstance(obs.error, LisAuthError):
                self.pdfs.discard(obs.pdf)
                summary.skipped += 1
                continue
            summary.checked += 1
            with structlog.contextvars.bound_contextvars(order=obs.order.external_id):
                applied = self._apply(obs)
            summary.events += applied.events
            if applied.outcome == "failed":
                summary.failed += 1
            elif applied.outcome == "completed":
                summary.completed += 1
            elif applied.outcome == "cancelled":
                summary.cancelled += 1
            elif applied.outcome == "pending":
                summary.pending += 1
            else:
                summary.skipped += 1

    # -- step 1: observe (worker threads) ---------------------------------------------------

    def _observe(self, order: orders.PendingOrder) -> _Observation:
        structlog.contextvars.bind_contextvars(order=order.external_id)
        obs = _Observation(order)
        if self._auth_failed.is_set():
            obs.skipped = True
            return obs
        try:
            if not is_safe_name(order.external_id):
                # Checked before asking the LIS: such an id must never become a path.
                self.pdfs.final_path(order.user_id, order.external_id)
            obs.lis_order = self.lis.fetch_order(order.external_id)
            if obs.lis_order.status is OrderStatus.COMPLETED:
                obs.pdf = self.pdfs.stage(order.user_id, order.external_id, self.lis)
        except LisAuthError as exc:
            if not self._auth_failed.is_set():
                self._auth_failed.set()
                log.error("lis.auth_failed", error=str(exc))
            obs.error = exc
        except LabsyncError as exc:
            obs.error = exc
        except Exception as exc:  # a bug must not end the pass for every order
            log.exception("order.internal_error")
            obs.error = LabsyncError(f"internal error: {type(exc).__name__}: {exc}")
        return obs

    # -- step 2: apply (the pass's thread) ----------------------------------------------------

    def _apply(self, obs: _Observation) -> _Applied:
        order = obs.order
        if obs.error is not None:
            self._record_failure(order, obs.error)
            return _Applied("failed")
        assert obs.lis_order is not None
        try:
            applied = self._db(lambda conn: self._apply_in_tx(conn, obs), retry=True)
        except StoreError:
            self.pdfs.discard(obs.pdf)
            raise
        except (LabsyncError, SQLAlchemyError) as exc:
            self.pdfs.discard(obs.pdf)
            error = exc if isinstance(exc, LabsyncError) else StoreError(describe_db_error(exc))
            self._record_failure(order, error)
            return _Applied("failed")
        except Exception as exc:  # a bug must not end the pass for every order
            log.exception("order.internal_error")
            self.pdfs.discard(obs.pdf)
            self._record_failure(order, LabsyncError(f"internal error: {type(exc).__name__}"))
            return _Applied("failed")
        self.pdfs.discard(obs.pdf)  # a no-op once published; cleans up a skipped order's file
        for note in applied.notes:
            log.warning("result.value_fitted", detail=note)
        return applied

    def _apply_in_tx(self, conn: Any, obs: _Observation) -> _Applied:
        order, lis_order = obs.order, obs.lis_order
        assert lis_order is not None
        current = orders.lock_order(conn, order.id)
        if (current is None or current.user_id != order.user_id
                or current.external_id != order.external_id
                or current.status not in (*orders.PENDING, None)):
            log.info("order.changed_meanwhile", status=current and current.status)
            return _Applied("skipped")
        now = self.now()
        now_site = self._site_time(now)
        state = orders.get_state(conn, order.id)
        values: dict[str, Any] = {
            "LAST_POLL_AT": now, "POLLS": (state.POLLS if state else 0) + 1, "FAILURES": 0,
            "NEXT_POLL_AT": None, "LIS_STATUS": lis_order.status.value,
        }
        status = lis_order.status
        applied = _Applied("pending")
        if status is OrderStatus.CANCELLED:
            orders.set_order_status(conn, order.id, "cancelled", now_site)
            applied.outcome = "cancelled"
            log.info("order.cancelled")
        elif status in (OrderStatus.PROCESSING, OrderStatus.COMPLETED):
            pdf_path = None
            if status is OrderStatus.COMPLETED:
                assert obs.pdf is not None
                pdf_path = str(self.pdfs.publish(obs.pdf))
                values.update(PDF_PATH=pdf_path, PDF_SHA256=obs.pdf.sha256,
                              PDF_BYTES=obs.pdf.size, COMPLETED_AT=now)
            rows, notes = to_rows(lis_order.results, zone=self.config.site.timezone,
                                  fitter=self.fitter, pdf_path=pdf_path)
            applied.notes = [f"test {n.test}, {n.column}: {n.change}" for n in notes]
            changes = orders.write_results(conn, order.id, rows)
            values.update(RESULTS_HASH=results_hash(rows), RESULTS_COUNT=len(rows))
            if status is OrderStatus.COMPLETED:
                orders.set_order_status(conn, order.id, "completed", now_site)
                applied.outcome = "completed"
                if state is None or state.NOTIFIED_AT is None:
                    applied.events = self._notify(conn, order, now_site, values)
                log.info("order.completed", results=len(rows), inserted=changes.inserted,
                         updated=changes.updated, deleted=changes.deleted, pdf=pdf_path)
            else:
                if current.status != "processing":
                    orders.set_order_status(conn, order.id, "processing", None)
                log.info("order.processing", results=len(rows), changed=changes.any)
        else:
            log.info("order.received")
        orders.save_state(conn, order, now, values, exists=state is not None)
        return applied

    def _notify(self, conn: Any, order: orders.PendingOrder, now_site: datetime,
                values: dict[str, Any]) -> int:
        decision = self.notifier.order_ready(conn, order_id=order.id,
                                             external_id=order.external_id,
                                             user_id=order.user_id, now_site=now_site)
        values.update(MAIL_STATE=decision.state, MAIL_EVENT_ID=decision.event_id,
                      NOTIFIED_AT=self.now())
        if decision.event_id is None:
            log.warning("mail.skipped", reason=decision.state, user_id=order.user_id)
            return 0
        log.info("mail.queued", event_id=decision.event_id, user_id=order.user_id)
        return 1

    # -- failures -----------------------------------------------------------------------------

    def _record_failure(self, order: orders.PendingOrder, error: LabsyncError) -> None:
        kind = getattr(error, "kind", type(error).__name__)
        message = str(error)[:1000]
        log.warning("order.failed", error_kind=kind, error=message)
        now = self.now()

        def record(conn: Any) -> None:
            state = orders.get_state(conn, order.id)
            failures = (state.FAILURES if state else 0) + 1
            orders.save_state(conn, order, now, {
                "LAST_POLL_AT": now, "POLLS": (state.POLLS if state else 0) + 1,
                "FAILURES": failures,
                "FAILURES_TOTAL": (state.FAILURES_TOTAL if state else 0) + 1,
                "LAST_ERROR_KIND": kind, "LAST_ERROR": message, "LAST_ERROR_AT": now,
                "NEXT_POLL_AT": now + timedelta(seconds=failure_delay(failures)),
            }, exists=state is not None)
            # One admin-log line per new problem, not one every pass while it lasts.
            if state is None or state.LAST_ERROR != message or state.FAILURES == 0:
                bitrix.add_event_log(conn, self.fitter, item_id=order.external_id,
                                     description=f"Order {order.external_id}: {message}",
                                     now_site=self._site_time(now),
                                     site_id=self.config.notify.site_id)

        try:
            self._db(record, retry=True)
        except (StoreError, SQLAlchemyError) as exc:
            log.error("order.failure_not_recorded", error=str(exc))

    def _report_auth_failure(self) -> None:
        message = ("the LIS refused labsync's API key (HTTP 401/403); no orders were asked "
                   "about for the rest of this pass: check lis.api_key")
        try:
            self._db(lambda conn: bitrix.add_event_log(
                conn, self.fitter, item_id="labsync", description=message,
                now_site=self._site_time(self.now()), site_id=self.config.notify.site_id,
                severity="ERROR"))
        except StoreError as exc:
            log.error("lis.auth_failure_not_recorded", error=str(exc))

    # -- plumbing -----------------------------------------------------------------------------

    def _site_time(self, now_utc: datetime) -> datetime:
        return now_utc.replace(tzinfo=UTC).astimezone(self.config.site.timezone).replace(
            tzinfo=None)

    def _db(self, work: Callable[[Any], Any], *, retry: bool = False) -> Any:
        """Run ``work(conn)`` in one transaction; retry it whole after a dropped connection or
        a deadlock; raise ``StoreError`` when the database stays unreachable."""
        attempts = TX_ATTEMPTS if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except SQLAlchemyError as exc:
                kind = classify_db_error(exc)
                if kind != "other" and attempt < attempts:
                    log.warning("db.retry", attempt=attempt, error=describe_db_error(exc))
                    time.sleep(0.2 * attempt)
                    continue
                if kind == "disconnect":
                    raise StoreError(describe_db_error(exc)) from exc
                raise
        raise AssertionError("unreachable")
