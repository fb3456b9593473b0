"""``labsync status`` and ``labsync order``: what ops and support ask, read from the database."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import Engine, and_, func, select
from sqlalchemy.exc import SQLAlchemyError

from labsync.clock import utc_now
from labsync.config import Config
from labsync.errors import StoreError
from labsync.store.bookkeeping import get_state
from labsync.store.db import describe_db_error, make_engine
from labsync.store.orders import PENDING, find_order, result_rows
from labsync.store.tables import (
    b_event,
    labsync_cursors,
    labsync_deliveries,
    labsync_orders,
    labsync_passes,
    local_lab_orders,
)

_AGE_BUCKETS = (("under 1 day", 1), ("1-7 days", 7), ("7-30 days", 30), ("over 30 days", None))




def with_engine(config: Config, work: Any) -> Any:
    """``work(engine)`` on a short-lived engine; a database error becomes ``StoreError``."""
    engine = make_engine(config.database)
    try:
        return work(engine)
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(exc)) from exc
    finally:
        engine.dispose()


def collect_status(config: Config) -> dict[str, Any]:
    """Pending orders by status and age, failures in the last 24 h, the last pass, the mail."""
    return with_engine(config, lambda engine: _status(config, engine))


def _status(config: Config, engine: Engine) -> dict[str, Any]:
    o, s, p = local_lab_orders, labsync_orders, labsync_passes
    today = datetime.now(config.site.timezone).date()
    since = utc_now() - timedelta(hours=24)
    with engine.connect() as conn:
        pending: dict[str, dict[str, int]] = {}
        rows = conn.execute(select(o.c.STATUS, o.c.ORDER_DATE, func.count())
                            .where(o.c.STATUS.in_(PENDING))
                            .group_by(o.c.STATUS, o.c.ORDER_DATE))
        for status, order_date, count in rows:
            bucket = _age_bucket(today, order_date)
            pending.setdefault(status, {}).setdefault(bucket, 0)
            pending[status][bucket] += count
        failures = [
            {"order": r.EXTERNAL_ORDER_ID, "failures": r.FAILURES, "kind": r.LAST_ERROR_KIND,
             "error": r.LAST_ERROR, "at": r.LAST_ERROR_AT, "next_poll": r.NEXT_POLL_AT}
            for r in conn.execute(
                select(s).where(and_(s.c.FAILURES > 0, s.c.LAST_ERROR_AT >= since))
                .order_by(s.c.LAST_ERROR_AT.desc()).limit(50))
        ]
        stale = [
            {"order": r.EXTERNAL_ORDER_ID, "stale_since": r.STALE_AT,
             "next_poll": r.NEXT_POLL_AT}
            for r in conn.execute(
                select(s.c.EXTERNAL_ORDER_ID, s.c.STALE_AT, s.c.NEXT_POLL_AT)
                .select_from(s.join(o, o.c.ID == s.c.ORDER_ID))
                .where(s.c.STALE_AT.is_not(None), o.c.STATUS.in_(PENDING))
                .order_by(s.c.STALE_AT).limit(50))
        ]
        stale_total = conn.execute(
            select(func.count()).select_from(s.join(o, o.c.ID == s.c.ORDER_ID))
            .where(s.c.STALE_AT.is_not(None), o.c.STATUS.in_(PENDING))).scalar_one()
        last = conn.execute(select(p).order_by(p.c.ID.desc()).limit(1)).mappings().first()
        queued = conn.execute(
            select(func.count()).select_from(b_event).where(
                b_event.c.SUCCESS_EXEC == "N",
                b_event.c.EVENT_NAME.in_([config.notify.event_name,
                                          config.notify.updated_event_name]))).scalar_one()
        feeds = [{"feed": r.NAME, "cursor": r.FEED_CURSOR, "updated": r.UPDATED_AT}
                 for r in conn.execute(select(labsync_cursors).order_by(labsync_cursors.c.NAME))]
        delivered = conn.execute(select(func.count()).select_from(labsync_deliveries).where(
            labsync_deliveries.c.APPLIED_AT >= since)).scalar_one()
    return {
        "feeds": feeds,
        "inbox": _inbox(config, lambda inbox: dict(inbox.counts())),
        "deliveries_applied_24h": delivered,
        "pending": pending,
        "pending_total": sum(sum(b.values()) for b in pending.values()),
        "stale_total": stale_total,
        "stale": stale,
        "failures_24h": failures,
        "last_pass": dict(last) if last else None,
        "mail_queued_unsent": queued,
    }


def _inbox(config: Config, ask: Callable[[Any], Any]) -> Any:
    """``ask(adapter)`` when the configured adapter has an inbox (it is read from disk,
    nothing is reached), else None."""
    from labsync.app import client_options
    from labsync.lis.base import Capability
    from labsync.lis.registry import adapter_capabilities, make_client

    if Capability.INBOX not in adapter_capabilities(config.lis.adapter):
        return None
    adapter = make_client(config.lis, **client_options(config))
    try:
        return ask(adapter)
    finally:
        adapter.close()


def _age_bucket(today: Any, order_date: Any) -> str:
    if order_date is None:
        return "no order date"
    age = (today - order_date).days
    for label, limit in _AGE_BUCKETS:
        if limit is None or age < limit:
            return label
    return _AGE_BUCKETS[-1][0]


def render_status(report: dict[str, Any]) -> str:
    lines = [f"pending orders: {report['pending_total']}"]
    for status, buckets in sorted(report["pending"].items()):
        parts = ", ".join(f"{label}: {n}" for label, n in buckets.items())
        lines.append(f"  {status}: {parts}")
    last = report["last_pass"]
    if last:
        lines.append(
            f"last pass: #{last['ID']} started {_utc(last['STARTED_AT'])}, "
            f"outcome {last['OUTCOME'] or 'running'}, checked {last['CHECKED']}, completed "
            f"{last['COMPLETED']}, failed {last['FAILED']}, mail events {last['EVENTS']}, "
            f"{(last['DURATION_MS'] or 0) / 1000:.1f} s")
    else:
        lines.append("last pass: none yet")
    lines.append(f"stale orders (pending over sync.stale_after, asked once a day): "
                 f"{report['stale_total']}")
    for entry in report["stale"]:
        lines.append(f"  {entry['order']}: stale since {_utc(entry['stale_since'])}")
    lines.append(f"mail events waiting for the site to send: {report['mail_queued_unsent']}")
    for feed in report.get("feeds", ()):
        lines.append(f"change feed {feed['feed']}: at {feed['cursor'] or 'its start'}, "
                     f"read {_utc(feed['updated'])}")
    inbox = report.get("inbox")
    if inbox is not None:
        held = ", ".join(f"{state}: {n}" for state, n in sorted(inbox.items())) or "empty"
        lines.append(f"inbox: {held}; deliveries applied in the last 24 h: "
                     f"{report.get('deliveries_applied_24h', 0)}")
    failures = report["failures_24h"]
    lines.append(f"orders failing in the last 24 h: {len(failures)}")
    for f in failures:
        lines.append(f"  {f['order']}: {f['failures']}x, {f['kind']}: {f['error']} "
                     f"(next try {_utc(f['next_poll']) if f['next_poll'] else 'next pass'})")
    return "\n".join(lines)


def collect_order(config: Config, external_id: str) -> dict[str, Any] | None:
    """Everything labsync knows of one order, or None if the site has no such order."""

    def work(engine: Engine) -> dict[str, Any] | None:
        with engine.connect() as conn:
            order = find_order(conn, external_id)
            if order is None:
                return None
            state = get_state(conn, order.ID)
            results = result_rows(conn, order.ID)
        return {
            "order": dict(order._mapping),
            "labsync": dict(state._mapping) if state else None,
            "results": [dict(r._mapping) for r in results],
        }

    found: dict[str, Any] | None = with_engine(config, work)
    if found is not None:
        messages = _inbox(config, lambda inbox: [dict(m) for m in
                                                  inbox.messages_for(external_id)])
        if messages is not None:
            found["messages"] = messages
    return found


def render_order(report: dict[str, Any], *, zone: tzinfo | str,
                 backend: str = "bitrix") -> str:
    """The text of ``labsync order``. Every time says which clock it is: the site's columns
    (``ORDER_DATE``, ``SYNCED_AT``) in site time, labelled with ``zone`` (site.timezone);
    labsync's own bookkeeping in UTC."""
    order, state = report["order"], report["labsync"]

    def site(value: Any) -> str:
        return f"{_when(value)} (site, {zone})"

    lines = [f"order {order['EXTERNAL_ORDER_ID']} (local ID {order['ID']}, user "
             f"{order['USER_ID']}): {order['STATUS']}",
             f"  ordered {site(order['ORDER_DATE']) if order['ORDER_DATE'] else 'no date'}; "
             f"synced {site(order['SYNCED_AT']) if order['SYNCED_AT'] else 'never'}"]
    if state is None:
        lines.append("  labsync has not polled it yet")
    else:
        error = state["LAST_ERROR"]
        lines += [
            f"  LIS status: {_lis_status(state)}",
            f"  first seen {_utc(state['FIRST_SEEN_AT'])}; polls {state['POLLS']}; last poll "
            f"{_utc(state['LAST_POLL_AT']) if state['LAST_POLL_AT'] else 'none'}",
            f"  failures: {state['FAILURES']} in a row, {state['FAILURES_TOTAL']} in all; last "
            + (f"error{_at(state['LAST_ERROR_AT'])} ({state['LAST_ERROR_KIND']}): {error}"
               if error else "error: none"),
            f"  next poll: {_utc(state['NEXT_POLL_AT']) if state['NEXT_POLL_AT'] else 'next pass'}"
            + (f"; stale since {_utc(state['STALE_AT'])}" if state["STALE_AT"] else "")
            + (f"; claimed by {state['LEASE_OWNER']} until {_utc(state['LEASE_UNTIL'])}"
               if state["LEASE_OWNER"] else ""),
            f"  PDF: {state['PDF_PATH'] or 'none'}"
            + (f" ({state['PDF_BYTES']} bytes)" if state["PDF_BYTES"] else ""),
            f"  mail: {state['MAIL_STATE'] or 'not yet'}"
            + (f", {'labsync_outbox' if backend == 'smtp' else 'b_event'} "
               f"#{state['MAIL_EVENT_ID']}" if state["MAIL_EVENT_ID"] else "")
            + (f", at {_utc(state['NOTIFIED_AT'])}" if state["NOTIFIED_AT"] else ""),
        ]
    if "messages" in report:
        lines.append(f"  messages in the inbox: {len(report['messages'])}")
        for m in report["messages"]:
            reason = f": {m['reason']}" if m.get("reason") else ""
            lines.append(f"    {m.get('id')}: {m.get('state')}"
                         f"{_at(m.get('received_at'))}{reason}")
    lines.append(f"  results stored: {len(report['results'])}")
    for r in report["results"]:
        flag = "  [abnormal]" if r["IS_ABNORMAL"] == "Y" else ""
        lines.append(f"    {r['TEST_NAME']}: {r['RESULT_VALUE']} {r['RESULT_UNIT'] or ''}{flag}")
    return "\n".join(lines)


def _lis_status(state: Mapping[str, Any]) -> str:
    """What the LIS last said of the order, or why there is nothing to show."""
    status, failures, kind = state["LIS_STATUS"], state["FAILURES"], state["LAST_ERROR_KIND"]
    if status is not None:
        if not failures:
            return str(status)
        polls = "the last poll" if failures == 1 else f"the last {failures} polls"
        return f"{status} (its last answer; {polls} failed)"
    # No poll has had an answer yet: every one failed, or none was made.
    if not state["POLLS"]:
        return "not asked yet"
    if kind == "unknown_order":
        return "unknown to the LIS (it answered 404: no such order, or not yet)"
    polls = state["POLLS"]
    return f"no answer yet ({'its one poll' if polls == 1 else f'all {polls} polls'} failed)"


def _when(value: Any) -> str:
    """A date or a naive datetime, to the second, without its zone (the caller labels it)."""
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    if isinstance(value, date):
        return f"{value:%Y-%m-%d}"
    return str(value)


def _utc(value: Any) -> str:
    """One of labsync's own columns: naive UTC."""
    return f"{_when(value)} UTC"


def _at(value: Any) -> str:
    return f" {_utc(value)}" if value is not None else ""
