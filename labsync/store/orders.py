"""Queries on the site's lab tables and labsync's own bookkeeping of each order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    true,
    update,
)

from labsync.store.tables import labsync_orders, labsync_passes, local_lab_orders, local_lab_results

PENDING = ("received", "processing")
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


def _order_from_row(row: Any) -> PendingOrder:
    return PendingOrder(id=row.ID, external_id=row.EXTERNAL_ORDER_ID, user_id=row.USER_ID,
                        status=row.STATUS, order_date=row.ORDER_DATE)


def pending_page(
    conn: Connection, *, after_id: int, limit: int, now_utc: datetime, due_only: bool = True,
    recheck_since: datetime | None = None,
) -> list[PendingOrder]:
    """The next ``limit`` orders to ask about, with ID above ``after_id`` (keyset paging).

    Pending orders, and with ``recheck_since`` completed orders completed since then that
    still have a recheck scheduled. ``due_only`` skips orders whose next poll time is still
    ahead. Orders another instance holds a live claim on are skipped always.
    """
    o, s = local_lab_orders, labsync_orders
    due = or_(s.c.NEXT_POLL_AT.is_(None), s.c.NEXT_POLL_AT <= now_utc) if due_only else true()
    wanted = and_(or_(o.c.STATUS.in_(PENDING), o.c.STATUS.is_(None)), due)
    if recheck_since is not None:
        recheck_due = s.c.NEXT_POLL_AT <= now_utc if due_only else true()
        wanted = or_(wanted, and_(o.c.STATUS == "completed", s.c.COMPLETED_AT >= recheck_since,
                                  s.c.NEXT_POLL_AT.is_not(None), recheck_due))
    query = (
        select(o.c.ID, o.c.EXTERNAL_ORDER_ID, o.c.USER_ID, o.c.STATUS, o.c.ORDER_DATE,
               s.c.RESULTS_HASH)
        .select_from(o.outerjoin(s, s.c.ORDER_ID == o.c.ID))
        .where(o.c.ID > after_id, wanted,
               or_(s.c.LEASE_OWNER.is_(None), s.c.LEASE_UNTIL < now_utc))
        .order_by(o.c.ID)
        .limit(limit)
    )
    return [PendingOrder(id=r.ID, external_id=r.EXTERNAL_ORDER_ID, user_id=r.USER_ID,
                         status=r.STATUS, order_date=r.ORDER_DATE,
                         recheck=r.STATUS == "completed", results_hash=r.RESULTS_HASH)
            for r in conn.execute(query)]


def lock_order(conn: Connection, order_id: int) -> tuple[PendingOrder | None, Any]:
    """Re-read the order and its bookkeeping inside the caller's transaction, holding both
    rows locked until commit (one round trip). The bookkeeping is None if there is none."""
    row = conn.execute(_LOCK_ORDER, {"order_id": order_id}).first()
    if row is None:
        return None, None
    state = None
    if row.s_ORDER_ID is not None:
        state = _State(**{name: getattr(row, f"s_{name}") for name in _STATE_COLUMNS})
    return _order_from_row(row), state


# Built once: this runs for every order, and building a 30-column select each time cost
# more CPU than executing it.
_STATE_COLUMNS = tuple(c.name for c in labsync_orders.c)
_LOCK_ORDER = (
    select(local_lab_orders.c.ID, local_lab_orders.c.EXTERNAL_ORDER_ID,
           local_lab_orders.c.USER_ID, local_lab_orders.c.STATUS, local_lab_orders.c.ORDER_DATE,
           *[c.label(f"s_{c.name}") for c in labsync_orders.c])
    .select_from(local_lab_orders.outerjoin(
        labsync_orders, labsync_orders.c.ORDER_ID == local_lab_orders.c.ID))
    .where(local_lab_orders.c.ID == bindparam("order_id"))
    .with_for_update()
)


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
    values: dict[str, Any] = {"STATUS": status}
    if synced_at is not None:
        values["SYNCED_AT"] = synced_at.replace(microsecond=0)
    conn.execute(update(local_lab_orders).where(local_lab_orders.c.ID == order_id).values(values))


# -- results --------------------------------------------------------------------------------


def result_key(code: str | None, name: str | None) -> str:
    """What identifies a result row within its order: its code, or its name without one."""
    return code if code else f"name:{name}"


def _keyed(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Rows by key; a key seen again gets ``#2``, ``#3``… so repeated tests stay distinct."""
    seen: dict[str, int] = {}
    keyed: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        base = result_key(row["TEST_CODE"], row["TEST_NAME"])
        seen[base] = seen.get(base, 0) + 1
        keyed[base if seen[base] == 1 else f"{base}#{seen[base]}"] = row
    return keyed


@dataclass(frozen=True, slots=True)
class ResultChanges:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def any(self) -> bool:
        return bool(self.inserted or self.updated or self.deleted)


def write_results(
    conn: Connection, order_id: int, rows: Sequence[Mapping[str, Any]]
) -> ResultChanges:
    """Make the order's result rows equal ``rows``: insert new tests, update changed ones in
    place, delete tests the LIS no longer lists (and twins an older agent left behind).

    Idempotent: the second call with the same rows changes nothing. New rows go in as one
    multi-row INSERT.
    """
    r = local_lab_results
    existing_rows = conn.execute(
        select(r).where(r.c.ORDER_ID == order_id).order_by(r.c.ID).with_for_update()
    ).mappings().all()
    existing = _keyed([dict(row) for row in existing_rows])
    wanted = _keyed(rows)
    to_insert = [dict(row, ORDER_ID=order_id) for k, row in wanted.items() if k not in existing]
    to_delete = [row["ID"] for k, row in existing.items() if k not in wanted]
    updated = 0
    for key, row in wanted.items():
        old = existing.get(key)
        if old is None:
            continue
        changed = {c: row[c] for c in RESULT_COLUMNS if old[c] != row[c]}
        if changed:
            conn.execute(update(r).where(r.c.ID == old["ID"]).values(changed))
            updated += 1
    if to_delete:
        conn.execute(delete(r).where(r.c.ID.in_(to_delete)))
    if to_insert:
        conn.execute(insert(r), to_insert)
    return ResultChanges(inserted=len(to_insert), updated=updated, deleted=len(to_delete))


def result_rows(conn: Connection, order_id: int) -> list[Any]:
    r = local_lab_results
    return list(conn.execute(select(r).where(r.c.ORDER_ID == order_id).order_by(r.c.TEST_NAME,
                                                                                  r.c.ID)))


# -- labsync's bookkeeping ----------------------------------------------------------------------


def get_state(conn: Connection, order_id: int) -> Any:
    return conn.execute(select(labsync_orders).where(labsync_orders.c.ORDER_ID == order_id)).first()


def save_state(
    conn: Connection, order: PendingOrder, now_utc: datetime, values: Mapping[str, Any],
    *, exists: bool,
) -> None:
    """Insert or update the order's bookkeeping row. The caller holds the order's row lock."""
    s = labsync_orders
    if exists:
        conn.execute(update(s).where(s.c.ORDER_ID == order.id).values(dict(values)))
    else:
        conn.execute(insert(s).values(ORDER_ID=order.id, EXTERNAL_ORDER_ID=order.external_id,
                                      FIRST_SEEN_AT=now_utc, **values))


def record_pass(conn: Connection, values: Mapping[str, Any]) -> int:
    key = conn.execute(insert(labsync_passes).values(dict(values))).inserted_primary_key
    assert key is not None
    return int(key[0])


def finish_pass(conn: Connection, pass_id: int, values: Mapping[str, Any]) -> None:
    conn.execute(update(labsync_passes).where(labsync_passes.c.ID == pass_id).values(dict(values)))


