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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.clock import utc_naive
from labsync.errors import LabsyncError, LisError, StoreError
from labsync.execute import Applied, Completion, Executor
from labsync.lis.base import (
    Capability,
    ChangeFeed,
    Delivery,
    FeedProblem,
    Hold,
    Inbox,
    capabilities,
)
from labsync.model import LisOrder, OrderStatus
from labsync.observe import Observation, Observer
from labsync.store import cursors, deliveries, orders, versions
from labsync.store.db import describe_failure, order_error
from labsync.store.tx import held_connection, run_tx

log = structlog.get_logger("labsync.sources")

BATCH = 100  # inbox deliveries applied in one transaction, at most


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
            self._apply(page.orders, summary, self._save_cursor(next_cursor))
            cursor = next_cursor
            if not page.more:
                break
        log.info("feed.read", **summary.as_dict())
        return summary

    def _save_cursor(self, cursor: str | None) -> Callable[[Connection, Mapping[str, str]],
                                                             None]:
        """Where the page's transaction leaves the feed: its cursor, whatever failed (a failed
        order has its failure recorded and is asked again by id)."""
        def save(conn: Connection, _failed: Mapping[str, str]) -> None:
            cursors.save(conn, name=self.feed_name, cursor=cursor, now=self.now())
        return save

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
        """Apply every delivery the inbox holds now (or until ``stop``), up to ``BATCH`` of
        them in one transaction."""
        stop = stop or threading.Event()
        summary = SourceSummary()
        if not self.has_inbox:
            return summary
        inbox: Inbox = self.lis
        batch, carry = _take_batch(inbox, None)
        if not batch:
            return summary
        open_ = {d.id: d for d in batch}  # taken and not finished yet
        try:
            # One connection for the whole drain: no pool checkout, ping and reset for
            # each of a batch's transactions.
            with held_connection(self.engine) as conn:
                while batch:
                    summary.pages += len(batch)
                    self._deliveries(inbox, batch, open_, summary, conn)
                    if stop.is_set() or (carry is None and len(batch) < BATCH):
                        break  # stopped, or the inbox has no more (take() returned None)
                    batch, carry = _take_batch(inbox, carry)
                    open_ = {d.id: d for d in batch}
        except Exception as exc:
            # Nothing stays in hand: what was not finished waits again (one applied already
            # is only marked done when it comes back).
            why = ("the database is unavailable" if isinstance(exc, (StoreError, SQLAlchemyError))
                   else f"the drain failed: {type(exc).__name__}")
            for delivery in [*open_.values(), *([carry] if carry else [])]:
                inbox.release(delivery, why, Hold.UNAVAILABLE)
            raise
        if carry is not None:  # stopped: it waits for the next drain
            inbox.release(carry, "the drain was stopped", Hold.UNAVAILABLE)
        if summary.pages:
            log.info("inbox.drained", **summary.as_dict())
        return summary

    def _deliveries(self, inbox: Inbox, batch: Sequence[Delivery], open_: dict[str, Delivery],
                    summary: SourceSummary, conn: Connection) -> None:
        """One batch: refused ones failed, ones applied before marked done, ones for orders
        the site lacks released; the rest applied and marked in one transaction, then done
        (or failed, with the reason, when one of their orders could not be applied)."""

        def finish(delivery: Delivery, reason: str | None = None) -> None:
            if reason is None:
                inbox.done(delivery)
            else:
                inbox.failed(delivery, reason)
            open_.pop(delivery.id, None)

        readable = []
        for delivery in batch:
            if delivery.problem:
                log.warning("inbox.refused", delivery=delivery.id, reason=delivery.problem)
                finish(delivery, delivery.problem)
                summary.failed += 1
            else:
                readable.append(delivery)
        if not readable:
            return
        named = {o.external_id for d in readable for o in d.orders}
        applied, known = run_tx(conn, lambda c: (
            deliveries.applied(c, [d.id for d in readable]),
            orders.known_external_ids(c, named)))
        fresh = []
        for delivery in readable:
            missing = sorted({o.external_id for o in delivery.orders} - known)
            if delivery.id in applied:
                finish(delivery)  # applied before a crash kept it from being marked done
                summary.duplicates += 1
            elif missing:
                reason = f"order {', '.join(missing)} is not on the site (yet)"
                log.info("inbox.held", delivery=delivery.id, reason=reason)
                inbox.release(delivery, reason, Hold.UNKNOWN_ORDER)
                open_.pop(delivery.id, None)
                summary.held += 1
            else:
                fresh.append(delivery)
        if not fresh:
            return
        summary.orders += sum(len(d.orders) for d in fresh)

        def mark(conn: Connection, failed: Mapping[str, str]) -> None:
            deliveries.mark(conn, [(d.id, len(d.orders)) for d in fresh
                                   if not _failures(d, failed)], now=self.now())

        failed = self._apply([o for d in fresh for o in d.orders], summary, mark, conn)
        for delivery in fresh:
            why = "; ".join(_failures(delivery, failed)) or None
            if why is not None:
                log.warning("inbox.not_applied", delivery=delivery.id, reason=why[:1000])
            finish(delivery, why)

    # -- shared ------------------------------------------------------------------------------

    def _apply(self, answers: Sequence[LisOrder], summary: SourceSummary,
               finish: Callable[[Connection, Mapping[str, str]], None],
               bind: Engine | Connection | None = None) -> dict[str, str]:
        """Apply ``answers`` to the site's orders, in the LIS's order, and ``finish`` (the
        cursor, the deliveries' mark) in the same transaction; if that transaction fails,
        each order alone, its failure recorded, then ``finish``. ``finish`` is given, and
        this returns, the orders that failed: external id → why. ``bind``: a connection
        to run the transactions on (an inbox drain holds one), else the pool's."""
        bind = bind if bind is not None else self.engine
        since = self.now() - timedelta(days=self.recheck_days) if self.recheck_days else None
        wanted = {a.external_id for a in answers}
        local, seen = run_tx(bind, lambda conn: _local_and_seen(conn, wanted, since))
        by_id: dict[str, list[orders.PendingOrder]] = {}
        for order in local:
            by_id.setdefault(order.external_id, []).append(order)
        pairs = [(order, answer) for answer in answers
                 for order in by_id.get(answer.external_id, ())]
        fresh = [(order, answer) for order, answer in pairs
                 if not _applied_before(answer, seen.get(order.id))]
        summary.unchanged += len(pairs) - len(fresh)
        observed = [self.observer.given(order, answer) for order, answer in fresh]
        good = [o for o in observed if o.error is None and not o.skipped]
        try:
            outcomes = run_tx(bind, lambda conn: self._together(
                conn, good, lambda c: finish(c, _errors(observed))))
        except (LabsyncError, SQLAlchemyError) as exc:
            if isinstance(exc, StoreError):
                self._discard(observed)
                raise
            log.warning("sources.one_by_one", orders=len(good), error=describe_failure(exc))
            outcomes = [self._alone(o) for o in good]
            run_tx(self.engine, lambda conn: finish(conn, _errors(observed)), retry=True)
        for obs, applied in zip(good, outcomes, strict=True):
            _log_applied(obs, applied)
        for obs in observed:
            if obs.error is not None:
                self._failure(obs)
                summary.failed += 1
        summary.applied += sum(1 for a in outcomes if a.outcome not in ("skipped", "failed"))
        summary.failed += sum(1 for a in outcomes if a.outcome == "failed")
        self._discard(observed)
        return _errors(observed)

    def _together(self, conn: Connection, good: Sequence[Observation],
                  finish: Callable[[Connection], None]) -> list[Applied]:
        """Every order in one transaction: the first completions of orders listed once with
        ``Executor.complete_batch`` (a few statements for all), the others one by one."""
        listed = Counter(obs.order.id for obs in good)
        batch = [obs for obs in good if listed[obs.order.id] == 1 and _first_completion(obs)]
        outcomes: dict[int, Applied] = {}
        if batch:
            completions = [Completion(obs.order, obs.lis_order, obs.pdf) for obs in batch
                           if obs.lis_order is not None]
            done = self.executor.complete_batch(conn, completions, self.now())
            outcomes.update((id(obs), applied) for obs, applied in zip(batch, done, strict=True))
        for obs in good:
            if id(obs) in outcomes:
                continue
            assert obs.lis_order is not None
            with structlog.contextvars.bound_contextvars(order=obs.order.external_id):
                outcomes[id(obs)] = self.executor.apply(conn, obs.order, obs.lis_order,
                                                        obs.pdf, self.now())
        finish(conn)
        return [outcomes[id(obs)] for obs in good]

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


def _take_batch(inbox: Inbox, carry: Delivery | None
                ) -> tuple[list[Delivery], Delivery | None]:
    """Up to ``BATCH`` deliveries, in the inbox's order, no two naming the same order (a
    later message for an order is applied after the earlier one is committed): the batch,
    and the delivery taken that starts the next one."""
    batch = [carry] if carry is not None else []
    named = {o.external_id for o in carry.orders} if carry is not None else set()
    while len(batch) < BATCH:
        delivery = inbox.take()
        if delivery is None:
            break
        ids = {o.external_id for o in delivery.orders}
        if ids & named:
            return batch, delivery
        named |= ids
        batch.append(delivery)
    return batch, None


def _local_and_seen(conn: Connection, wanted: set[str], since: datetime | None
                    ) -> tuple[list[orders.PendingOrder], dict[int, Any]]:
    """The site's orders among ``wanted`` that may be written, and what was applied of their
    LIS versions: two indexed lookups in one read."""
    local = list(orders.pending_by_external_ids(conn, wanted, recheck_since=since))
    return local, versions.get_many(conn, [o.id for o in local])


def _first_completion(obs: Observation) -> bool:
    """An answer ``Executor.complete_batch`` can take: a completion of an order with no result
    rows yet (it writes the others on their own, in the same transaction)."""
    return (obs.lis_order is not None and obs.lis_order.status is OrderStatus.COMPLETED
            and not obs.order.recheck and not obs.order.results_count)


def _log_applied(obs: Observation, applied: Applied) -> None:
    """What an order's write left to log once committed (a batch's lines; fitted values)."""
    for level, event, fields in applied.lines:
        getattr(log, level)(event, **fields)
    for note in applied.notes:
        log.warning("result.value_fitted", order=obs.order.external_id, detail=note)


def _errors(observed: Sequence[Observation]) -> dict[str, str]:
    return {obs.order.external_id: str(obs.error) for obs in observed if obs.error is not None}


def _failures(delivery: Delivery, failed: Mapping[str, str]) -> list[str]:
    """Why the delivery's orders that failed did (none: it is applied whole)."""
    return [f"order {o.external_id}: {failed[o.external_id]}" for o in delivery.orders
            if o.external_id in failed]
