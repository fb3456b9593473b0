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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync import planner
from labsync.breaker import AUTH, UNREACHABLE_AFTER, Breaker
from labsync.clock import utc_now
from labsync.errors import (
    DiskError,
    LabsyncError,
    LisAuthError,
    StoreError,
    TransientLisError,
)
from labsync.execute import Applied, Completion, Executor
from labsync.lis.base import LisClient
from labsync.model import OrderStatus
from labsync.notify import Notifier
from labsync.observe import Observation, Observer
from labsync.pages import ClaimedPages
from labsync.passes import PassProblems, PassSummary
from labsync.pdfs import PdfStore
from labsync.sources import PushedAnswers
from labsync.store import bookkeeping, orders
from labsync.store.db import describe_db_error, describe_failure, order_error
from labsync.store.tx import held_connection, run_tx

log = structlog.get_logger("labsync.sync")

# First completions written per transaction (Executor.complete_batch): fewer statements
# per order, and a bad order costs its batch one failed try before each goes alone.
COMPLETION_BATCH = 20


@dataclass(frozen=True, slots=True)
class PassSettings:
    """What a pass needs of ``[sync]`` and ``[lis]``."""

    page_size: int = 500
    lease: float = 900.0  # seconds a claim holds while its owner lives but is stuck
    recheck_days: int = 0  # completed orders asked again for corrections this many days
    max_concurrency: int = 8  # LIS requests at once


class SyncEngine:
    """Runs passes over the pending orders; ``sync-once`` and the scheduler call ``run_pass``.

    ``progress_at`` (a ``time.monotonic`` value) moves on with every page and every order,
    so a watchdog can tell a long pass from a stuck one.
    """

    def __init__(
        self,
        settings: PassSettings,
        engine: Engine,
        lis: LisClient,
        *,
        policy: planner.Policy,
        pdfs: PdfStore,
        notifier: Notifier,
        site_id: str,
        now: Callable[[], datetime] = utc_now,
        metrics: Any = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.lis = lis
        self.now = now
        self.metrics = metrics
        self.claims = ClaimedPages(engine, page_size=settings.page_size, lease=settings.lease,
                                   recheck_days=settings.recheck_days, now=lambda: self.now())
        self.owner = self.claims.owner
        self.liveness = self.claims.liveness
        self.pdfs = pdfs
        self.policy = policy
        self.fitter = policy.fitter
        self.applier = Executor(policy, pdfs=pdfs, fitter=policy.fitter, site_id=site_id,
                                owner=self.owner, notifier=notifier)
        self.progress_at = time.monotonic()
        self.busy = False
        # Open when asking the LIS about more orders this pass is pointless: it refused the
        # key, or it has failed every request for a while (at least twice the concurrency).
        self.breaker = Breaker(max(UNREACHABLE_AFTER, 2 * settings.max_concurrency))
        self.problems = PassProblems(engine, policy.fitter, site_id=site_id, pdf_dir=pdfs.root,
                                     site_time=lambda: self.applier.site_time(self.now()))
        self.observer = Observer(
            lis, pdfs, self.breaker, fingerprint=self.applier.fingerprint,
            pdf_required=policy.pdf_required,
            on_refused=lambda order, text: self.problems.order_note(order.external_id, text))
        # What the LIS lists (a change feed) or pushes (an inbox), for adapters that can.
        self.pushed = PushedAnswers(engine, lis, self.observer, self.applier,
                                    recheck_days=settings.recheck_days, now=lambda: self.now())

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
        self.breaker.reset()
        self.problems.new_pass()
        self.applier.notifier.new_pass()
        self.busy, self.progress_at = True, started
        try:
            self.pdfs.new_pass()
            self._sweep()
            summary.pass_id = run_tx(self.engine, lambda conn: bookkeeping.record_pass(conn, {
                "STARTED_AT": self.now(), "HOST": socket.gethostname()[:255],
                "PID": os.getpid()}))
            structlog.contextvars.bind_contextvars(pass_id=summary.pass_id)
            log.info("pass.started")
            dead = self.claims.dead_owners()
            workers = max(1, self.settings.max_concurrency)
            # One page ahead: the workers ask the LIS about the next page while this thread
            # applies the last one, so neither waits for the other at page ends.
            ahead: list[Future[Observation]] = []
            futures: list[Future[Observation]] = []
            try:
                with ThreadPoolExecutor(workers, thread_name_prefix="labsync-lis") as pool:
                    for page in itertools.chain(self.claims.pages(due_only, dead),
                                                self._late_pages(dead, stop)):
                        self.progress_at = time.monotonic()
                        if stop.is_set() or self.breaker.tripped:
                            break
                        futures = [pool.submit(contextvars.copy_context().run,
                                               self.observer.observe, o, stop) for o in page]
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
            self.claims.release()
        if self.breaker.tripped:
            summary.outcome = self.breaker.reason
            if self.metrics is not None:
                self.metrics.lis_error("auth" if self.breaker.reason == AUTH else "transient")
            self.problems.report_halt(self.breaker.reason)
        elif stop.is_set():
            summary.outcome = "interrupted"
        self.problems.report_disk()
        summary.duration_s = round(time.monotonic() - started, 3)
        run_tx(self.engine, lambda conn: bookkeeping.finish_pass(conn, summary.pass_id or 0, {
            "FINISHED_AT": self.now(), "CHECKED": summary.checked,
            "COMPLETED": summary.completed, "CANCELLED": summary.cancelled,
            "PENDING": summary.pending, "FAILED": summary.failed, "EVENTS": summary.events,
            "OUTCOME": summary.outcome, "DURATION_MS": int(summary.duration_s * 1000),
        }))
        log.info("pass.finished", **summary.as_dict())
        structlog.contextvars.unbind_contextvars("pass_id")
        return summary

    def _sweep(self) -> None:
        """Remove the temporary PDF files of writers that are gone (``PdfStore.sweep``)."""
        swept = self.pdfs.sweep()
        if swept:
            log.info("pdf.temp_swept", files=swept)

    def close(self) -> None:
        """Let this instance's liveness lock go (a clean stop)."""
        self.claims.close()

    def orphaned(self) -> set[str]:
        """The owners who died holding claims: ``labsync run`` starts a pass when one did."""
        return self.claims.dead_owners(quiet=True)

    def _late_pages(self, dead: set[str], stop: threading.Event
                    ) -> Iterator[list[orders.PendingOrder]]:
        """After the pass's own pages: the orders of instances that died meanwhile.

        Their claims were live when this pass went by, so without this round they would wait
        for the next pass. Only the orders they hold are read again.
        """
        if stop.is_set() or self.breaker.tripped:
            return
        late = self.claims.dead_owners() - dead
        if late:
            self._sweep()  # their temporary files too
            yield from self.claims.pages(False, dead | late, held_by=late)

    def _discard_unapplied(self, futures: list[Future[Observation]]) -> None:
        for future in futures:
            if not future.cancel():
                with contextlib.suppress(Exception):
                    self.pdfs.discard(future.result().pdf)  # a no-op once published

    def _apply_all(self, futures: list[Future[Observation]], summary: PassSummary,
                   stop: threading.Event) -> None:
        """Apply a page's observations on one connection held for the page: first
        completions in batches, quiet polls together at the page's end, the rest one by one."""
        quiet: list[bookkeeping.QuietPoll] = []
        batch: list[Observation] = []
        with held_connection(self.engine) as conn:
            for future in futures:
                if stop.is_set() and future.cancel():
                    summary.skipped += 1
                    continue
                obs = future.result()
                if obs.skipped or isinstance(obs.error, LisAuthError) or (
                        self.breaker.tripped and isinstance(obs.error, TransientLisError)):
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
    def _batchable(obs: Observation) -> bool:
        """A first completion with nothing of labsync's to diff against (see ``complete_batch``)."""
        return (obs.error is None and obs.lis_order is not None and obs.pdf is not None
                and obs.lis_order.status is OrderStatus.COMPLETED
                and not obs.order.recheck and not obs.order.results_count)

    def _apply_batch(self, conn: Connection, batch: list[Observation],
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
            log.warning("batch.one_by_one", orders=len(batch), error=describe_failure(exc))
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

    def _save_quiet(self, conn: Connection, polls: list[bookkeeping.QuietPoll],
                    summary: PassSummary) -> None:
        """Record the page's quiet polls in one transaction (see ``planner.quiet``)."""
        if not polls:
            return
        now = self.now()
        try:
            written = run_tx(conn, lambda conn: bookkeeping.save_quiet(
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

    # -- step 2: apply (the pass's thread) ----------------------------------------------------

    def _apply(self, conn: Connection, obs: Observation) -> Applied:
        order = obs.order
        if obs.error is not None:
            self._record_failure(conn, order, obs.error)
            return Applied("failed")
        lis_order = obs.lis_order
        assert lis_order is not None
        try:
            applied = run_tx(conn, lambda conn: self.applier.apply(
                conn, order, lis_order, obs.pdf, self.now()), retry=True)
        except StoreError:
            self.pdfs.discard(obs.pdf)
            raise
        except (LabsyncError, SQLAlchemyError) as exc:
            self.pdfs.discard(obs.pdf)
            error = order_error(exc)
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
        if isinstance(error, DiskError):  # the host's: one admin-log line a pass
            self.problems.disk(error.reason, order.external_id)
        try:
            run_tx(conn, lambda conn: self.applier.record_failure(
                conn, order, error, self.now(), admin_log=not disk), retry=True)
        except (StoreError, SQLAlchemyError) as exc:
            log.error("order.failure_not_recorded", error=str(exc))
