"""Whether the owner of a claim still lives: one MySQL/MariaDB named lock per instance.

Each instance takes ``GET_LOCK('labsync/<sha1 of its owner token>', 0)`` on a connection of
its own and keeps that connection open while it lives. The server releases the lock the
moment the connection ends: a SIGKILL, an OOM kill, a power cut or a dropped network all
close it. Any other instance asks ``IS_USED_LOCK`` for the owners of the claims in its way,
and takes over the orders of the owners whose lock is free at once, instead of waiting out
``sync.lease``. The lease stays for an owner that lives but is stuck.

Named locks work on MySQL 5.7+ and MariaDB 10.0+, need no privilege, and are never written
to the binary log: they are only ever asked in SELECTs, and the UPDATE that takes the orders
over names the dead owners as plain values.

SQLite runs one instance at a time (``labsync.instance`` holds a lock file while it works),
so there every owner but this process's own is dead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from datetime import datetime

import structlog
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from labsync.store.db import describe_db_error
from labsync.store.tables import labsync_orders

log = structlog.get_logger("labsync.claims")

LOCK_PREFIX = "labsync/"


def lock_name(owner: str) -> str:
    """The named lock of ``owner``: 48 characters, under MySQL's limit of 64."""
    return LOCK_PREFIX + hashlib.sha1(owner.encode(), usedforsecurity=False).hexdigest()


def has_named_locks(engine: Engine | Connection) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


class OwnerLock:
    """This instance's named lock, held on a connection outside the pool.

    ``ensure()`` before each page of claims: it costs one round trip, keeps the connection
    from the server's ``wait_timeout``, and takes the lock again on a new connection if the
    old one was lost (the instance's older claims may have been taken over meanwhile; the
    order's own transaction finds that out and gives the order up).
    """

    def __init__(self, engine: Engine, owner: str) -> None:
        self.owner = owner
        self.name = lock_name(owner)
        self.enabled = has_named_locks(engine)
        self._engine = (create_engine(engine.url, poolclass=NullPool,
                                      connect_args={"charset": "utf8mb4",
                                                    "connect_timeout": 10})
                        if self.enabled else None)
        self._conn: Connection | None = None

    def ensure(self) -> bool:
        """True while the lock is held (taken now if need be); False if it cannot be."""
        if self._engine is None:
            return True
        if self._conn is not None:
            try:
                if self._conn.execute(text("SELECT IS_USED_LOCK(:n) = CONNECTION_ID()"),
                                      {"n": self.name}).scalar():
                    return True
            except SQLAlchemyError:
                pass
            self._drop()
        try:
            conn = self._engine.connect()
            got = conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": self.name}).scalar()
            conn.commit()  # the lock is the session's, not the transaction's
        except SQLAlchemyError as exc:
            log.warning("claims.liveness_lock_unavailable", error=describe_db_error(exc))
            return False
        if got != 1:  # nobody else uses this name; a 0 would be a server oddity
            conn.close()
            log.warning("claims.liveness_lock_refused", lock=self.name)
            return False
        self._conn = conn
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except SQLAlchemyError:
                pass

    def close(self) -> None:
        """Let the lock go (a clean stop); the instance's claims were released before."""
        self._drop()
        if self._engine is not None:
            self._engine.dispose()


def claim_holders(conn: Connection, now: datetime, *, besides: str) -> list[str]:
    """The owners of the claims still within their lease, other than ``besides``.

    One scan of labsync's own table, once a pass (and in ``labsync run`` every few
    seconds, to notice an instance that died): a few milliseconds at 100,000 orders.
    """
    s = labsync_orders
    return [row[0] for row in conn.execute(
        select(s.c.LEASE_OWNER)
        .where(s.c.LEASE_OWNER.is_not(None), s.c.LEASE_UNTIL >= now, s.c.LEASE_OWNER != besides)
        .group_by(s.c.LEASE_OWNER))]


def dead_owners(conn: Connection, owners: Collection[str]) -> set[str]:
    """Those of ``owners`` that no longer live: their named lock is free."""
    owners = list(owners)
    if not owners:
        return set()
    if not has_named_locks(conn):
        return set(owners)  # SQLite: one instance only, and that is this one
    columns = ", ".join(f"IS_USED_LOCK(:n{i})" for i in range(len(owners)))
    row = conn.execute(text(f"SELECT {columns}"),
                       {f"n{i}": lock_name(o) for i, o in enumerate(owners)}).one()
    return {owner for owner, holder in zip(owners, row, strict=True) if holder is None}
