"""``labsync_deliveries``: the inbox deliveries whose orders have been applied.

``mark`` runs in the same transaction as the deliveries' orders; ``applied`` tells the
engine which of the deliveries it is handed again (a crash came between the commit and the
inbox's ``done``) need no second application.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import Connection, insert, select

from labsync.store.tables import labsync_deliveries


def applied(conn: Connection, delivery_ids: Collection[str]) -> set[str]:
    """Which of these deliveries were applied before: one indexed lookup."""
    if not delivery_ids:
        return set()
    c = labsync_deliveries.c
    return set(conn.execute(select(c.DELIVERY_ID).where(
        c.DELIVERY_ID.in_(sorted(set(delivery_ids))))).scalars())


def mark(conn: Connection, applied_now: Sequence[tuple[str, int]], *, now: datetime) -> None:
    """Record deliveries as applied, each ``(id, how many orders it held)``: one INSERT."""
    if applied_now:
        conn.execute(insert(labsync_deliveries), [
            {"DELIVERY_ID": delivery_id, "APPLIED_AT": now, "ORDERS": count}
            for delivery_id, count in applied_now])
