"""``labsync_cursors``: where each change feed stands, as the adapter's opaque cursor.

A cursor is saved in the same transaction as the page of orders it follows, never before:
a crash between the two leaves the old cursor, and the page is read again (re-reading an
applied version costs nothing).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, insert, select, update

from labsync.store.tables import labsync_cursors


def get(conn: Connection, name: str) -> str | None:
    """The feed's cursor, or None before its first page."""
    c = labsync_cursors.c
    return conn.execute(select(c.FEED_CURSOR).where(c.NAME == name)).scalar()


def save(conn: Connection, name: str, cursor: str | None, now: datetime) -> None:
    c = labsync_cursors.c
    done = conn.execute(update(labsync_cursors).where(c.NAME == name)
                        .values(FEED_CURSOR=cursor, UPDATED_AT=now))
    if not done.rowcount:
        conn.execute(insert(labsync_cursors).values(NAME=name, FEED_CURSOR=cursor,
                                                    UPDATED_AT=now))
