"""What one LIS answer does to one order: the order's single database transaction.

Called by the pass (``labsync.sync``) in its own thread, one order at a time. Everything an
order's completion writes is written here, in one transaction, under the order's row lock:
the PDF moved into place, the result rows, ``STATUS``/``SYNCED_AT``, the mail event and
labsync's bookkeeping. Failures are recorded here too, in a transaction of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection

from labsync.config import Config
from labsync.errors import LabsyncError
from labsync.mail import SmtpNotifier
from labsync.model import LisOrder, OrderStatus
from labsync.notify import BitrixNotifier, ReadyOrder
from labsync.pdfs import PdfStore, StagedPdf
from labsync.polling import failure_delay, is_stale, poll_delay, recheck_delay
from labsync.results import results_hash, to_rows
from labsync.store import bitrix, orders
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
    pdf: StagedPdf


@dataclass(slots=True)
class _Done:
    """An order ``complete_batch`` completes: what the batch's shared statements write."""

    order: orders.PendingOrder
    values: dict[str, Any]  # its bookkeeping
    applied: Applied
    results: int
    notify: bool  # its ready mail is still to be queued


class OrderApplier:
    """Writes one order's new state, given what the LIS said about it."""

    def __init__(self, config: Config, fitter: TextFitter, pdfs: PdfStore, owner: str) -> None:
        self.config = config
        self.fitter = fitter
        self.pdfs = pdfs
        self.owner = owner
        self.notifier: BitrixNotifier | SmtpNotifier
        if config.notify.backend == "smtp" and config.smtp is not None:
            self.notifier = SmtpNotifier(config.notify, config.smtp, zone=config.site.timezone)
        else:
            self.notifier = BitrixNotifier(config.notify, fitter)
        self.interval = timedelta(seconds=config.sync.interval)
        self.stale_after = timedelta(seconds=config.sync.stale_after)
        self.recheck_window = timedelta(days=config.sync.recheck_days)

    def fingerprint(self, lis_order: LisOrder) -> str:
        """The fingerprint of the rows these results would become (to notice corrections)."""
        rows, _ = self._rows(lis_order, None)
        return results_hash(rows)

    def _rows(self, lis_order: LisOrder, pdf_path: str | None
              ) -> tuple[list[dict[str, Any]], list[str]]:
        """The order's result rows, and a line for each value that had to be fitted."""
        rows, notes = to_rows(lis_order.results, zone=self.config.site.timezone,
                              fitter=self.fitter, pdf_path=pdf_path)
        return rows, [f"test {n.test}, {n.column}: {n.change}" for n in notes]

    # -- success ------------------------------------------------------------------------------

    def apply(self, conn: Connection, order: orders.PendingOrder, lis_order: LisOrder,
              pdf: StagedPdf | None, now: datetime) -> Applied:
        """The order's transaction. ``now`` is UTC, naive."""
        current, state, stored = orders.lock_order(conn, order.id)
        if not self._still_ours(order, current, state):
            return Applied("skipped")
        assert current is not None
        now_site = self.site_time(now)
        values = self._polled(state, lis_order, now)
        status = lis_order.status
        applied = Applied("pending")
        if status is OrderStatus.CANCELLED:
            orders.set_order_status(conn, order.id, "cancelled", now_site)
            applied.outcome = "cancelled"
            values["NEXT_POLL_AT"] = None
            log.info("order.cancelled")
        elif status in (OrderStatus.PROCESSING, OrderStatus.COMPLETED):
            pdf_path = None
            if status is OrderStatus.COMPLETED:
                assert pdf is not None
                pdf_path = self._publish(pdf, values, now)
            rows, applied.notes = self._rows(lis_order, pdf_path)
            if rows or status is OrderStatus.COMPLETED or stored:
                changes = orders.write_results(conn, order.id, rows, stored=stored > 0)
            else:  # still in the lab, nothing reported yet, nothing of ours stored: no work
                changes = orders.ResultChanges()
            values.update(RESULTS_HASH=results_hash(rows), RESULTS_COUNT=len(rows))
            if status is OrderStatus.COMPLETED:
                orders.set_order_status(conn, order.id, "completed", now_site)
                applied.outcome = "completed"
                if state is None or state.NOTIFIED_AT is None:
                    applied.events = self._notify(conn, order, now, now_site, values)
                log.info("order.completed", results=len(rows), inserted=changes.inserted,
                         updated=changes.updated, deleted=changes.deleted, pdf=pdf_path,
                         mail=values.get("MAIL_STATE", "sent before"),
                         mail_event=values.get("MAIL_EVENT_ID"))
            else:
                if current.status != "processing":
                    orders.set_order_status(conn, order.id, "processing", None)
                log.info("order.processing", results=len(rows), changed=changes.any)
        else:
            log.info("order.received")
        if applied.outcome == "pending":
            self._schedule(conn, order, state, now, values)
        orders.save_state(conn, order, now, values, exists=state is not None)
        return applied

    def complete_batch(self, conn: Connection, batch: Sequence[Completion], now: datetime
                       ) -> list[Applied]:
        """First completions of several orders in ONE transaction: what ``apply`` writes for
        each, with one statement for all their locks, one for their users, one for their
        result rows, one for their statuses and one for their bookkeeping. Their mails are
        one INSERT too where the database returns each row's ID (``orders_ready``).

        The pass batches only orders with no result rows of labsync's; one that turns out
        to have rows (an older agent's) or no bookkeeping row yet goes through ``apply``,
        in this same transaction. Log lines are returned in ``Applied.lines`` for the
        caller to write once the transaction has committed.
        """
        locked = orders.lock_orders(conn, [c.order.id for c in batch])
        now_site = self.site_time(now)
        outcomes: list[Applied] = []
        rows_of_all: list[dict[str, Any]] = []
        done: list[_Done] = []
        for c in batch:
            with structlog.contextvars.bound_contextvars(order=c.order.external_id):
                outcomes.append(self._complete_one(conn, c, locked.get(c.order.id), now,
                                                   rows_of_all, done))
        self._notify_all(conn, [d for d in done if d.notify], now, now_site)
        orders.insert_results(conn, rows_of_all)
        orders.mark_completed(conn, [d.order.id for d in done], now_site)
        orders.save_states(conn, [(d.order, d.values) for d in done], now)
        for d in done:
            d.applied.lines.append(("info", "order.completed", {
                "order": d.order.external_id, "results": d.results, "inserted": d.results,
                "updated": 0, "deleted": 0, "pdf": d.values["PDF_PATH"],
                "mail": d.values.get("MAIL_STATE", "sent before"),
                "mail_event": d.values.get("MAIL_EVENT_ID")}))
        return outcomes

    def _complete_one(self, conn: Connection, c: Completion, locked: Any, now: datetime,
                      rows_of_all: list[dict[str, Any]], done: list[_Done]) -> Applied:
        """One order of ``complete_batch``: its rows and bookkeeping join the batch's."""
        current, state, stored = locked or (None, None, 0)
        if stored or state is None:
            return self.apply(conn, c.order, c.lis_order, c.pdf, now)
        if not self._still_ours(c.order, current, state):
            return Applied("skipped")
        values = self._polled(state, c.lis_order, now)
        pdf_path = self._publish(c.pdf, values, now)
        rows, notes = self._rows(c.lis_order, pdf_path)
        rows_of_all.extend({**row, "ORDER_ID": c.order.id} for row in rows)
        values.update(RESULTS_HASH=results_hash(rows), RESULTS_COUNT=len(rows))
        applied = Applied("completed", notes=notes)
        done.append(_Done(c.order, values, applied, len(rows),
                          notify=state.NOTIFIED_AT is None))
        return applied

    def _notify_all(self, conn: Connection, done: Sequence[_Done], now: datetime,
                    now_site: datetime) -> None:
        """The ready mails of a batch's orders (``_notify`` for each, in fewer statements)."""
        if not done:
            return
        decisions = self.notifier.orders_ready(
            conn, [ReadyOrder(d.order.id, d.order.external_id, d.order.user_id) for d in done],
            now_site)
        for d, decision in zip(done, decisions, strict=True):
            d.values.update(MAIL_STATE=decision.state, MAIL_EVENT_ID=decision.event_id,
                            NOTIFIED_AT=now)
            if decision.event_id is None:
                d.applied.lines.append(("warning", "mail.skipped", {
                    "order": d.order.external_id, "reason": decision.state,
                    "user_id": d.order.user_id}))
            else:
                d.applied.events = 1

    def _still_ours(self, order: orders.PendingOrder, current: orders.PendingOrder | None,
                    state: Any) -> bool:
        """Under the order's lock: still pending, the same user's, and claimed by no one else."""
        if (current is None or current.user_id != order.user_id
                or current.external_id != order.external_id
                or current.status not in (*orders.PENDING, None)):
            log.info("order.changed_meanwhile", status=current and current.status)
            return False
        if state is not None and state.LEASE_OWNER not in (None, self.owner):
            log.warning("order.lease_lost", holder=state.LEASE_OWNER)
            return False
        return True

    def _polled(self, state: Any, lis_order: LisOrder, now: datetime) -> dict[str, Any]:
        """The bookkeeping every answered poll writes."""
        return {
            "LAST_POLL_AT": now, "POLLS": (state.POLLS if state else 0) + 1, "FAILURES": 0,
            "LIS_STATUS": lis_order.status.value, "LEASE_OWNER": None, "LEASE_UNTIL": None,
        }

    def _publish(self, pdf: StagedPdf, values: dict[str, Any], now: datetime) -> str:
        """Move the form into place; a first completion's bookkeeping."""
        pdf_path = str(self.pdfs.publish(pdf))
        values.update(PDF_PATH=pdf_path, PDF_SHA256=pdf.sha256, PDF_BYTES=pdf.size,
                      COMPLETED_AT=now, RESULTS_VERSION=1,
                      NEXT_POLL_AT=self._next_recheck(timedelta(0), now))
        return pdf_path

    def quiet(self, order: orders.PendingOrder, lis_order: LisOrder, now: datetime
              ) -> orders.QuietPoll | None:
        """The bookkeeping of a poll that changes nothing on the site, or None.

        Most polls find an order still in the lab with nothing reported and nothing of
        labsync's to undo. Such a poll writes at most the order's move to ``processing``,
        which one conditional UPDATE can guard, so it needs no lock and no re-read:
        ``orders.save_quiet`` records it with the other quiet polls of the page, guarded by
        the claim. Anything else (results, an order turning stale) goes through ``apply``.
        """
        status = lis_order.status
        if order.recheck or lis_order.results or order.results_count:
            return None
        if status not in (OrderStatus.RECEIVED, OrderStatus.PROCESSING):
            return None
        age = self.age(order, order.first_seen_at, now)
        if is_stale(age, self.stale_after) and order.stale_at is None:
            return None  # marked stale once, with its admin-log line: apply does that
        delay = poll_delay(age, interval=self.interval, stale_after=self.stale_after)
        return orders.QuietPoll(order.id, order.external_id, order.user_id, status.value,
                                now + delay, to_processing=(status is OrderStatus.PROCESSING
                                                            and order.status != "processing"))

    # -- corrections ----------------------------------------------------------------------------

    def recheck(self, conn: Connection, order: orders.PendingOrder, lis_order: LisOrder,
                pdf: StagedPdf | None, now: datetime) -> Applied:
        """A completed order asked again: apply a correction, if the LIS made one."""
        current, state, stored = orders.lock_order(conn, order.id, recheck=True)
        if (current is None or state is None or current.status != "completed"
                or current.user_id != order.user_id
                or state.LEASE_OWNER not in (None, self.owner)):
            return Applied("skipped")
        since = now - (state.COMPLETED_AT or now)
        values: dict[str, Any] = {
            "LAST_POLL_AT": now, "POLLS": (state.POLLS or 0) + 1, "FAILURES": 0,
            "LIS_STATUS": lis_order.status.value, "LEASE_OWNER": None, "LEASE_UNTIL": None,
            "NEXT_POLL_AT": self._next_recheck(since, now),
        }
        applied = Applied("rechecked")
        if lis_order.status is not OrderStatus.COMPLETED:
            # The site keeps showing the released results; a human should look at this.
            log.warning("order.recheck_status_changed", lis_status=lis_order.status.value)
        else:
            pdf_path = state.PDF_PATH or str(self.pdfs.final_path(order.user_id,
                                                                   order.external_id))
            if pdf is not None:
                pdf_path = str(self.pdfs.publish(pdf))
                values.update(PDF_PATH=pdf_path, PDF_SHA256=pdf.sha256, PDF_BYTES=pdf.size)
            rows, applied.notes = self._rows(lis_order, pdf_path)
            changes = orders.write_results(conn, order.id, rows, stored=stored > 0)
            if changes.any:
                version = (state.RESULTS_VERSION or 1) + 1
                values.update(RESULTS_HASH=results_hash(rows), RESULTS_COUNT=len(rows),
                              RESULTS_VERSION=version)
                orders.set_order_status(conn, order.id, "completed", self.site_time(now))
                applied.outcome = "corrected"
                if (state.UPDATE_NOTIFIED_VERSION or 1) < version:
                    decision = self.notifier.order_updated(
                        conn, order_id=order.id, external_id=order.external_id,
                        user_id=order.user_id, version=version, now_site=self.site_time(now))
                    values["UPDATE_NOTIFIED_VERSION"] = version
                    applied.events = 1 if decision.event_id is not None else 0
                log.info("order.corrected", version=version, inserted=changes.inserted,
                         updated=changes.updated, deleted=changes.deleted,
                         mail=applied.events == 1)
        orders.save_state(conn, order, now, values, exists=True)
        return applied

    def _next_recheck(self, since_completion: timedelta, now: datetime) -> datetime | None:
        delay = recheck_delay(since_completion, window=self.recheck_window)
        return None if delay is None else now + delay

    def _notify(self, conn: Connection, order: orders.PendingOrder, now: datetime,
                now_site: datetime, values: dict[str, Any]) -> int:
        decision = self.notifier.order_ready(conn, order_id=order.id,
                                             external_id=order.external_id,
                                             user_id=order.user_id, now_site=now_site)
        values.update(MAIL_STATE=decision.state, MAIL_EVENT_ID=decision.event_id,
                      NOTIFIED_AT=now)
        if decision.event_id is None:
            log.warning("mail.skipped", reason=decision.state, user_id=order.user_id)
            return 0
        return 1  # the order.completed line names the mail event

    def _schedule(self, conn: Connection, order: orders.PendingOrder, state: Any,
                  now: datetime, values: dict[str, Any]) -> None:
        """Set the next poll by the order's age; mark it stale once when it is too old."""
        age = self.age(order, state.FIRST_SEEN_AT if state else None, now)
        values["NEXT_POLL_AT"] = now + poll_delay(age, interval=self.interval,
                                                  stale_after=self.stale_after)
        if is_stale(age, self.stale_after) and (state is None or state.STALE_AT is None):
            values["STALE_AT"] = now
            days = age.days
            log.warning("order.stale", age_days=days)
            bitrix.add_event_log(
                conn, self.fitter, item_id=order.external_id, now_site=self.site_time(now),
                site_id=self.config.notify.site_id,
                description=f"Order {order.external_id}: still pending in the LIS after "
                            f"{days} days; labsync now asks about it once a day")

    # -- failure ------------------------------------------------------------------------------

    def record_failure(self, conn: Connection, order: orders.PendingOrder, error: LabsyncError,
                       now: datetime, *, admin_log: bool = True) -> None:
        """Count the failure, back off, and tell the admin log once per new problem.

        ``admin_log=False``: the caller reports the problem itself, once for many orders.
        """
        kind = getattr(error, "kind", type(error).__name__)
        message = str(error)[:1000]
        state = orders.get_state(conn, order.id)
        failures = (state.FAILURES if state else 0) + 1
        delay = max(failure_delay(failures),
                    poll_delay(self.age(order, state.FIRST_SEEN_AT if state else None, now),
                               interval=self.interval,
                               stale_after=self.stale_after))
        orders.save_state(conn, order, now, {
            "LAST_POLL_AT": now, "POLLS": (state.POLLS if state else 0) + 1,
            "FAILURES": failures, "FAILURES_TOTAL": (state.FAILURES_TOTAL if state else 0) + 1,
            "LAST_ERROR_KIND": kind, "LAST_ERROR": message, "LAST_ERROR_AT": now,
            "NEXT_POLL_AT": now + delay, "LEASE_OWNER": None, "LEASE_UNTIL": None,
        }, exists=state is not None)
        # One admin-log line per new problem, not one every pass while it lasts.
        if admin_log and (state is None or state.LAST_ERROR != message or state.FAILURES == 0):
            bitrix.add_event_log(conn, self.fitter, item_id=order.external_id,
                                 description=_about(order.external_id, message),
                                 now_site=self.site_time(now),
                                 site_id=self.config.notify.site_id)

    # -- time ---------------------------------------------------------------------------------

    def site_time(self, now_utc: datetime) -> datetime:
        """UTC (naive) → the site's naive local time, as its DATETIME columns hold it."""
        zone = self.config.site.timezone
        return now_utc.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)

    def age(self, order: orders.PendingOrder, first_seen: datetime | None, now: datetime
            ) -> timedelta:
        """How long the order has been waiting, for the polling schedule.

        Counted from when labsync first saw it (within one pass of its arrival):
        ``ORDER_DATE`` is only a date, and counting from its midnight would make a
        morning's orders look hours old on their first poll. An order dated more than a
        day before labsync first saw it (a backlog labsync found when it was installed)
        counts from its date instead.
        """
        start = first_seen or now
        if order.order_date is not None:
            midnight = datetime.combine(order.order_date, time(), self.config.site.timezone)
            ordered = midnight.astimezone(UTC).replace(tzinfo=None)
            if ordered < start - timedelta(days=1):
                start = ordered
        return max(now - start, timedelta(0))


def _about(external_id: str, message: str) -> str:
    """``Order X: message``, without naming the order twice when the message already does."""
    for lead in (f"order {external_id}: ", f"order {external_id!r}: "):
        if message.lower().startswith(lead.lower()):
            message = message[len(lead):]
            break
    return f"Order {external_id}: {message}"
