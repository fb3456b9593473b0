"""``labsync_versions``: what labsync last applied of each order's LIS version.

Read under the order's lock (the order's row is locked first by every writer), written in
the order's own transaction. Orders whose LIS gives no version have no row here.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from labsync.store.tables import labsync_versions

_GET = select(labsync_versions).where(labsync_versions.c.ORDER_ID == bindparam("order_id"))
_UPDATE = update(labsync_versions).where(labsync_versions.c.ORDER_ID == bindparam("b_id"))


def get(conn: Connection, order_id: int) -> Any:
    """The order's row (CHANGED_AT, VERSION, PDF_WAIT_SINCE), or None."""
    return conn.execute(_GET, {"order_id": order_id}).first()


def get_many(conn: Connection, order_ids: Collection[int]) -> dict[int, Any]:
    """The rows of these orders, by ORDER_ID, in one indexed lookup (absent: no row)."""
    if not order_ids:
        return {}
    v = labsync_versions.c
    rows = conn.execute(select(labsync_versions).where(v.ORDER_ID.in_(sorted(set(order_ids)))))
    return {row.ORDER_ID: row for row in rows}


def save(conn: Connection, order_id: int, *, exists: bool, changed_at: datetime | None,
         version: str | None, pdf_wait_since: datetime | None) -> None:
    values = {"CHANGED_AT": changed_at, "VERSION": version, "PDF_WAIT_SINCE": pdf_wait_since}
    if exists:
        conn.execute(_UPDATE, {"b_id": order_id, **values})
    else:
        conn.execute(insert(labsync_versions).values(ORDER_ID=order_id, **values))


def save_many(conn: Connection, rows: Collection[tuple[int, bool, Any]]) -> None:
    """``save`` for several orders, each ``(order_id, exists, seen)`` with ``seen`` a
    ``planner.Seen``: the new rows in one INSERT, the others one UPDATE each."""
    new: list[tuple[int, dict[str, Any]]] = []
    old: list[tuple[int, dict[str, Any]]] = []
    for order_id, exists, seen in rows:
        values = {"CHANGED_AT": seen.changed_at, "VERSION": seen.version,
                  "PDF_WAIT_SINCE": seen.pdf_wait_since}
        (old if exists else new).append((order_id, values))
    if new:
        conn.execute(insert(labsync_versions), [{"ORDER_ID": order_id, **values}
                                                for order_id, values in new])
    if old:
        conn.execute(_UPDATE, [{"b_id": order_id, **values} for order_id, values in old])
