"""The database engine: connection settings, table creation, and what the columns accept.

On MySQL/MariaDB every session runs with a strict ``sql_mode`` so the server never cuts or
mangles a value silently: labsync fits values itself (``TextFitter``) and says so in a log line.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, String, bindparam, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from labsync.config import DatabaseConfig
from labsync.errors import LabsyncError, StoreError
from labsync.store.tables import BITRIX_TABLES, OWN_TABLES, SITE_TABLES, metadata

STRICT_SQL_MODE = (
    "STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,"
    "NO_ENGINE_SUBSTITUTION"
)
ELLIPSIS = "…"
_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")  # what a 3-byte utf8 column cannot hold
LOCK_WAIT_SECONDS = 10


def make_engine(config: DatabaseConfig) -> Engine:
    """An engine for ``config.url``: pre-pinged, recycled pooled connections; strict MySQL mode."""
    if config.is_sqlite:
        engine = create_engine(config.url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    engine = create_engine(
        config.url,
        pool_size=config.pool_size,
        max_overflow=2,
        pool_pre_ping=True,  # a connection dropped by wait_timeout is replaced, not used
        pool_recycle=1800,
        isolation_level="READ COMMITTED",  # fewer gap locks against the site's own writes
        connect_args={"charset": "utf8mb4", "connect_timeout": 10},
    )

    @event.listens_for(engine, "connect")
    def _strict(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"SET SESSION sql_mode = '{STRICT_SQL_MODE}'")
        # One order locked by the site must not stall a pass for the server's default 50 s
        # per try: fail the order fast, it is retried on a later pass.
        cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}")
        cursor.close()

    return engine


def describe_failure(exc: BaseException) -> str:
    """A secret-free line about what stopped a batch of orders (the orders alone say more)."""
    if isinstance(exc, SQLAlchemyError):
        return describe_db_error(exc)
    if isinstance(exc, LabsyncError):
        return str(exc)[:300]
    return type(exc).__name__


def order_error(exc: LabsyncError | SQLAlchemyError) -> LabsyncError:
    """The error to record against an order: a database error as a secret-free StoreError."""
    return exc if isinstance(exc, LabsyncError) else StoreError(describe_db_error(exc))


def describe_db_error(exc: SQLAlchemyError) -> str:
    """A one-line, secret-free description of a database error for an operator."""
    orig = getattr(exc, "orig", None)
    if orig is not None and getattr(orig, "args", None):
        args = orig.args
        if len(args) >= 2 and isinstance(args[0], int):
            return f"database error {args[0]}: {args[1]}"
        return f"database error: {args[0]}"
    return f"database error: {type(exc).__name__}"


def init_db(engine: Engine, *, with_bitrix: bool = False) -> list[str]:
    """Create labsync's tables and the site's two lab tables where missing; return what was made.

    Existing tables are never altered. ``with_bitrix`` also creates the Bitrix core tables:
    only the demo and tests do that; a real site has them.
    """
    wanted = [*SITE_TABLES, *OWN_TABLES, *(BITRIX_TABLES if with_bitrix else ())]
    try:
        existing = set(inspect(engine).get_table_names())
        metadata.create_all(engine, tables=wanted, checkfirst=True)
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(exc)) from exc
    return [t.name for t in wanted if t.name not in existing]


def verify_tables(engine: Engine) -> None:
    """Raise ``StoreError`` unless the tables a pass needs are all there."""
    try:
        existing = set(inspect(engine).get_table_names())
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(exc)) from exc
    missing = [t.name for t in (*SITE_TABLES, *OWN_TABLES, *BITRIX_TABLES)
               if t.name not in existing]
    if missing:
        raise StoreError(f"missing tables: {', '.join(missing)} (labsync's own and the lab "
                         "tables come from `labsync init-db`; b_* are the site's)")


@dataclass(frozen=True)
class TextFitter:
    """Fits text to a column: its length in characters and its character set.

    Older Bitrix sites use utf8 (3-byte) tables: a 4-byte character such as an emoji would
    make a strict server refuse the row, so it is replaced by U+FFFD. A cp1251 site gets
    ``?`` for what cp1251 cannot hold. A value longer than its column is cut to fit, ending
    with ``…``; the caller logs that.
    """

    charsets: dict[tuple[str, str], str] = field(default_factory=dict)

    def fit(self, table: str, column: str, value: str | None) -> tuple[str | None, list[str]]:
        """The value as it can be stored, and what was changed (empty when stored exactly)."""
        if value is None:
            return None, []
        notes: list[str] = []
        charset = self.charsets.get((table, column), "utf8mb4")
        if charset in _HOLDS_ASCII and value.isascii():  # the common case, nothing to do
            fitted = value
        elif charset in ("utf8", "utf8mb3"):
            fitted = _ASTRAL.sub("\ufffd", value)
        elif charset in ("utf8mb4", "binary"):
            fitted = value
        else:
            codec = _PY_CODECS.get(charset, charset)
            try:
                fitted = value.encode(codec, "replace").decode(codec)
            except LookupError:
                fitted = value
        if fitted != value:
            notes.append(f"characters the {charset} column cannot hold were replaced")
        length = _column_length(table, column)
        if length is not None and len(fitted) > length:
            notes.append(f"cut from {len(fitted)} to {length} characters")
            fitted = fitted[: length - 1] + ELLIPSIS
        return fitted, notes


_HOLDS_ASCII = frozenset({"utf8", "utf8mb3", "utf8mb4", "binary", "cp1251", "latin1", "koi8r",
                          "ascii"})
_PY_CODECS = {"latin1": "cp1252", "cp1251": "cp1251", "koi8r": "koi8_r", "ascii": "ascii"}


@functools.cache
def _column_length(table: str, column: str) -> int | None:
    col = metadata.tables[table].c[column]
    return col.type.length if isinstance(col.type, String) else None


def detect_text_fitter(engine: Engine) -> TextFitter:
    """Read the character set of every text column labsync writes (MySQL); SQLite holds anything."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        return TextFitter()
    query = text(
        "SELECT TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = DATABASE() AND CHARACTER_SET_NAME IS NOT NULL "
        "AND TABLE_NAME IN :names"
    ).bindparams(bindparam("names", expanding=True))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                query, {"names": ["local_lab_results", "b_event", "b_event_log"]}
            ).all()
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(exc)) from exc
    return TextFitter({(r[0], r[1]): str(r[2]).lower() for r in rows})


# MySQL/MariaDB error codes: the server went away or the connection was cut…
_DISCONNECT_CODES = frozenset({2002, 2003, 2006, 2013, 2055, 1927, 4031})
# …or a lock wait timed out / a deadlock chose this transaction as its victim.
_LOCK_CODES = frozenset({1205, 1213})


def classify_db_error(exc: SQLAlchemyError) -> str:
    """``disconnect`` (retry on a fresh connection; if it lasts, the database is unreachable),
    ``lock`` (retry the transaction; if it lasts, the order fails) or ``other``."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return "disconnect"
    orig = getattr(exc, "orig", None)
    code = orig.args[0] if orig is not None and orig.args else None
    if code in _LOCK_CODES:
        return "lock"
    if code in _DISCONNECT_CODES:
        return "disconnect"
    if isinstance(exc, (OperationalError, InterfaceError)):
        if "database is locked" in str(orig).lower():  # SQLite's busy timeout ran out
            return "lock"
        return "disconnect"
    return "other"
