"""Claims: several labsync instances never work on the same order at the same time.

An instance claims a page of orders by writing its owner token and a lease expiry into
their ``labsync_orders`` rows, with one conditional UPDATE that only takes rows nobody
holds (or whose lease ran out). Under InnoDB the UPDATE locks each row it matches and
re-reads it after any wait, so two instances racing for a row cannot both win. The order's
own transaction later checks, under the order's row lock, that the lease is still its own,
so an instance that lost its connection (and so its lease) to another one gives the order
up instead of writing it twice.

A claim also ends when its owner dies: ``dead`` names the owners whose named lock is free
(``labsync.store.liveness``), and their claims are taken like expired ones, so orders in the
hands of a killed process wait seconds, not ``sync.lease``.

Why not ``SELECT … FOR UPDATE SKIP LOCKED``: it needs MySQL 8 or MariaDB 10.6, and Bitrix
hosts often run older servers. A conditional UPDATE works on every MySQL, MariaDB and
SQLite, and it needs no long-held row locks on the site's own ``local_lab_orders``.
SQLite databases are single-instance anyway (``labsync.instance``).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import Connection, and_, insert, or_, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from labsync.store.orders import PendingOrder, free
from labsync.store.tables import labsync_orders


def new_owner() -> str:
    """A token naming this instance: host, pid and a random part (a restart is a new owner)."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _insert_missing(conn: Connection, page: Sequence[PendingOrder], now: datetime) -> None:
    rows = [{"ORDER_ID": o.id, "EXTERNAL_ORDER_ID": o.external_id, "FIRST_SEEN_AT": now}
            for o in page]
    dialect = conn.dialect.name
    if dialect in ("mysql", "mariadb"):
        stmt = mysql_insert(labsync_orders)
        conn.execute(stmt.on_duplicate_key_update(ORDER_ID=stmt.inserted.ORDER_ID), rows)
    elif dialect == "sqlite":
        conn.execute(sqlite_insert(labsync_orders).on_conflict_do_nothing(), rows)
    else:  # pragma: no cover - labsync supports MySQL/MariaDB and SQLite only
        conn.execute(insert(labsync_orders), rows)


def claim(conn: Connection, page: Sequence[PendingOrder], *, owner: str, now: datetime,
          until: datetime, dead: Collection[str] = ()) -> set[int]:
    """Claim what can be claimed of ``page`` until ``until``; return the claimed order IDs.

    Free are orders nobody holds, whose lease ran out, or whose owner is in ``dead``.
    """
    if not page:
        return set()
    s = labsync_orders
    ids = [o.id for o in page]
    _insert_missing(conn, page, now)
    conn.execute(
        update(s)
        .where(s.c.ORDER_ID.in_(ids), or_(free(now, dead), s.c.LEASE_OWNER == owner))
        .values(LEASE_OWNER=owner, LEASE_UNTIL=until)
    )
    return set(conn.execute(
        select(s.c.ORDER_ID).where(and_(s.c.ORDER_ID.in_(ids), s.c.LEASE_OWNER == owner))
    ).scalars())


def release_all(conn: Connection, owner: str) -> int:
    """Give up every claim of ``owner`` (end of a pass, or a clean stop)."""
    s = labsync_orders
    result = conn.execute(update(s).where(s.c.LEASE_OWNER == owner)
                          .values(LEASE_OWNER=None, LEASE_UNTIL=None))
    return int(result.rowcount or 0)
