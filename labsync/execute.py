"""Carrying plans out: one order's plan in its transaction, or a batch's in one.

The pass (``labsync.sync``) calls the executor in its own thread. For each order it locks
the order's row (and with it the order's bookkeeping and result rows), reads what the
planner needs (``planner.Local``), asks ``planner.plan`` what to write and writes exactly
that: the PDF moved into place, the result rows, ``STATUS``/``SYNCED_AT``, the mail, the
admin-log lines, labsync's bookkeeping, all in the caller's one transaction. Nothing here
decides; a failure is recorded here too, in a transaction of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection

from labsync import planner
from labsync.clock import site_time
from labsync.errors import LabsyncError
from labsync.model import LisOrder
from labsync.notify import Notifier, ReadyOrder
from labsync.pdfs import PdfStore, StagedPdf
from labsync.planner import Answer, Local, Plan, Policy, Seen
from labsync.store import bitrix, bookkeeping, orders, versions
from labsync.store.db import TextFitter

log = structlog.get_logger("labsync.sync")


@dataclass
class Applied:
    """The outcome of one order in a pass."""

    outcome: str  # completed | corrected | rechecked | cancelled | pending | skipped | failed
    events: int = 0
    notes: list[str] = field(default_factory=list)
    # (level, event, fields) to log once the transaction has committed
    lines: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Completion:
    """A first completion the pass batches: the order, the LIS's answer, its staged form."""

    order: orders.PendingOrder
    lis_order: LisOrder
    pdf: StagedPdf | None  # None: the answer carries no form (the planner decides)


@dataclass(slots=True)
class _Done:
    """An order of a batch: what the batch's shared statements write for it."""

    order: orders.PendingOrder
    plan: Plan
    applied: Applied
    seen_exists: bool = False  # the order has a labsync_versions row already


class Executor:
    """Writes what the planner decided for an order, given what the LIS said about it."""

    def __init__(self, policy: Policy, *, pdfs: PdfStore, notifier: Notifier,
                 fitter: TextFitter, site_id: str, owner: str) -> None:
        self.policy = policy
        self.pdfs = pdfs
        self.notifier = notifier
        self.fitter = fitter
        self.site_id = site_id
        self.owner = owner

    # -- decisions without a lock --------------------------------------------------------------

    def quiet(self, order: orders.PendingOrder, lis_order: LisOrder, now: datetime
              ) -> bookkeeping.QuietPoll | None:
        return planner.quiet(order, lis_order, now, self.policy)

    def fingerprint(self, lis_order: LisOrder) -> str:
        return planner.fingerprint(lis_order, self.policy)

    def site_time(self, now_utc: datetime) -> datetime:
        return site_time(now_utc, self.policy.zone)

    # -- one order -----------------------------------------------------------------------------

    def apply(self, conn: Connection, order: orders.PendingOrder, lis_order: LisOrder,
              pdf: StagedPdf | None, now: datetime) -> Applied:
        """The order's transaction: lock, read, plan, write. ``now`` is UTC, naive."""
        current, state, stored = orders.lock_order(conn, order.id, recheck=order.recheck)
        local = self._local(conn, order, current, state, stored, lis_order)
        result = planner.plan(local, Answer(lis_order, pdf), now, self.policy)
        return self._carry_out(conn, local, result, now, log_now=True)

    def _local(self, conn: Connection, order: orders.PendingOrder,
               current: orders.PendingOrder | None, state: Any, stored: int,
               lis_order: LisOrder, seen: dict[int, Any] | None = None) -> Local:
        """What the planner needs of the order; ``seen``: its ``labsync_versions`` rows read
        already, for a batch."""
        rows = orders.stored_results(conn, order.id) if stored and current is not None else []
        if not self._versions_matter(lis_order):
            applied = None
        else:
            row = versions.get(conn, order.id) if seen is None else seen.get(order.id)
            applied = None if row is None else Seen(row.CHANGED_AT, row.VERSION,
                                                     row.PDF_WAIT_SINCE)
        return Local(order, current, state, rows, applied, self.owner)

    def _versions_matter(self, lis_order: LisOrder) -> bool:
        """What was applied of the LIS's versions is read only when it can matter."""
        waits = not self.policy.pdf_required and self.policy.pdf_wait.total_seconds() > 0
        return lis_order.changed_at is not None or lis_order.version is not None or waits

    def _carry_out(self, conn: Connection, local: Local, result: Plan, now: datetime, *,
                   log_now: bool) -> Applied:
        """Write ``result`` for the order in the caller's transaction."""
        order = local.asked
        applied = Applied(result.outcome, notes=result.notes)
        if not result.writes:
            self._lines(result.lines, applied, order, log_now)
            return applied
        now_site = self.site_time(now)
        if result.publish is not None:
            self.pdfs.publish(result.publish)  # before the rows that name it
        rows = result.rows
        if rows.any:
            orders.change_results(conn, order.id, rows.insert, rows.update, rows.delete)
        if result.status is not None:
            orders.set_order_status(conn, order.id, result.status,
                                    now_site if result.synced else None)
        if result.mail is not None:
            applied.events = self._mail(conn, order, result, now, now_site)
        for message in result.admin_log:
            bitrix.add_event_log(conn, self.fitter, item_id=order.external_id,
                                 description=message, now_site=now_site, site_id=self.site_id)
        bookkeeping.save_state(conn, order, now, result.state, exists=local.state is not None)
        if result.seen is not None:
            versions.save(conn, order.id, exists=local.seen is not None,
                          changed_at=result.seen.changed_at, version=result.seen.version,
                          pdf_wait_since=result.seen.pdf_wait_since)
        self._lines(result.lines, applied, order, log_now)
        return applied

    def _mail(self, conn: Connection, order: orders.PendingOrder, result: Plan, now: datetime,
              now_site: datetime) -> int:
        mail = result.mail
        assert mail is not None
        if mail.kind == "updated":
            decision = self.notifier.order_updated(
                conn, order_id=order.id, external_id=order.external_id, user_id=order.user_id,
                version=mail.version, now_site=now_site)
        else:
            decision = self.notifier.order_ready(
                conn, order_id=order.id, external_id=order.external_id, user_id=order.user_id,
                now_site=now_site)
            result.state.update(MAIL_STATE=decision.state, MAIL_EVENT_ID=decision.event_id,
                                NOTIFIED_AT=now)
        self._mail_lines(result, order, decision.state, decision.event_id)
        return 0 if decision.event_id is None else 1

    @staticmethod
    def _mail_lines(result: Plan, order: orders.PendingOrder, state: str,
                    event_id: int | None) -> None:
        for _level, event, fields in result.lines:
            if event == "order.completed":
                fields.update(mail=state, mail_event=event_id)
            elif event == "order.corrected":
                fields.update(mail=event_id is not None)
        if event_id is None and result.mail is not None and result.mail.kind == "ready":
            result.lines.append(("warning", "mail.skipped", {
                "order": order.external_id, "reason": state, "user_id": order.user_id}))

    @staticmethod
    def _lines(lines: list[tuple[str, str, dict[str, Any]]], applied: Applied,
               order: orders.PendingOrder, log_now: bool) -> None:
        if not log_now:
            applied.lines.extend((level, event, {"order": order.external_id, **fields})
                                 for level, event, fields in lines)
            return
        for level, event, fields in lines:
            getattr(log, level)(event, **fields)

    # -- several first completions ---------------------------------------------------------------

    def complete_batch(self, conn: Connection, batch: Sequence[Completion], now: datetime
                       ) -> list[Applied]:
        """First completions of several orders in ONE transaction: what ``apply`` writes for
        each, with one statement for all their locks, one for their users, one for their
        result rows, one for their statuses and one for their bookkeeping. Their mails are
        one INSERT too where the database returns each row's ID (``orders_ready``).

        The batch holds distinct orders with no result rows of labsync's; one that turns
        out to have rows (an older agent's), or no bookkeeping row yet where the database
        cannot upsert it, or whose plan is anything but a plain completion, is written on
        its own, in this same transaction. Log lines are returned in ``Applied.lines`` for
        the caller to write once it has committed.
        """
        locked = orders.lock_orders(conn, [c.order.id for c in batch])
        ids = [c.order.id for c in batch if self._versions_matter(c.lis_order)]
        seen = versions.get_many(conn, ids) if ids else {}
        new_rows = bookkeeping.upserts(conn.dialect.name)
        outcomes: list[Applied] = []
        done: list[_Done] = []
        for c in batch:
            current, state, stored = locked.get(c.order.id) or (None, None, 0)
            local = self._local(conn, c.order, current, state, stored, c.lis_order, seen)
            result = planner.plan(local, Answer(c.lis_order, c.pdf), now, self.policy)
            if (stored or (state is None and not new_rows) or result.outcome != "completed"
                    or result.admin_log or result.rows.update or result.rows.delete):
                outcomes.append(self._carry_out(conn, local, result, now, log_now=False))
                continue
            if result.publish is not None:
                self.pdfs.publish(result.publish)
            applied = Applied("completed", notes=result.notes)
            outcomes.append(applied)
            done.append(_Done(c.order, result, applied, local.seen is not None))
        now_site = self.site_time(now)
        self._notify_all(conn, [d for d in done if d.plan.mail is not None], now, now_site)
        orders.insert_results(conn, [{**row, "ORDER_ID": d.order.id}
                                     for d in done for row in d.plan.rows.insert])
        orders.mark_completed(conn, [d.order.id for d in done], now_site)
        bookkeeping.save_states(conn, [(d.order, d.plan.state) for d in done], now)
        versions.save_many(conn, [(d.order.id, d.seen_exists, d.plan.seen) for d in done
                                  if d.plan.seen is not None])
        for d in done:
            self._lines(d.plan.lines, d.applied, d.order, log_now=False)
        return outcomes

    def _notify_all(self, conn: Connection, done: Sequence[_Done], now: datetime,
                    now_site: datetime) -> None:
        """The ready mails of a batch's orders (``_mail`` for each, in fewer statements)."""
        if not done:
            return
        decisions = self.notifier.orders_ready(
            conn, [ReadyOrder(d.order.id, d.order.external_id, d.order.user_id) for d in done],
            now_site)
        for d, decision in zip(done, decisions, strict=True):
            d.plan.state.update(MAIL_STATE=decision.state, MAIL_EVENT_ID=decision.event_id,
                                NOTIFIED_AT=now)
            self._mail_lines(d.plan, d.order, decision.state, decision.event_id)
            d.applied.events = 0 if decision.event_id is None else 1

    # -- failure -------------------------------------------------------------------------------

    def record_failure(self, conn: Connection, order: orders.PendingOrder, error: LabsyncError,
                       now: datetime, *, admin_log: bool = True) -> None:
        """Count the failure, back off, and tell the admin log once per new problem.

        ``admin_log=False``: the caller reports the problem itself, once for many orders.
        """
        kind = getattr(error, "kind", type(error).__name__)
        state = bookkeeping.get_state(conn, order.id)
        result = planner.failure(order, state, kind, str(error)[:1000], now, self.policy,
                                 admin_log=admin_log)
        bookkeeping.save_state(conn, order, now, result.state, exists=state is not None)
        if result.admin_log is not None:
            bitrix.add_event_log(conn, self.fitter, item_id=order.external_id,
                                 description=result.admin_log, now_site=self.site_time(now),
                                 site_id=self.site_id)
