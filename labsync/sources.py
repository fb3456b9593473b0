"""Answers the LIS gives without being asked about one order: change feeds and inboxes.

- A *change feed* (``lis.base.ChangeFeed``) lists what changed since a cursor. Each page's
  orders are applied, and the page's cursor saved, in ONE transaction: the cursor is never
  ahead of what was applied. A crash leaves the old cursor and the page is read again;
  re-reading a version already applied writes nothing new (the planner).
- An *inbox* (``lis.base.Inbox``) hands out deliveries already safe on labsync's disk. A
  delivery's orders are applied, and its id marked applied (``labsync_deliveries``), in ONE
  transaction; the inbox is told ``done`` after the commit. A delivery handed out again
  after a crash between the two is recognised by its id and only marked done. A delivery
  for an order the site does not have (yet) is released, to be tried again later.

Every order goes through the same planner and executor as an order asked about, and its
PDF through the same checks. Only orders the site has, pending or completed within
``sync.recheck_days`` (a correction), are written; the page's or delivery's orders are
matched to the site's with one indexed lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, time, timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.clock import utc_naive
from labsync.errors import LabsyncError, LisError, StoreError
from labsync.execute import Applied, Executor
from labsync.lis.base import (
    Capability,
    ChangeFeed,
    Delivery,
    FeedProblem,
    Inbox,
    capabilities,
)
from labsync.model import LisOrder
from labsync.observe import Observation, Observer
from labsync.store import cursors, deliveries, orders, versions
from labsync.store.db import describe_failure, order_error
from labsync.store.tx import run_tx

log = structlog.get_logger("labsync.sources")


@dataclass
class SourceSummary:
    """What one read of a feed, or one drain of an inbox, did."""

    pages: int = 0  # feed pages read, or deliveries taken
    orders: int = 0  # orders the LIS listed
    applied: int = 0  # of those, orders of the site's that were written
    failed: int = 0
    unchanged: int = 0  # orders listed again at the version already applied: not touched
    held: int = 0  # deliveries released for later (an order the site does not have yet)
    duplicates: int = 0  # deliveries applied before, only marked done
    outcome: str = "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PushedAnswers:
    """Applies what a change feed lists and what an inbox holds."""

    def __init__(self, engine: Engine, lis: Any, observer: Observer, executor: Executor, *,
                 recheck_days: int, now: Callable[[], datetime]) -> None:
        self.engine = engine
        self.lis = lis
        self.observer = observer
        self.executor = executor
        self.recheck_days = recheck_days
        self.now = now
        self.feed_name = f"{type(lis).__name__}:changes"

    @property
    def has_feed(self) -> bool:
        return Capability.CHANGE_FEED in capabilities(self.lis)

    @property
    def has_inbox(self) -> bool:
        return Capability.INBOX in capabilities(self.lis)

    # -- the change feed ---------------------------------------------------------------------

    def follow_feed(self, stop: threading.Event | None = None) -> SourceSummary:
        """Read the feed from its cursor to its last page (or until ``stop``)."""
        stop = stop or threading.Event()
        summary = SourceSummary()
        if not self.has_feed:
            return summary
        feed: ChangeFeed = self.lis
        cursor = run_tx(self.engine, lambda conn: cursors.get(conn, self.feed_name))
        since = None if cursor is not None else self._first_read_since()
        while not stop.is_set():
            try:
                page = feed.changes(cursor, since=since)
            except LisError as exc:
                log.warning("feed.read_failed", error_kind=exc.kind, error=str(exc)[:500])
                summary.outcome = exc.kind
                break
            summary.pages += 1
            summary.orders += len(page.orders)
            if page.problems:
                self._feed_problems(page.problems, summary)
            next_cursor = page.cursor if page.cursor is not None else cursor
            self._apply(page.orders, summary, partial(
                cursors.save, name=self.feed_name, cursor=next_cursor, now=self.now()))
            cursor = next_cursor
            if not page.more:
                break
        log.info("feed.read", **summary.as_dict())
        return summary

    def _feed_problems(self, problems: Sequence[FeedProblem], summary: SourceSummary) -> None:
        """Entries the adapter could not read: each logged, and recorded as a failure of the
        site's order it names (its next ask by id comes soon, and the error stays there)."""
        since = self.now() - timedelta(days=self.recheck_days) if self.recheck_days else None
        named = {p.external_id for p in problems if p.external_id}
        local = run_tx(self.engine, lambda conn: orders.pending_by_external_ids(
            conn, named, recheck_since=since))
        by_id = {order.external_id: order for order in local}
        for problem in problems:
            order = by_id.get(problem.external_id or "")
            log.warning("feed.entry_unreadable", order=problem.external_id,
                        error_kind=problem.error.kind, error=str(problem.error)[:500],
                        site_order=order is not None)
            if order is not None:
                self._failure(Observation(order, None, error=problem.error))
                summary.failed += 1

    def _first_read_since(self) -> datetime:
        """Where a feed never read before begins: a day before the oldest pending order was
        placed (its results cannot be older), or a day ago when nothing is pending."""
        oldest = run_tx(self.engine, orders.oldest_pending_date)
        start = (datetime.combine(oldest, time.min, tzinfo=UTC) if oldest is not None
                 else self.now().replace(tzinfo=UTC))
        return start - timedelta(days=1)

    # -- the inbox ---------------------------------------------------------------------------

    def drain_inbox(self, stop: threading.Event | None = None) -> SourceSummary:
        """Apply every delivery the inbox holds now (or until ``stop``)."""
        stop = stop or threading.Event()
        summary = SourceSummary()
        if not self.has_inbox:
            return summary
        inbox: Inbox = self.lis
        while not stop.is_set():
            delivery = inbox.take()
            if delivery is None:
                break
            summary.pages += 1
            with structlog.contextvars.bound_contextvars(delivery=delivery.id):
                try:
                    self._delivery(inbox, delivery, summary)
                except (StoreError, SQLAlchemyError):
                    inbox.release(delivery, "the database is unavailable")
                    raise
        if summary.pages:
            log.info("inbox.drained", **summary.as_dict())
        return summary

    def _delivery(self, inbox: Inbox, delivery: Delivery, summary: SourceSummary) -> None:
        if delivery.problem:
            log.warning("inbox.refused", reason=delivery.problem)
            inbox.failed(delivery, delivery.problem)
            summary.failed += 1
            return
        if run_tx(self.engine, lambda conn: deliveries.applied(conn, delivery.id)):
            inbox.done(delivery)  # applied before a crash kept it from being marked done
            summary.duplicates += 1
            return
        ids = {o.external_id for o in delivery.orders}
        known = run_tx(self.engine, lambda conn: orders.known_external_ids(conn, ids))
        missing = sorted(ids - known)
        if missing:
            reason = f"order {', '.join(missing)} is not on the site (yet)"
            log.info("inbox.held", reason=reason)
            inbox.release(delivery, reason)
            summary.held += 1
            return
        summary.orders += len(delivery.orders)
        self._apply(delivery.orders, summary, lambda conn: deliveries.mark(
            conn, delivery.id, orders=len(delivery.orders), now=self.now()))
        inbox.done(delivery)

    # -- shared ------------------------------------------------------------------------------

    def _apply(self, answers: Sequence[LisOrder], summary: SourceSummary,
               finish: Callable[[Connection], None]) -> None:
        """Apply ``answers`` to the site's orders, in the LIS's order, and ``finish`` (the
        cursor, the delivery's mark) in the same transaction; if that transaction fails,
        each order alone, its failure recorded, then ``finish``."""
        since = self.now() - timedelta(days=self.recheck_days) if self.recheck_days else None
        wanted = {a.external_id for a in answers}
        local = run_tx(self.engine, lambda conn: orders.pending_by_external_ids(
            conn, wanted, recheck_since=since))
        by_id: dict[str, list[orders.PendingOrder]] = {}
        for order in local:
            by_id.setdefault(order.external_id, []).append(order)
        seen = run_tx(self.engine, lambda conn: versions.get_many(conn, [o.id for o in local]))
        pairs = [(order, answer) for answer in answers
                 for order in by_id.get(answer.external_id, ())]
        fresh = [(order, answer) for order, answer in pairs
                 if not _applied_before(answer, seen.get(order.id))]
        summary.unchanged += len(pairs) - len(fresh)
        observed = [self.observer.given(order, answer) for order, answer in fresh]
        good = [o for o in observed if o.error is None and not o.skipped]
        try:
            outcomes = run_tx(self.engine, lambda conn: self._together(conn, good, finish))
        except (LabsyncError, SQLAlchemyError) as exc:
            if isinstance(exc, StoreError):
                self._discard(observed)
                raise
            log.warning("sources.one_by_one", orders=len(good), error=describe_failure(exc))
            outcomes = [self._alone(o) for o in good]
            run_tx(self.engine, finish, retry=True)
        for obs in observed:
            if obs.error is not None:
                self._failure(obs)
                summary.failed += 1
        summary.applied += sum(1 for a in outcomes if a.outcome not in ("skipped", "failed"))
        summary.failed += sum(1 for a in outcomes if a.outcome == "failed")
        self._discard(observed)

    def _together(self, conn: Connection, good: Sequence[Observation],
                  finish: Callable[[Connection], None]) -> list[Applied]:
        outcomes = []
        for obs in good:
            assert obs.lis_order is not None
            with structlog.contextvars.bound_contextvars(order=obs.order.external_id):
                outcomes.append(self.executor.apply(conn, obs.order, obs.lis_order, obs.pdf,
                                                    self.now()))
        finish(conn)
        return outcomes

    def _alone(self, obs: Observation) -> Applied:
        assert obs.lis_order is not None
        lis_order = obs.lis_order
        with structlog.contextvars.bound_contextvars(order=obs.order.external_id):
            try:
                return run_tx(self.engine, lambda conn: self.executor.apply(
                    conn, obs.order, lis_order, obs.pdf, self.now()), retry=True)
            except StoreError:
                raise
            except (LabsyncError, SQLAlchemyError) as exc:
                obs.error = order_error(exc)
                return Applied("skipped")  # recorded as a failure by _apply

    def _failure(self, obs: Observation) -> None:
        assert obs.error is not None
        error = obs.error
        with structlog.contextvars.bound_contextvars(order=obs.order.external_id):
            log.warning("order.failed", error_kind=getattr(error, "kind", "other"),
                        error=str(error)[:1000])
            try:
                run_tx(self.engine, lambda conn: self.executor.record_failure(
                    conn, obs.order, error, self.now()), retry=True)
            except (StoreError, SQLAlchemyError) as exc:
                log.error("order.failure_not_recorded", error=str(exc))

    def _discard(self, observed: Sequence[Observation]) -> None:
        for obs in observed:
            self.observer.pdfs.discard(obs.pdf)  # a no-op once published


def _applied_before(answer: LisOrder, seen: Any) -> bool:
    """The answer is the version of the order already applied (a feed's overlap re-read, a
    resent message): nothing to do, not even bookkeeping. The planner would write nothing
    of the site's either, but this costs no lock and no PDF staging."""
    if seen is None or answer.version is None or seen.VERSION != answer.version:
        return False
    if answer.changed_at is None or seen.CHANGED_AT is None:
        return seen.CHANGED_AT is None and answer.changed_at is None
    return bool(utc_naive(answer.changed_at) == seen.CHANGED_AT)
