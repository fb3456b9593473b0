"""Queries on the site's lab tables and labsync's own bookkeeping of each order."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from labsync.model import PENDING_STATUSES
from labsync.store.tables import labsync_orders, local_lab_orders, local_lab_results

PENDING = tuple(status.value for status in PENDING_STATUSES)  # as local_lab_orders.STATUS has them
RESULT_COLUMNS = (
    "TEST_CODE", "TEST_NAME", "RESULT_VALUE", "RESULT_UNIT", "REFERENCE_MIN",
    "REFERENCE_MAX", "IS_ABNORMAL", "RESULT_DATE", "PDF_PATH",
)


@dataclass(frozen=True, slots=True)
class PendingOrder:
    """A row of ``local_lab_orders`` that labsync asks the LIS about.

    Either still pending, or (``recheck``) completed recently and asked again for
    corrections; then ``results_hash`` is the fingerprint of what the site shows now.
    """

    id: int
    external_id: str
    user_id: int
    status: str | None
    order_date: date | None
    recheck: bool = False
    results_hash: str | None = None
    # labsync's bookkeeping as the page read it (None: labsync has not seen the order yet).
    # Enough to poll a quiet order without re-reading it (``save_quiet``).
    first_seen_at: datetime | None = None
    stale_at: datetime | None = None
    results_count: int | None = None
    # A completed order published without its PDF (pdf.required = false): asked for it again.
    pdf_missing: bool = False


def free(now_utc: datetime, dead: Collection[str] = ()) -> ColumnElement[bool]:
    """An order's claim is free: nobody holds it, its lease ran out, or its owner is dead."""
    s = labsync_orders
    clauses = [s.c.LEASE_OWNER.is_(None), s.c.LEASE_UNTIL < now_utc]
    if dead:
        clauses.append(s.c.LEASE_OWNER.in_(sorted(dead)))
    return or_(*clauses)


def pending_page(
    conn: Connection, *, after_id: int, limit: int, now_utc: datetime, due_only: bool = True,
    recheck_since: datetime | None = None, dead: Collection[str] = (),
    held_by: Collection[str] = (),
) -> list[PendingOrder]:
    """The next ``limit`` orders to ask about, with ID above ``after_id`` (keyset paging).

    Pending orders, and with ``recheck_since`` completed orders completed since then that
    still have a recheck scheduled. ``due_only`` skips orders whose next poll time is still
    ahead. Orders another instance holds a live claim on are skipped always; ``dead`` names
    owners known to be dead, whose claims are not live; ``held_by`` keeps only the orders
    these (dead) owners hold.
    """
    o, s = local_lab_orders, labsync_orders
    due = or_(s.c.NEXT_POLL_AT.is_(None), s.c.NEXT_POLL_AT <= now_utc) if due_only else true()
    wanted = and_(or_(o.c.STATUS.in_(PENDING), o.c.STATUS.is_(None)), due)
    if recheck_since is not None:
        recheck_due = s.c.NEXT_POLL_AT <= now_utc if due_only else true()
        wanted = or_(wanted, and_(o.c.STATUS == "completed", s.c.COMPLETED_AT >= recheck_since,
                                  s.c.NEXT_POLL_AT.is_not(None), recheck_due))
    query = (
        _PENDING_SELECT
        .where(o.c.ID > after_id, wanted, free(now_utc, dead),
               s.c.LEASE_OWNER.in_(sorted(held_by)) if held_by else true())
        .order_by(o.c.ID)
        .limit(limit)
    )
    return _pending(conn, query)


def pending_by_external_ids(conn: Connection, external_ids: Collection[str], *,
                            recheck_since: datetime | None) -> list[PendingOrder]:
    """The local orders a change feed's page or an inbox delivery may update, in one
    indexed lookup: pending ones with these ids, and completed ones completed since
    ``recheck_since`` (a correction). An id the site does not have is simply absent."""
    if not external_ids:
        return []
    o, s = local_lab_orders, labsync_orders
    wanted = or_(o.c.STATUS.in_(PENDING), o.c.STATUS.is_(None))
    if recheck_since is not None:
        wanted = or_(wanted, and_(o.c.STATUS == "completed",
                                  s.c.COMPLETED_AT >= recheck_since))
    return _pending(conn, _PENDING_SELECT.where(
        o.c.EXTERNAL_ORDER_ID.in_(sorted(set(external_ids))), wanted).order_by(o.c.ID))


def oldest_pending_date(conn: Connection) -> date | None:
    """The ``ORDER_DATE`` of the oldest pending order (None: nothing is pending); where a
    change feed read for the first time begins."""
    o = local_lab_orders
    value = conn.execute(select(func.min(o.c.ORDER_DATE)).where(
        or_(o.c.STATUS.in_(PENDING), o.c.STATUS.is_(None)))).scalar_one()
    if isinstance(value, datetime):
        return value.date()
    return value


def known_external_ids(conn: Connection, external_ids: Collection[str]) -> set[str]:
    """Which of these ids the site has an order for, whatever its status."""
    if not external_ids:
        return set()
    o = local_lab_orders
    return set(conn.execute(select(o.c.EXTERNAL_ORDER_ID).where(
        o.c.EXTERNAL_ORDER_ID.in_(sorted(set(external_ids))))).scalars())


_PENDING_SELECT = (
    select(local_lab_orders.c.ID, local_lab_orders.c.EXTERNAL_ORDER_ID,
           local_lab_orders.c.USER_ID, local_lab_orders.c.STATUS, local_lab_orders.c.ORDER_DATE,
           labsync_orders.c.RESULTS_HASH, labsync_orders.c.FIRST_SEEN_AT,
           labsync_orders.c.STALE_AT, labsync_orders.c.RESULTS_COUNT, labsync_orders.c.PDF_PATH)
    .select_from(local_lab_orders.outerjoin(
        labsync_orders, labsync_orders.c.ORDER_ID == local_lab_orders.c.ID))
)


def _pending(conn: Connection, query: Select[Any]) -> list[PendingOrder]:
    return [PendingOrder(id=r.ID, external_id=r.EXTERNAL_ORDER_ID, user_id=r.USER_ID,
                         status=r.STATUS, order_date=r.ORDER_DATE,
                         recheck=r.STATUS == "completed", results_hash=r.RESULTS_HASH,
                         first_seen_at=r.FIRST_SEEN_AT, stale_at=r.STALE_AT,
                         results_count=r.RESULTS_COUNT,
                         pdf_missing=r.STATUS == "completed" and r.PDF_PATH is None)
            for r in conn.execute(query)]


def lock_order(conn: Connection, order_id: int, *, recheck: bool = False
               ) -> tuple[PendingOrder | None, Any, int]:
    """Re-read the order and its bookkeeping inside the caller's transaction, holding both
    rows locked until commit (one round trip). The bookkeeping is None if there is none;
    it has the columns a first completion reads, or with ``recheck`` those a correction
    reads.

    The third item is how many result rows the order has now, read under the order's
    lock, which every labsync writer of its results holds first.
    """
    query, columns = (_LOCK_RECHECK, _RECHECK_STATE) if recheck else (_LOCK_ORDER, _STATE)
    row = conn.execute(query, {"order_id": order_id}).first()
    if row is None:
        return None, None, 0
    state = None
    if row.s_ORDER_ID is not None:
        state = _State(**{name: getattr(row, f"s_{name}") for name in columns})
    current = PendingOrder(id=order_id, external_id=row.EXTERNAL_ORDER_ID, user_id=row.USER_ID,
                           status=row.STATUS, order_date=None)
    return current, state, int(row.STORED_RESULTS or 0)


def lock_orders(conn: Connection, order_ids: Sequence[int]
                ) -> dict[int, tuple[PendingOrder, Any, int]]:
    """``lock_order`` for several orders in one statement (locked in ID order), by ID.
    An order that is gone is missing from the answer."""
    locked: dict[int, tuple[PendingOrder, Any, int]] = {}
    for row in conn.execute(_LOCK_ORDERS, {"order_ids": list(order_ids)}):
        state = None
        if row.s_ORDER_ID is not None:
            state = _State(**{name: getattr(row, f"s_{name}") for name in _STATE})
        current = PendingOrder(id=row.ID, external_id=row.EXTERNAL_ORDER_ID,
                               user_id=row.USER_ID, status=row.STATUS, order_date=None)
        locked[row.ID] = (current, state, int(row.STORED_RESULTS or 0))
    return locked


def _locking_select(state_columns: Sequence[str], which: Any) -> Select[Any]:
    o, s, r = local_lab_orders, labsync_orders, local_lab_results
    return (
        select(o.c.ID, o.c.EXTERNAL_ORDER_ID, o.c.USER_ID, o.c.STATUS,
               *[s.c[name].label(f"s_{name}") for name in state_columns],
               select(func.count()).where(r.c.ORDER_ID == o.c.ID)
               .scalar_subquery().label("STORED_RESULTS"))
        .select_from(o.outerjoin(s, s.c.ORDER_ID == o.c.ID))
        .where(which)
        .order_by(o.c.ID)
        .with_for_update()
    )


# Built once: these run for every order, and building them each time cost more CPU than
# executing them. Narrow on purpose: the driver's CPU grows with every column returned.
_STATE = ("ORDER_ID", "LEASE_OWNER", "POLLS", "FIRST_SEEN_AT", "STALE_AT", "NOTIFIED_AT")
_RECHECK_STATE = ("ORDER_ID", "LEASE_OWNER", "POLLS", "COMPLETED_AT", "PDF_PATH",
                  "RESULTS_VERSION", "UPDATE_NOTIFIED_VERSION")
_ONE = local_lab_orders.c.ID == bindparam("order_id")
_LOCK_ORDER = _locking_select(_STATE, _ONE)
_LOCK_RECHECK = _locking_select(_RECHECK_STATE, _ONE)
_LOCK_ORDERS = _locking_select(_STATE, local_lab_orders.c.ID.in_(
    bindparam("order_ids", expanding=True)))


class _State:
    """A ``labsync_orders`` row read by ``lock_order``: its columns as attributes."""

    def __init__(self, **columns: Any) -> None:
        self.__dict__.update(columns)


def find_order(conn: Connection, external_id: str) -> Any:
    return conn.execute(
        select(local_lab_orders).where(local_lab_orders.c.EXTERNAL_ORDER_ID == external_id)
    ).first()


def set_order_status(
    conn: Connection, order_id: int, status: str, synced_at: datetime | None
) -> None:
    params: dict[str, Any] = {"b_id": order_id, "STATUS": status}
    if synced_at is not None:
        params["SYNCED_AT"] = synced_at.replace(microsecond=0)
    conn.execute(_UPDATE_ORDER, params)  # SET comes from the parameters' column names


# The per-order statements are built once (see _LOCK_ORDER); each UPDATE's SET clause is
# taken from the parameters given, which SQLAlchemy compiles once per set of columns.
_UPDATE_ORDER = update(local_lab_orders).where(local_lab_orders.c.ID == bindparam("b_id"))


# -- results --------------------------------------------------------------------------------


def result_key(code: str | None, name: str | None) -> str:
    """What identifies a result row within its order: its code, or its name without one."""
    return code if code else f"name:{name}"


def stored_results(conn: Connection, order_id: int) -> list[dict[str, Any]]:
    """The order's result rows now, locked (the caller holds the order's lock)."""
    return [dict(row) for row in conn.execute(_EXISTING_RESULTS, {"order_id": order_id})
            .mappings()]


def change_results(conn: Connection, order_id: int, insert_rows: Sequence[Mapping[str, Any]],
                   updates: Sequence[tuple[int, Mapping[str, Any]]],
                   delete_ids: Sequence[int]) -> None:
    """Carry out a planned change of the order's rows (``results.diff_rows``): updates in
    place by ID, deletions, and the new rows as one multi-row INSERT."""
    for row_id, changed in updates:
        conn.execute(_UPDATE_RESULT, {"b_id": row_id, **changed})
    if delete_ids:
        r = local_lab_results
        conn.execute(delete(r).where(r.c.ID.in_(list(delete_ids))))
    if insert_rows:
        conn.execute(_INSERT_RESULTS, [dict(row, ORDER_ID=order_id) for row in insert_rows])


_EXISTING_RESULTS = (
    select(local_lab_results).where(local_lab_results.c.ORDER_ID == bindparam("order_id"))
    .order_by(local_lab_results.c.ID).with_for_update()
)
_UPDATE_RESULT = update(local_lab_results).where(local_lab_results.c.ID == bindparam("b_id"))
_INSERT_RESULTS = insert(local_lab_results)


def insert_results(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """New result rows (with their ORDER_ID), of any number of orders: one multi-row INSERT."""
    if rows:
        conn.execute(_INSERT_RESULTS, list(rows))


def mark_completed(conn: Connection, order_ids: Sequence[int], synced_at: datetime) -> None:
    """``STATUS='completed'`` and ``SYNCED_AT`` for orders the caller holds locked."""
    if order_ids:
        conn.execute(_COMPLETE_ORDERS, {"b_ids": list(order_ids),
                                        "b_synced": synced_at.replace(microsecond=0)})


_COMPLETE_ORDERS = (
    update(local_lab_orders)
    .where(local_lab_orders.c.ID.in_(bindparam("b_ids", expanding=True)))
    .values(STATUS="completed", SYNCED_AT=bindparam("b_synced"))
)


def result_rows(conn: Connection, order_id: int) -> list[Any]:
    r = local_lab_results
    return list(conn.execute(select(r).where(r.c.ORDER_ID == order_id).order_by(r.c.TEST_NAME,
                                                                                  r.c.ID)))
