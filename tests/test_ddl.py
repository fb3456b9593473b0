"""The SQL files for DBAs say what the code does."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from labsync.store import ddl
from tests.conftest import sql_statements

ROOT = Path(__file__).parent.parent


def test_sql_labsync_tables_is_what_init_db_creates():
    assert (ROOT / "sql" / "labsync-tables.sql").read_text() == ddl.render()


def test_sql_seed_tables_is_the_briefs_ddl():
    assert (ROOT / "sql" / "seed-lab-tables.sql").read_text() == (
        Path(__file__).parent / "sql" / "seed-lab-tables.sql").read_text()


@pytest.mark.mariadb
def test_init_db_on_mariadb_makes_the_same_tables_as_the_sql_files(mariadb):
    """labsync's tables made by init-db (the session fixture) match sql/labsync-tables.sql."""
    scratch = f"labsync_ddl_{secrets.token_hex(3)}"
    admin = create_engine(make_url(mariadb.url).set(database="test"))
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE DATABASE {scratch} CHARACTER SET utf8"))
            conn.execute(text(f"USE {scratch}"))
            for statement in sql_statements((ROOT / "sql" / "labsync-tables.sql").read_text()):
                conn.execute(text(statement))
        for table in ("labsync_orders", "labsync_passes"):
            with admin.connect() as conn:
                from_file = conn.execute(text(f"SHOW CREATE TABLE {scratch}.{table}")).one()[1]
            with mariadb.engine.connect() as conn:
                from_code = conn.execute(text(f"SHOW CREATE TABLE {table}")).one()[1]
            assert _normalised(from_file) == _normalised(from_code)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {scratch}"))
        admin.dispose()


def _normalised(create: str) -> list[str]:
    """SHOW CREATE TABLE lines in a stable order (index order follows creation order)."""
    create = re.sub(r"AUTO_INCREMENT=\d+ ", "", create)
    return sorted(line.strip().rstrip(",") for line in create.splitlines())
