"""Run one unit of database work as one transaction, retried whole when that is safe."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.errors import StoreError
from labsync.store.db import classify_db_error, describe_db_error

log = structlog.get_logger("labsync.store")

TX_ATTEMPTS = 3
_T = TypeVar("_T")


def run_tx(engine: Engine, work: Callable[[Connection], _T], *, retry: bool = False,
           sleep: Callable[[float], Any] = time.sleep) -> _T:
    """``work(conn)`` in one transaction.

    With ``retry``, a dropped connection or a deadlock/lock wait timeout reruns the whole
    transaction on a fresh connection (``work`` must be safe to rerun: it is, because the
    failed attempt was rolled back). A database that stays unreachable raises
    ``StoreError``; other database errors pass through for the caller to confine.
    """
    attempts = TX_ATTEMPTS if retry else 1
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except SQLAlchemyError as exc:
            kind = classify_db_error(exc)
            if kind != "other" and attempt < attempts:
                log.warning("db.retry", attempt=attempt, kind=kind, error=describe_db_error(exc))
                sleep(0.5 * attempt)
                continue
            if kind == "disconnect":
                raise StoreError(describe_db_error(exc)) from exc
            raise
    raise AssertionError("unreachable")
