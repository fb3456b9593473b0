"""Shared fixtures: a real database (SQLite and MariaDB), the fake QLAB over HTTP, a config.

MariaDB: one fresh database per test session, its tables created from the real Bitrix and
seed DDL in ``tests/sql`` with ``utf8`` (3-byte) as an older Bitrix site has, dropped at the
end. Without a server the MariaDB tests skip, unless ``LABSYNC_REQUIRE_MARIADB=1`` (CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, delete, insert, text
from sqlalchemy.engine import make_url

from labsync import config as config_mod
from labsync.config import Config
from labsync.store.db import init_db, make_engine
from labsync.store.tables import b_user, local_lab_orders, metadata
from labsync.testing.fake_qlab import FakeQlab
from tests.fhir_medplum import medplum, medplum_server  # noqa: F401 - the FHIR server's fixtures

SQL_DIR = Path(__file__).parent / "sql"
MARIADB_ADMIN_URL = os.environ.get("LABSYNC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
REQUIRE_MARIADB = os.environ.get("LABSYNC_REQUIRE_MARIADB") == "1"
API_KEY = "test-api-key-5f1c9a"


def sql_statements(sql: str) -> list[str]:
    """The statements of an SQL script (``--`` comments dropped; no ``;`` inside strings)."""
    lines = [ln.split("--", 1)[0] for ln in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@dataclass
class Db:
    """A database under test: its URL (as a config would name it) and an engine for asserts."""

    kind: str
    url: str
    engine: Engine

    def clear(self) -> None:
        with self.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(delete(table))

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[Db]:
    admin_url = make_url(MARIADB_ADMIN_URL)
    admin = create_engine(admin_url, pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        message = f"MariaDB not reachable at {admin_url.render_as_string()}: {exc}"
        if REQUIRE_MARIADB:
            pytest.fail(message)
        pytest.skip(message)
    name = f"labsync_t_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8 COLLATE utf8_unicode_ci"))
    url = admin_url.set(database=name)
    engine = create_engine(url, pool_pre_ping=True)  # survives the restart tests
    with engine.begin() as conn:
        for path in sorted(SQL_DIR.glob("*.sql")):
            for statement in sql_statements(path.read_text(encoding="utf-8")):
                conn.execute(text(statement))
    own = make_engine(config_mod.DatabaseConfig(url=url))
    init_db(own)  # labsync's own tables, as `labsync init-db` makes them
    own.dispose()
    try:
        yield Db("mariadb", url.render_as_string(hide_password=False), engine)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """Each engine test runs twice: on SQLite (the embedded default) and on real MariaDB."""
    if request.param == "mariadb":
        target: Db = request.getfixturevalue("mariadb")
        target.clear()
        yield target
        return
    url = f"sqlite:///{tmp_path / 'site.db'}"
    engine = make_engine(config_mod.DatabaseConfig(url=make_url(url)))
    init_db(engine, with_bitrix=True)
    yield Db("sqlite", url, engine)
    engine.dispose()


@pytest.fixture
def fake_lis() -> Iterator[FakeQlab]:
    with FakeQlab(api_key=API_KEY) as server:
        yield server


def make_config(db: Db, lis_server: FakeQlab, pdf_dir: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "database": {"url": db.url},
        "site": {"timezone": "Europe/Moscow"},
        "lis": {"adapter": "qlab", "base_url": lis_server.base_url, "api_key": API_KEY,
                "connect_timeout": 2, "read_timeout": 5, "retry_attempts": 3,
                "retry_max_seconds": 10},
        "pdf": {"dir": str(pdf_dir)},
        "notify": {"site_id": "s1"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_mod.from_mapping(raw, env={})


@pytest.fixture
def config(db: Db, fake_lis: FakeQlab, tmp_path: Path) -> Config:
    return make_config(db, fake_lis, tmp_path / "lab-results")


def add_user(db: Db, user_id: int, *, email: str | None = "patient@example.org",
             active: str = "Y", name: str = "Anna", last_name: str = "Ivanova",
             **extra: Any) -> None:
    with db.engine.begin() as conn:
        conn.execute(insert(b_user).values(
            ID=user_id, LOGIN=f"user{user_id}", ACTIVE=active, NAME=name, LAST_NAME=last_name,
            EMAIL=email, DATE_REGISTER=datetime(2025, 1, 1), **extra))


def add_order(db: Db, external_id: str, user_id: int, *, status: str = "received",
              order_date: date | None = date(2026, 11, 20)) -> int:
    with db.engine.begin() as conn:
        result = conn.execute(insert(local_lab_orders).values(
            USER_ID=user_id, EXTERNAL_ORDER_ID=external_id, STATUS=status,
            ORDER_DATE=order_date))
        return int(result.inserted_primary_key[0])
