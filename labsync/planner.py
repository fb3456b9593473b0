"""What one LIS answer does to one order, decided apart from writing it.

``plan(local, answer, now, policy) -> Plan`` is pure: no database, no files, no clock. It
is given what the site and labsync's bookkeeping hold for the order (``Local``, read under
the order's row lock by the executor), what the LIS said (``Answer``: its order and the
checked, staged PDF, if any) and the rules (``Policy``), and returns everything the order's
one transaction must write: result rows to insert, update and delete; the new status; the
mail to queue; labsync's bookkeeping; lines for the admin log. ``labsync.execute`` carries
plans out, one by one or in batches, and every path (a first completion, a batch, a quiet
poll, a correction, a failure) decides here, so the checks live in one place.

The promises (property-tested in ``tests/test_planner.py``):

- a plan carried out and planned again from the state it left writes nothing new;
- an answer older than the one applied (``LisOrder.changed_at``) never replaces it;
- a plan touches only its own order: the order it was asked about, still the same user's
  and claimed by no one else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from labsync.clock import utc_naive
from labsync.model import LisOrder, OrderStatus
from labsync.pdfs import StagedPdf
from labsync.polling import failure_delay, is_stale, order_age, poll_delay, recheck_delay
from labsync.results import RowChanges, diff_rows, results_hash, to_rows
from labsync.store.bookkeeping import QuietPoll
from labsync.store.db import TextFitter
from labsync.store.orders import PENDING, PendingOrder


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules a plan follows, from ``[site]``, ``[sync]`` and ``[pdf]``."""

    zone: ZoneInfo
    fitter: TextFitter
    interval: timedelta
    stale_after: timedelta
    recheck_window: timedelta
    pdf_required: bool = True  # never completed without a valid PDF
    pdf_wait: timedelta = timedelta(0)  # with pdf_required False: how long to wait for one
    # With a change feed: the feed brings changes, so an order is asked by id only this
    # often (None: no feed, the adaptive rhythm of labsync.polling)
    verify_every: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Seen:
    """What labsync last applied of the LIS's order (``labsync_lis_versions``)."""

    changed_at: datetime | None = None  # UTC, naive
    version: str | None = None
    pdf_wait_since: datetime | None = None  # UTC, naive: completed, its PDF still awaited


@dataclass(frozen=True, slots=True)
class Local:
    """The order as the site and labsync hold it, read under the order's lock.

    ``asked`` is the order as the pass read it before asking the LIS; ``current`` the same
    row re-read under the lock (None: it is gone). ``state`` is its ``labsync_orders`` row
    (None: never seen), ``stored`` its result rows now (with their IDs).
    """

    asked: PendingOrder
    current: PendingOrder | None
    state: Any
    stored: Sequence[Mapping[str, Any]] = ()
    seen: Seen | None = None
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the LIS said: its order and, for a completed one, its PDF (checked, staged)."""

    order: LisOrder
    pdf: StagedPdf | None = None


@dataclass(frozen=True, slots=True)
class Mail:
    """A notification to queue: the "ready" mail, or the "updated" one for ``version``."""

    kind: str  # ready | updated
    version: int = 1


@dataclass
class Plan:
    """Everything one order's transaction writes; nothing at all when ``outcome`` is skipped."""

    outcome: str  # completed | corrected | rechecked | cancelled | pending | skipped
    status: str | None = None  # new local_lab_orders.STATUS
    synced: bool = False  # SYNCED_AT = now, site time, with the status
    publish: StagedPdf | None = None  # moved into place before the rows are written
    rows: RowChanges = field(default_factory=RowChanges)
    mail: Mail | None = None
    state: dict[str, Any] = field(default_factory=dict)  # labsync_orders values
    seen: Seen | None = None  # what to remember of the LIS's order, when it changed
    admin_log: list[str] = field(default_factory=list)  # b_event_log lines (WARNING)
    notes: list[str] = field(default_factory=list)  # values fitted to their column
    lines: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # to log

    @property
    def writes(self) -> bool:
        return self.outcome != "skipped"


SKIP = "skipped"


def policy(*, zone: ZoneInfo, fitter: TextFitter, interval: float, stale_after: float,
           recheck_days: int, pdf_required: bool = True, pdf_wait: float = 0.0,
           verify_every: timedelta | None = None) -> Policy:
    """The policy from the config's values (seconds and days, as ``[sync]`` and ``[pdf]``
    hold them; ``verify_every`` from an adapter with a change feed)."""
    return Policy(zone=zone, fitter=fitter, interval=timedelta(seconds=interval),
                  stale_after=timedelta(seconds=stale_after),
                  recheck_window=timedelta(days=recheck_days), pdf_required=pdf_required,
                  pdf_wait=timedelta(seconds=pdf_wait), verify_every=verify_every)


def next_ask(age: timedelta, policy: Policy) -> timedelta:
    """How long until a pending order of this age is asked about again: the adaptive
    rhythm, or with a change feed ``verify_every`` (the feed carries the changes)."""
    if policy.verify_every is not None:
        return policy.verify_every
    return poll_delay(age, interval=policy.interval, stale_after=policy.stale_after)


def plan(local: Local, answer: Answer, now: datetime, policy: Policy) -> Plan:
    """The order's plan. ``now`` is UTC, naive."""
    reason = _not_ours(local)
    if reason:
        return Plan(SKIP, lines=[reason])
    lis = answer.order
    if _older(lis, local.seen):
        return Plan(SKIP, lines=[("info", "order.older_answer", {
            "changed_at": str(lis.changed_at), "applied": str(local.seen and
                                                                local.seen.changed_at)})])
    if local.asked.recheck:
        return _recheck(local, answer, now, policy)
    return _first(local, answer, now, policy)


def _not_ours(local: Local) -> tuple[str, str, dict[str, Any]] | None:
    """Why the order is no longer this plan's to write, as a log line; None if it is."""
    asked, current, state = local.asked, local.current, local.state
    wanted = ("completed",) if asked.recheck else (*PENDING, None)
    if (current is None or current.user_id != asked.user_id
            or current.external_id != asked.external_id or current.status not in wanted):
        return ("info", "order.changed_meanwhile", {"status": current and current.status})
    if state is not None and state.LEASE_OWNER not in (None, local.owner):
        return ("warning", "order.lease_lost", {"holder": state.LEASE_OWNER})
    if asked.recheck and state is None:
        return ("info", "order.changed_meanwhile", {"status": current.status})
    return None


def _older(lis: LisOrder, seen: Seen | None) -> bool:
    """Whether the LIS's answer is older than the one already applied."""
    if seen is None or seen.changed_at is None or lis.changed_at is None:
        return False
    return utc_naive(lis.changed_at) < seen.changed_at


def _seen(local: Local, lis: LisOrder, *, pdf_wait_since: datetime | None) -> Seen | None:
    """What to remember of the LIS's order, or None when nothing of it changed."""
    changed_at = utc_naive(lis.changed_at) if lis.changed_at is not None else None
    new = Seen(changed_at, lis.version, pdf_wait_since)
    old = local.seen or Seen()
    if new == old or (changed_at is None and lis.version is None
                      and pdf_wait_since == old.pdf_wait_since):
        return None
    return new


def _polled(state: Any, lis: LisOrder, now: datetime) -> dict[str, Any]:
    """The bookkeeping every answered poll writes."""
    return {"LAST_POLL_AT": now, "POLLS": (state.POLLS if state else 0) + 1, "FAILURES": 0,
            "LIS_STATUS": lis.status.value, "LEASE_OWNER": None, "LEASE_UNTIL": None}


# -- a pending order --------------------------------------------------------------------------


def _first(local: Local, answer: Answer, now: datetime, policy: Policy) -> Plan:
    lis, state, current = answer.order, local.state, local.current
    assert current is not None
    result = Plan("pending", state=_polled(state, lis, now))
    if lis.status is OrderStatus.CANCELLED:
        result.outcome, result.status, result.synced = "cancelled", "cancelled", True
        result.state["NEXT_POLL_AT"] = None
        result.lines.append(("info", "order.cancelled", {}))
        result.seen = _seen(local, lis, pdf_wait_since=None)
        return result
    if lis.status is OrderStatus.RECEIVED:
        result.lines.append(("info", "order.received", {}))
        _schedule(local, now, policy, result)
        result.seen = _seen(local, lis, pdf_wait_since=None)
        return result
    completing = lis.status is OrderStatus.COMPLETED
    wait_since = None
    if completing and answer.pdf is None:
        wait_since = (local.seen.pdf_wait_since if local.seen else None) or now
        if policy.pdf_required or now - wait_since < policy.pdf_wait:
            completing = False  # results stored, shown once the form is here (or waited for)
    pdf_path = str(answer.pdf.final_path) if completing and answer.pdf is not None else None
    rows, result.notes = rows_of(lis, pdf_path, policy)
    result.rows = diff_rows(local.stored, rows)
    result.state.update(RESULTS_HASH=results_hash(rows), RESULTS_COUNT=len(rows))
    if completing:
        result.outcome, result.status, result.synced = "completed", "completed", True
        result.publish = answer.pdf
        result.state.update(COMPLETED_AT=now, RESULTS_VERSION=1,
                            NEXT_POLL_AT=_next_recheck(timedelta(0), now, policy))
        if answer.pdf is not None:
            result.state.update(PDF_PATH=pdf_path, PDF_SHA256=answer.pdf.sha256,
                                PDF_BYTES=answer.pdf.size)
        if state is None or state.NOTIFIED_AT is None:
            result.mail = Mail("ready")
        result.seen = _seen(local, lis, pdf_wait_since=None)
        result.lines.append(("info", "order.completed", {
            "results": len(rows), "inserted": len(result.rows.insert),
            "updated": len(result.rows.update), "deleted": len(result.rows.delete),
            "pdf": pdf_path, "mail": "sent before", "mail_event": None}))
        return result
    if current.status != "processing":
        result.status = "processing"
    if lis.status is OrderStatus.COMPLETED:  # completed in the LIS, its PDF awaited
        result.lines.append(("info", "order.waiting_for_pdf", {
            "results": len(rows), "since": str(wait_since)}))
    else:
        result.lines.append(("info", "order.processing", {"results": len(rows),
                                                          "changed": result.rows.any}))
    _schedule(local, now, policy, result)
    if wait_since is not None and not policy.pdf_required:
        due = wait_since + policy.pdf_wait
        result.state["NEXT_POLL_AT"] = min(result.state["NEXT_POLL_AT"], max(due, now))
    result.seen = _seen(local, lis, pdf_wait_since=wait_since)
    return result


def _schedule(local: Local, now: datetime, policy: Policy, result: Plan) -> None:
    """The next poll by the order's age; the order marked stale once when it is too old."""
    state = local.state
    first_seen = state.FIRST_SEEN_AT if state else None
    age = order_age(local.asked.order_date, first_seen, now, policy.zone)
    result.state["NEXT_POLL_AT"] = now + next_ask(age, policy)
    if is_stale(age, policy.stale_after) and (state is None or state.STALE_AT is None):
        result.state["STALE_AT"] = now
        result.lines.append(("warning", "order.stale", {"age_days": age.days}))
        result.admin_log.append(f"Order {local.asked.external_id}: still pending in the LIS "
                                f"after {age.days} days; labsync now asks about it once a day")


# -- a completed order, asked again -------------------------------------------------------------


def _recheck(local: Local, answer: Answer, now: datetime, policy: Policy) -> Plan:
    """A completed order asked again: a correction, a PDF that came late, or nothing."""
    lis, state, order = answer.order, local.state, local.asked
    since = now - (state.COMPLETED_AT or now)
    result = Plan("rechecked", state=_polled(state, lis, now))
    result.state["NEXT_POLL_AT"] = _next_recheck(since, now, policy)
    if lis.status is not OrderStatus.COMPLETED:
        # The site keeps showing the released results; a human should look at this.
        result.lines.append(("warning", "order.recheck_status_changed",
                             {"lis_status": lis.status.value}))
        return result
    pdf_path = state.PDF_PATH
    if answer.pdf is not None:
        pdf_path = str(answer.pdf.final_path)
        result.publish = answer.pdf
        result.state.update(PDF_PATH=pdf_path, PDF_SHA256=answer.pdf.sha256,
                            PDF_BYTES=answer.pdf.size)
        if state.PDF_PATH is None:
            result.lines.append(("info", "order.pdf_arrived", {"pdf": pdf_path}))
    rows, result.notes = rows_of(lis, pdf_path, policy)
    result.rows = diff_rows(local.stored, rows)
    result.seen = _seen(local, lis, pdf_wait_since=None)
    digest = results_hash(rows)
    if digest == order.results_hash or not result.rows.any:
        return result  # the same results (a PDF that came late is not a correction)
    version = (state.RESULTS_VERSION or 1) + 1
    result.outcome, result.status, result.synced = "corrected", "completed", True
    result.state.update(RESULTS_HASH=digest, RESULTS_COUNT=len(rows), RESULTS_VERSION=version)
    if (state.UPDATE_NOTIFIED_VERSION or 1) < version:
        result.mail = Mail("updated", version)
        result.state["UPDATE_NOTIFIED_VERSION"] = version
    result.lines.append(("info", "order.corrected", {
        "version": version, "inserted": len(result.rows.insert),
        "updated": len(result.rows.update), "deleted": len(result.rows.delete),
        "mail": False}))
    return result


def _next_recheck(since_completion: timedelta, now: datetime, policy: Policy
                  ) -> datetime | None:
    delay = recheck_delay(since_completion, window=policy.recheck_window)
    if delay is None:
        return None
    if policy.verify_every is not None:  # the feed brings corrections and late PDFs
        delay = max(delay, policy.verify_every)
    return now + delay


# -- the fast path and failures -------------------------------------------------------------------


def quiet(order: PendingOrder, lis: LisOrder, now: datetime, policy: Policy
          ) -> QuietPoll | None:
    """The bookkeeping of a poll that changes nothing on the site, or None.

    Most polls find an order still in the lab with nothing reported and nothing of
    labsync's to undo. Such a poll writes at most the order's move to ``processing``, which
    one conditional UPDATE guarded by the claim can do without a lock or a re-read
    (``bookkeeping.save_quiet``). Anything else (results, an order turning stale, a version to
    remember) goes through ``plan``.
    """
    status = lis.status
    if order.recheck or lis.results or order.results_count:
        return None
    if status not in (OrderStatus.RECEIVED, OrderStatus.PROCESSING):
        return None
    if lis.changed_at is not None or lis.version is not None:
        return None  # its version is remembered, under the lock
    age = order_age(order.order_date, order.first_seen_at, now, policy.zone)
    if is_stale(age, policy.stale_after) and order.stale_at is None:
        return None  # marked stale once, with its admin-log line: plan does that
    delay = next_ask(age, policy)
    return QuietPoll(order.id, order.external_id, order.user_id, status.value, now + delay,
                     to_processing=(status is OrderStatus.PROCESSING
                                    and order.status != "processing"))


@dataclass
class FailurePlan:
    """The bookkeeping of a failed order, and its admin-log line (once per new problem)."""

    state: dict[str, Any]
    admin_log: str | None


def failure(order: PendingOrder, state: Any, kind: str, message: str, now: datetime,
            policy: Policy, *, admin_log: bool = True) -> FailurePlan:
    """Count the failure and back off; ``admin_log=False``: the caller reports it itself."""
    failures = (state.FAILURES if state else 0) + 1
    age = order_age(order.order_date, state.FIRST_SEEN_AT if state else None, now, policy.zone)
    delay = max(failure_delay(failures),
                poll_delay(age, interval=policy.interval, stale_after=policy.stale_after))
    values = {
        "LAST_POLL_AT": now, "POLLS": (state.POLLS if state else 0) + 1,
        "FAILURES": failures, "FAILURES_TOTAL": (state.FAILURES_TOTAL if state else 0) + 1,
        "LAST_ERROR_KIND": kind, "LAST_ERROR": message, "LAST_ERROR_AT": now,
        "NEXT_POLL_AT": now + delay, "LEASE_OWNER": None, "LEASE_UNTIL": None,
    }
    new_problem = state is None or state.LAST_ERROR != message or state.FAILURES == 0
    return FailurePlan(values, about(order.external_id, message)
                       if admin_log and new_problem else None)


def about(external_id: str, message: str) -> str:
    """The admin-log text of an order's problem: naming the order once.

    ``Order X: message``, unless the message names the order itself (``results of order
    X: HTTP 503``), which then only gets a capital letter.
    """
    for lead in (f"order {external_id}: ", f"order {external_id!r}: "):
        if message.lower().startswith(lead.lower()):
            message = message[len(lead):]
            break
    else:
        if f"order {external_id}".lower() in message.lower() or \
                f"order {external_id!r}".lower() in message.lower():
            return message[:1].upper() + message[1:]
    return f"Order {external_id}: {message}"


# -- pieces ---------------------------------------------------------------------------------------


def rows_of(lis: LisOrder, pdf_path: str | None, policy: Policy
            ) -> tuple[list[dict[str, Any]], list[str]]:
    """The order's result rows, and a line for each value that had to be fitted."""
    rows, notes = to_rows(lis.results, zone=policy.zone, fitter=policy.fitter,
                          pdf_path=pdf_path)
    return rows, [f"test {n.test}, {n.column}: {n.change}" for n in notes]


def fingerprint(lis: LisOrder, policy: Policy) -> str:
    """The fingerprint of the rows these results would become (to notice corrections)."""
    rows, _ = rows_of(lis, None, policy)
    return results_hash(rows)
