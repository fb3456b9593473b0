"""labsync's bookkeeping of each order (``labsync_orders``) and of each pass
(``labsync_passes``): polls, failures, next poll times, results' fingerprints, mail state.

Written in the order's own transaction, under its row lock (``orders.lock_order``), except
quiet polls (``save_quiet``), whose statements carry the claim as their guard.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, or_, select, update
from sqlalchemy.dialects import mysql, sqlite

from labsync.store.orders import PendingOrder
from labsync.store.tables import labsync_orders, labsync_passes, local_lab_orders


def get_state(conn: Connection, order_id: int) -> Any:
    return conn.execute(select(labsync_orders).where(labsync_orders.c.ORDER_ID == order_id)).first()


def save_state(
    conn: Connection, order: PendingOrder, now_utc: datetime, values: Mapping[str, Any],
    *, exists: bool,
) -> None:
    """Insert or update the order's bookkeeping row. The caller holds the order's row lock."""
    if exists:
        conn.execute(_UPDATE_STATE, {"b_order_id": order.id, **values})
    else:
        conn.execute(_INSERT_STATE, {"ORDER_ID": order.id, "EXTERNAL_ORDER_ID": order.external_id,
                                     "FIRST_SEEN_AT": now_utc, **values})


def save_states(conn: Connection, states: Sequence[tuple[PendingOrder, Mapping[str, Any]]],
                now_utc: datetime) -> None:
    """Update several orders' bookkeeping rows (the caller holds the orders' locks): one
    statement for each set of columns. A row that does not exist yet is inserted where the
    database ``upserts``; elsewhere the rows must exist.

    On MySQL, MariaDB and SQLite that statement is a multi-row upsert, which the driver
    sends as one statement where an executemany of UPDATEs is one statement per row. The
    rows exist and are locked, so only its update part ever applies; its insert part is
    what a new row would get (``save_state``), should one have gone meanwhile.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for order, values in states:
        groups.setdefault(tuple(sorted(values)), []).append({
            "ORDER_ID": order.id, "EXTERNAL_ORDER_ID": order.external_id,
            "FIRST_SEEN_AT": now_utc, **values})
    for columns, params in groups.items():
        upsert = _upsert_states(conn.dialect.name, columns)
        if upsert is not None:
            conn.execute(upsert, params)
            continue
        conn.execute(_UPDATE_STATE, [
            {"b_order_id": p["ORDER_ID"], **{c: p[c] for c in columns}} for p in params])


def upserts(dialect: str) -> bool:
    """Whether ``save_states`` also inserts rows that do not exist yet on this database."""
    return dialect in ("mysql", "mariadb", "sqlite")


@functools.cache
def _upsert_states(dialect: str, columns: tuple[str, ...]) -> Any:
    """``INSERT … ON DUPLICATE KEY UPDATE`` / ``ON CONFLICT DO UPDATE`` of ``columns``, or
    None for a database with neither (built once per set of columns)."""
    s = labsync_orders
    if dialect in ("mysql", "mariadb"):
        mysql_insert = mysql.insert(s)
        return mysql_insert.on_duplicate_key_update(
            {c: mysql_insert.inserted[c] for c in columns})
    if dialect == "sqlite":
        sqlite_insert = sqlite.insert(s)
        return sqlite_insert.on_conflict_do_update(
            index_elements=[s.c.ORDER_ID], set_={c: sqlite_insert.excluded[c] for c in columns})
    return None


def save_quiet(conn: Connection, polls: Sequence[QuietPoll], *, owner: str, now_utc: datetime
               ) -> int:
    """Record polls that changed nothing but the order's status, in a few statements.

    Every write holds only while ``owner`` still has the order's claim, so no lock or
    re-read is needed: an order another instance took meanwhile is left to it. A status
    moves from ``received`` (or none) to ``processing`` only while the order is still the
    same user's order in that state: one UPDATE per order, sent as one executemany (one
    UPDATE for 500 orders, checking each by a row-value ``IN`` list, took 0.5 s on
    MariaDB 10.11). The bookkeeping goes out as one UPDATE per LIS status and minute of
    the next poll (next polls are rounded down to the minute for that).
    Returns how many bookkeeping rows were written.
    """
    moves = [{"b_id": p.order_id, "b_user_id": p.user_id, "b_external_id": p.external_id,
              "b_owner": owner} for p in polls if p.to_processing]
    if moves:
        conn.execute(_QUIET_TO_PROCESSING, moves)
    groups: dict[tuple[str, datetime], list[int]] = {}
    for p in polls:
        due = p.next_poll_at.replace(second=0, microsecond=0)
        groups.setdefault((p.lis_status, due), []).append(p.order_id)
    written = 0
    for (lis_status, due), ids in groups.items():
        for start in range(0, len(ids), _IN_LIST):
            result = conn.execute(_QUIET_POLL, {
                "b_ids": ids[start:start + _IN_LIST], "b_owner": owner, "b_now": now_utc,
                "b_lis_status": lis_status, "b_next": due})
            written += int(result.rowcount)
    return written


_IN_LIST = 500  # order ids per statement


@dataclass(frozen=True, slots=True)
class QuietPoll:
    """An order the LIS still has in hand, with no results: when to ask again, and whether
    the site should now show it as ``processing``."""

    order_id: int
    external_id: str
    user_id: int
    lis_status: str
    next_poll_at: datetime
    to_processing: bool = False


_UPDATE_STATE = update(labsync_orders).where(labsync_orders.c.ORDER_ID == bindparam("b_order_id"))
_INSERT_STATE = insert(labsync_orders)
_QUIET_POLL = (
    update(labsync_orders)
    .where(labsync_orders.c.ORDER_ID.in_(bindparam("b_ids", expanding=True)),
           labsync_orders.c.LEASE_OWNER == bindparam("b_owner"))
    .values(LAST_POLL_AT=bindparam("b_now"), POLLS=labsync_orders.c.POLLS + 1, FAILURES=0,
            LIS_STATUS=bindparam("b_lis_status"), NEXT_POLL_AT=bindparam("b_next"),
            LEASE_OWNER=None, LEASE_UNTIL=None)
)
_QUIET_TO_PROCESSING = (
    update(local_lab_orders)
    .where(local_lab_orders.c.ID == bindparam("b_id"),
           local_lab_orders.c.USER_ID == bindparam("b_user_id"),
           local_lab_orders.c.EXTERNAL_ORDER_ID == bindparam("b_external_id"),
           or_(local_lab_orders.c.STATUS == "received", local_lab_orders.c.STATUS.is_(None)),
           select(labsync_orders.c.ORDER_ID)
           .where(labsync_orders.c.ORDER_ID == bindparam("b_id"),
                  labsync_orders.c.LEASE_OWNER == bindparam("b_owner"))
           .exists())
    .values(STATUS="processing")
)


def record_pass(conn: Connection, values: Mapping[str, Any]) -> int:
    key = conn.execute(insert(labsync_passes).values(dict(values))).inserted_primary_key
    assert key is not None
    return int(key[0])


def finish_pass(conn: Connection, pass_id: int, values: Mapping[str, Any]) -> None:
    conn.execute(update(labsync_passes).where(labsync_passes.c.ID == pass_id).values(dict(values)))


