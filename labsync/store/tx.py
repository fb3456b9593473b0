"""Run one unit of database work as one transaction, retried whole when that is safe."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.errors import StoreError
from labsync.store.db import classify_db_error, describe_db_error

log = structlog.get_logger("labsync.store")

TX_ATTEMPTS = 3
_T = TypeVar("_T")


def run_tx(bind: Engine | Connection, work: Callable[[Connection], _T], *, retry: bool = False,
           sleep: Callable[[float], Any] = time.sleep) -> _T:
    """``work(conn)`` in one transaction, on a pooled connection or on ``bind`` itself.

    A connection held across many transactions (the pass holds one per page) saves the
    pool's checkout ping and reset for each; after a dropped connection it reconnects on
    its next use.

    With ``retry``, a dropped connection or a deadlock/lock wait timeout reruns the whole
    transaction on a fresh connection (``work`` must be safe to rerun: it is, because the
    failed attempt was rolled back). A database that stays unreachable raises
    ``StoreError``; other database errors pass through for the caller to confine.
    """

    def one_transaction() -> _T:
        if isinstance(bind, Connection):
            with bind.begin():
                return work(bind)
        with bind.begin() as conn:
            return work(conn)

    return _retried(one_transaction, attempts=TX_ATTEMPTS if retry else 1, sleep=sleep)


def _retried(action: Callable[[], _T], *, attempts: int, sleep: Callable[[float], Any]) -> _T:
    """``action()``, again after a dropped connection or a lock error, up to ``attempts``
    times; a database that stays unreachable raises ``StoreError``."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
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


@contextmanager
def held_connection(engine: Engine, *, sleep: Callable[[float], Any] = time.sleep
                    ) -> Iterator[Connection]:
    """A connection to run many ``run_tx`` on, got with ``run_tx``'s retries for a dropped
    connection; a database that stays unreachable raises ``StoreError``."""
    conn = _retried(engine.connect, attempts=TX_ATTEMPTS, sleep=sleep)
    with conn:
        yield conn
