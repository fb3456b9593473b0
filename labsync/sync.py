"""One sync pass: ask the LIS about every pending order and bring the site up to date.

Per order, in two steps:

1. *observe* (worker threads, at most ``lis.max_concurrency`` at once): ask the LIS for the
   order's status and results; for a completed order, stage its PDF in a temporary file.
   No database work happens here.
2. *apply* (the pass's own thread, one order at a time, ``labsync.apply``): in ONE database
   transaction, lock the order's row, check it is still pending, still the same user's and
   still claimed by this instance, move the staged PDF into place, write the result rows,
   the status, ``SYNCED_AT``, the mail event and labsync's bookkeeping, then commit.

Nothing reaches the database before the PDF is safe on disk, so a failed PDF download leaves
the order exactly as it was (the brief's PHP agent inserts the results and then fails, and
inserts them again next time). A crash before the commit leaves the old state; after it,
the new one. Every failure stays with its order: logged, written to ``b_event_log``, retried
on a later pass.

Orders are read in pages and each page is claimed first (``labsync.store.claims``), so
several instances can share one database without working on the same order. A claim lives
as long as its owner (``labsync.store.liveness``): each pass first takes over the claims of
instances that died, so their orders wait seconds, not ``sync.lease``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.apply import Applied, Completion, OrderApplier
from labsync.config import Config
from labsync.errors import (
    DiskError,
    Interrupted,
    LabsyncError,
    LisAuthError,
    StoreError,
    TransientLisError,
)
from labsync.lis.base import LisClient
from labsync.model import LisOrder, OrderStatus
from labsync.pdfs import PdfStore, StagedPdf, is_safe_name
from labsync.store import bitrix, claims, liveness, orders
from labsync.store.db import TextFitter, describe_db_error
from labsync.store.tx import held_connection, run_tx

log = structlog.get_logger("labsync.sync")

# After this many transient LIS failures in a row (at least twice the concurrency), with no
# answer in between, the LIS is taken to be down: the rest of the pass would only queue
# up retries and fill the logs, and the orders will be asked next pass anyway.
UNREACHABLE_AFTER = 10
# First completions written per transaction (OrderApplier.complete_batch): fewer statements
# per order, and a bad order costs its batch one failed try before each goes alone.
COMPLETION_BATCH = 20


def _describe(exc: BaseException) -> str:
    """A secret-free line about what stopped a batch (the orders alone say more)."""
    if isinstance(exc, SQLAlchemyError):
        return describe_db_error(exc)
    if isinstance(exc, LabsyncError):
        return str(exc)[:300]
    return type(exc).__name__


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


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
    outcome: str = "ok"  # ok | lis_auth | interrupted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def count(self, applied: Applied) -> None:
        self.events += applied.events
        if applied.outcome == "skipped":
            self.skipped += 1
            return
        self.checked += 1
        setattr(self, applied.outcome, getattr(self, applied.outcome) + 1)


@dataclass
class _Observation:
    """What a worker learned about one order: the LIS's answer and a staged PDF, or an error."""

    order: orders.PendingOrder
    lis_order: LisOrder | None = None
    pdf: StagedPdf | None = None
    error: LabsyncError | None = None
    skipped: bool = False


class SyncEngine:
    """Runs passes over the pending orders; ``sync-once`` and the scheduler call ``run_pass``.

    ``progress_at`` (a ``time.monotonic`` value) moves on with every page and every order,
    so a watchdog can tell a long pass from a stuck one.
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        lis: LisClient,
        fitter: TextFitter,
        *,
        now: Callable[[], datetime] = utc_now,
        metrics: Any = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.lis = lis
        self.now = now
        self.metrics = metrics
        self.owner = claims.new_owner()
        self.liveness = liveness.OwnerLock(engine, self.owner)
        self.pdfs = PdfStore(config.pdf.dir, config.pdf.max_bytes)
        self.applier = OrderApplier(config, fitter, self.pdfs, self.owner)
        self.fitter = fitter
        self.progress_at = time.monotonic()
        self.busy = False
        # Set when asking the LIS about more orders this pass is pointless: it refused the
        # key, or it has failed every request for a while. ``_halt_reason`` says which.
        self._halted = threading.Event()
        self._halt_reason = ""
        self._streak = 0  # transient LIS failures in a row, across workers
        self._streak_lock = threading.Lock()
        self._disk_held: dict[str, list[str]] = {}  # this pass: PDF folder problem → orders

    # -- the pass ---------------------------------------------------------------------------

    def run_pass(
        self, *, due_only: bool = True, stop: threading.Event | None = None
    ) -> PassSummary:
        """One pass over every pending order that is due.

        Raises ``StoreError`` if the database is unreachable; everything else is confined to
        its order. ``stop`` makes the pass take no new orders and let go of waiting LIS calls.
        """
        stop = stop or threading.Event()
        started = time.monotonic()
        summary = PassSummary()
        self._halted.clear()
        self._halt_reason, self._streak = "", 0
        self._disk_held = {}
        self.applier.notifier.new_pass()
        self.busy, self.progress_at = True, started
        try:
            self.pdfs.new_pass()
            swept = self.pdfs.sweep()
            if swept:
                log.info("pdf.temp_swept", files=swept)
            summary.pass_id = run_tx(self.engine, lambda conn: orders.record_pass(conn, {
                "STARTED_AT": self.now(), "HOST": socket.gethostname()[:255],
                "PID": os.getpid()}))
            structlog.contextvars.bind_contextvars(pass_id=summary.pass_id)
            log.info("pass.started")
            dead = self._dead_owners()
            workers = max(1, self.config.lis.max_concurrency)
            # One page ahead: the workers ask the LIS about the next page while this thread
            # applies the last one, so neither waits for the other at page ends.
            ahead: list[Future[_Observation]] = []
            futures: list[Future[_Observation]] = []
            try:
                with ThreadPoolExecutor(workers, thread_name_prefix="labsync-lis") as pool:
                    for page in itertools.chain(self._pages(due_only, dead),
                                                self._late_pages(dead, stop)):
                        if stop.is_set() or self._halted.is_set():
                            break
                        futures = [pool.submit(contextvars.copy_context().run, self._observe,
                                               o, stop) for o in page]
                        self._apply_all(ahead, summary, stop)
                        ahead, futures = futures, []
                    self._apply_all(ahead, summary, stop)
            except BaseException:
                # The pass is ending (the database went away): what was observed but not
                # applied must not leave its staged PDFs behind. The pool has finished here.
                self._discard_unapplied([*ahead, *futures])
                raise
        finally:
            self.busy = False
            self._release_claims()
        if self._halted.is_set():
            summary.outcome = self._halt_reason
            self._report_halt()
        elif stop.is_set():
            summary.outcome = "interrupted"
        self._report_disk()
        summary.duration_s = round(time.monotonic() - started, 3)
        run_tx(self.engine, lambda conn: orders.finish_pass(conn, summary.pass_id or 0, {
            "FINISHED_AT": self.now(), "CHECKED": summary.checked,
            "COMPLETED": summary.completed, "CANCELLED": summary.cancelled,
            "PENDING": summary.pending, "FAILED": summary.failed, "EVENTS": summary.events,
            "OUTCOME": summary.outcome, "DURATION_MS": int(summary.duration_s * 1000),
        }))
        log.info("pass.finished", **summary.as_dict())
        structlog.contextvars.unbind_contextvars("pass_id")
        return summary

    def close(self) -> None:
        """Let this instance's liveness lock go (a clean stop)."""
        self.liveness.close()

    def _dead_owners(self) -> set[str]:
        """Owners of live-looking claims who died (their orders are free for this pass)."""
        self.liveness.ensure()
        now = self.now()
        dead = run_tx(self.engine, lambda conn: liveness.dead_owners(
            conn, liveness.claim_holders(conn, now, besides=self.owner)), retry=True)
        for owner in sorted(dead):
            log.info("claims.owner_gone", owner=owner)
        return dead

    def orphaned(self) -> set[str]:
        """The owners who died holding claims: ``labsync run`` starts a pass when one did."""
        return run_tx(self.engine, lambda conn: liveness.dead_owners(
            conn, liveness.claim_holders(conn, self.now(), besides=self.owner)))

    def _late_pages(self, dead: set[str], stop: threading.Event
                    ) -> Iterator[list[orders.PendingOrder]]:
        """After the pass's own pages: the orders of instances that died meanwhile.

        Their claims were live when this pass went by, so without this round they would wait
        for the next pass. Only the orders they hold are read again.
        """
        if stop.is_set() or self._halted.is_set():
            return
        late = self._dead_owners() - dead
        if late:
            yield from self._pages(False, dead | late, held_by=late)

    def _pages(self, due_only: bool, dead: set[str], *, held_by: set[str] | None = None
               ) -> Iterator[list[orders.PendingOrder]]:
        """Pages of pending orders, each claimed for this instance before it is yielded."""
        after = 0
        size = self.config.sync.page_size
        lease = timedelta(seconds=self.config.sync.lease)
        days = self.config.sync.recheck_days
        while True:
            now = self.now()
            since = now - timedelta(days=days) if days else None
            page = run_tx(self.engine, partial(
                orders.pending_page, after_id=after, limit=size, now_utc=now, due_only=due_only,
                recheck_since=since, dead=dead, held_by=held_by or ()))
            if not page:
                return
            self.liveness.ensure()  # before the claim that relies on it
            mine = run_tx(self.engine, partial(claims.claim, page=page, owner=self.owner, now=now,
                                               until=now + lease, dead=dead), retry=True)
            self.progress_at = time.monotonic()
            yield [o for o in page if o.id in mine]
            after = page[-1].id
            if len(page) < size:
                return

    def _release_claims(self) -> None:
        try:
            run_tx(self.engine, lambda conn: claims.release_all(conn, self.owner))
        except (StoreError, SQLAlchemyError) as exc:
            # The leases run out by themselves; another instance may take the orders then.
            log.warning("claims.not_released", error=str(exc))

    def _discard_unapplied(self, futures: list[Future[_Observation]]) -> None:
        for future in futures:
            if not future.cancel():
                with contextlib.suppress(Exception):
                    self.pdfs.discard(future.result().pdf)  # a no-op once published

    def _apply_all(self, futures: list[Future[_Observation]], summary: PassSummary,
                   stop: threading.Event) -> None:
        """Apply a page's observations on one connection held for the page: first
        completions in batches, quiet polls together at the page's end, the rest one by one."""
        quiet: list[orders.QuietPoll] = []
        batch: list[_Observation] = []
        with held_connection(self.engine) as conn:
            for future in futures:
                if stop.is_set() and future.cancel():
                    summary.skipped += 1
                    continue
                obs = future.result()
                if obs.skipped or isinstance(obs.error, LisAuthError) or (
                        self._halted.is_set() and isinstance(obs.error, TransientLisError)):
                    self.pdfs.discard(obs.pdf)
                    summary.skipped += 1
                    continue
                poll = None
                if obs.error is None and obs.lis_order is not None:
                    poll = self.applier.quiet(obs.order, obs.lis_order, self.now())
                if poll is not None:
                    quiet.append(poll)
                    continue
                if self._batchable(obs):
                    batch.append(obs)
                    if len(batch) >= COMPLETION_BATCH:
                        self._apply_batch(conn, batch, summary)
                        batch = []
                    continue
                with structlog.contextvars.bound_contextvars(order=obs.order.external_id):
                    summary.count(self._apply(conn, obs))
                self.progress_at = time.monotonic()
            self._apply_batch(conn, batch, summary)
            self._save_quiet(conn, quiet, summary)

    @staticmethod
    def _batchable(obs: _Observation) -> bool:
        """A first completion with nothing of labsync's to diff against (see ``complete_batch``)."""
        return (obs.error is None and obs.lis_order is not None and obs.pdf is not None
                and obs.lis_order.status is OrderStatus.COMPLETED
                and not obs.order.recheck and not obs.order.results_count)

    def _apply_batch(self, conn: Connection, batch: list[_Observation],
                     summary: PassSummary) -> None:
        """Complete ``batch`` in one transaction; if that fails for any reason, one by one.

        The batch is tried once, without retries: a lock wait, a deadlock, a dropped
        connection or one order's bad data would otherwise hold back every order in it.
        Alone, each order gets the usual retries and keeps its failure to itself.
        """
        if not batch:
            return
        completions = [Completion(o.order, o.lis_order, o.pdf) for o in batch
                       if o.lis_order is not None and o.pdf is not None]
        try:
            outcomes = run_tx(conn, lambda conn: self.applier.complete_batch(
                conn, completions, self.now()))
        except Exception as exc:  # noqa: BLE001 - confined below, order by order
            log.warning("batch.one_by_one", orders=len(batch), error=_describe(exc))
            for obs in batch:
                with structlog.contextvars.bound_contextvars(order=obs.order.external_id):
                    summary.count(self._apply(conn, obs))
                self.progress_at = time.monotonic()
            return
        for obs, applied in zip(batch, outcomes, strict=True):
            self.pdfs.discard(obs.pdf)  # a no-op once published
            for level, event, fields in applied.lines:
                getattr(log, level)(event, **fields)
            for note in applied.notes:
                log.warning("result.value_fitted", order=obs.order.external_id, detail=note)
            summary.count(applied)
        self.progress_at = time.monotonic()

    def _save_quiet(self, conn: Connection, polls: list[orders.QuietPoll],
                    summary: PassSummary) -> None:
        """Record the page's quiet polls in one transaction (see ``OrderApplier.quiet``)."""
        if not polls:
            return
        now = self.now()
        try:
            written = run_tx(conn, lambda conn: orders.save_quiet(
                conn, polls, owner=self.owner, now_utc=now), retry=True)
        except SQLAlchemyError as exc:
            # Nothing was lost: these orders are asked again on the next pass.
            log.error("orders.polls_not_recorded", orders=len(polls),
                      error=describe_db_error(exc))
            summary.skipped += len(polls)
            return
        for poll in polls:
            log.info(f"order.{poll.lis_status}", order=poll.external_id, results=0,
                     changed=False)
        if written < len(polls):
            log.warning("claims.lost", orders=len(polls) - written)
        summary.checked += written
        summary.pending += written
        summary.skipped += len(polls) - written
        self.progress_at = time.monotonic()

    # -- step 1: observe (worker threads) ---------------------------------------------------

    def _observe(self, order: orders.PendingOrder, stop: threading.Event) -> _Observation:
        structlog.contextvars.bind_contextvars(order=order.external_id)
        obs = _Observation(order)
        if self._halted.is_set() or stop.is_set():
            obs.skipped = True
            return obs
        try:
            if not is_safe_name(order.external_id):
                # Checked before asking the LIS: such an id must never become a path.
                self.pdfs.final_path(order.user_id, order.external_id)
            obs.lis_order = self.lis.fetch_order(order.external_id)
            if obs.lis_order.status is OrderStatus.COMPLETED and (
                    not order.recheck
                    or self.applier.fingerprint(obs.lis_order) != order.results_hash):
                # A correction usually comes with a new form: fetch it with the results.
                obs.pdf = self.pdfs.stage(order.user_id, order.external_id, self.lis)
            self._lis_answered()
        except Interrupted:
            obs.skipped = True
        except LisAuthError as exc:
            self._halt("lis_auth", "lis.auth_failed", str(exc))
            obs.error = exc
        except TransientLisError as exc:
            self._lis_failed(exc)
            obs.error = exc
        except LabsyncError as exc:
            self._lis_answered()  # bad data or a 4xx: the LIS is there
            obs.error = exc
        except Exception as exc:  # a bug must not end the pass for every order
            log.exception("order.internal_error")
            obs.error = LabsyncError(f"internal error: {type(exc).__name__}")
        return obs

    # -- step 2: apply (the pass's thread) ----------------------------------------------------

    def _apply(self, conn: Connection, obs: _Observation) -> Applied:
        order = obs.order
        if obs.error is not None:
            self._record_failure(conn, order, obs.error)
            return Applied("failed")
        lis_order = obs.lis_order
        assert lis_order is not None
        try:
            work = self.applier.recheck if order.recheck else self.applier.apply
            applied = run_tx(conn, lambda conn: work(
                conn, order, lis_order, obs.pdf, self.now()), retry=True)
        except StoreError:
            self.pdfs.discard(obs.pdf)
            raise
        except (LabsyncError, SQLAlchemyError) as exc:
            self.pdfs.discard(obs.pdf)
            error = exc if isinstance(exc, LabsyncError) else StoreError(describe_db_error(exc))
            self._record_failure(conn, order, error)
            return Applied("failed")
        except Exception as exc:  # a bug must not end the pass for every order
            log.exception("order.internal_error")
            self.pdfs.discard(obs.pdf)
            self._record_failure(conn, order,
                                 LabsyncError(f"internal error: {type(exc).__name__}"))
            return Applied("failed")
        self.pdfs.discard(obs.pdf)  # a no-op once published; cleans up a skipped order's file
        for note in applied.notes:
            log.warning("result.value_fitted", detail=note)
        return applied

    def _record_failure(self, conn: Connection, order: orders.PendingOrder,
                        error: LabsyncError) -> None:
        kind = getattr(error, "kind", "other")
        log.warning("order.failed", error_kind=kind, error=str(error)[:1000])
        if self.metrics is not None:
            self.metrics.lis_error(kind)
        disk = isinstance(error, DiskError)
        if isinstance(error, DiskError):  # the host's: one admin-log line a pass (_report_disk)
            self._disk_held.setdefault(error.reason, []).append(order.external_id)
        try:
            run_tx(conn, lambda conn: self.applier.record_failure(
                conn, order, error, self.now(), admin_log=not disk), retry=True)
        except (StoreError, SQLAlchemyError) as exc:
            log.error("order.failure_not_recorded", error=str(exc))

    def _halt(self, reason: str, event: str, error: str) -> None:
        """Stop asking the LIS for the rest of the pass; say why once."""
        with self._streak_lock:
            if self._halted.is_set():
                return
            self._halt_reason = reason
            self._halted.set()
        log.error(event, error=error)

    def _lis_answered(self) -> None:
        with self._streak_lock:
            self._streak = 0

    def _lis_failed(self, exc: TransientLisError) -> None:
        with self._streak_lock:
            self._streak += 1
            streak = self._streak
        if streak >= max(UNREACHABLE_AFTER, 2 * self.config.lis.max_concurrency):
            self._halt("lis_unreachable", "lis.unreachable",
                       f"{streak} LIS requests in a row failed, the last: {exc}")

    def _report_disk(self) -> None:
        """One admin-log line per PDF folder problem of the pass, with the orders it held."""
        for reason, held in self._disk_held.items():
            shown = ", ".join(held[:10]) + (f" and {len(held) - 10} more" if len(held) > 10
                                             else "")
            log.error("pdf.folder_refused", reason=reason, orders=len(held))
            message = (f"The PDF folder {self.config.pdf.dir} refused writes ({reason}): "
                       f"{len(held)} completed order(s) held back this pass ({shown}); they "
                       "are retried on the next pass. Check the disk and pdf.dir.")
            try:
                run_tx(self.engine, partial(
                    bitrix.add_event_log, fitter=self.fitter, item_id="labsync",
                    description=message, now_site=self.applier.site_time(self.now()),
                    site_id=self.config.notify.site_id, severity="ERROR"))
            except (StoreError, SQLAlchemyError) as exc:
                log.error("pdf.folder_problem_not_recorded", error=str(exc))

    def _report_halt(self) -> None:
        if self._halt_reason == "lis_auth":
            message = ("the LIS refused labsync's API key (HTTP 401/403); no orders were "
                       "asked about for the rest of this pass: check lis.api_key")
        else:
            message = ("the LIS did not answer (every request failed, retries included); "
                       "the rest of this pass's orders were left for the next pass: check "
                       "lis.base_url and the LIS")
        if self.metrics is not None:
            self.metrics.lis_error("auth" if self._halt_reason == "lis_auth" else "transient")
        try:
            run_tx(self.engine, lambda conn: bitrix.add_event_log(
                conn, self.fitter, item_id="labsync", description=message,
                now_site=self.applier.site_time(self.now()),
                site_id=self.config.notify.site_id, severity="ERROR"))
        except (StoreError, SQLAlchemyError) as exc:
            log.error("lis.halt_not_recorded", error=str(exc))
