"""``labsync_deliveries``: the inbox deliveries whose orders have been applied.

``mark`` runs in the same transaction as the delivery's orders; ``applied`` tells the
engine that a delivery it is handed again (a crash came between the commit and the
inbox's ``done``) needs no second application.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, insert, select

from labsync.store.tables import labsync_deliveries


def applied(conn: Connection, delivery_id: str) -> bool:
    c = labsync_deliveries.c
    return conn.execute(select(c.DELIVERY_ID).where(c.DELIVERY_ID == delivery_id)).first() \
        is not None


def mark(conn: Connection, delivery_id: str, *, orders: int, now: datetime) -> None:
    conn.execute(insert(labsync_deliveries).values(DELIVERY_ID=delivery_id, APPLIED_AT=now,
                                                   ORDERS=orders))
