"""The benchmark's scratch database: made, seeded, reset, checked, dropped.

A fresh utf8 MariaDB database (``labsync_bench_<random>``, like an older Bitrix site) with
the site's tables from tests/sql and labsync's own from ``init_db``; its pending orders
carry the fake LIS's ids. ``verify`` says whether a pass wrote exactly what it should.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from bench.measure import PREFIX, ROOT, log
from labsync.config import DatabaseConfig
from labsync.store.db import init_db, make_engine
from labsync.testing.fake_qlab import seed_plan

SQL_DIR = ROOT / "tests" / "sql"
ADMIN_URL = os.environ.get("LABSYNC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
RESET_TABLES = ("local_lab_results", "b_event", "b_event_log")  # plus every labsync_* table


def sql_statements(sql: str) -> list[str]:
    lines = [ln.split("--", 1)[0] for ln in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@contextlib.contextmanager
def scratch_database(admin_url: URL) -> Iterator[Engine]:
    """A fresh utf8 database with the site's tables and labsync's; dropped on the way out."""
    admin = create_engine(admin_url, pool_pre_ping=True)
    name = f"labsync_bench_{secrets.token_hex(4)}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8 COLLATE utf8_unicode_ci"))
    engine = create_engine(admin_url.set(database=name), pool_pre_ping=True)
    try:
        with engine.begin() as conn:
            for path in sorted(SQL_DIR.glob("*.sql")):
                for statement in sql_statements(path.read_text(encoding="utf-8")):
                    conn.execute(text(statement))
        own = make_engine(DatabaseConfig(url=engine.url))
        init_db(own)  # labsync's own tables, as `labsync init-db` makes them
        own.dispose()
        yield engine
    finally:
        engine.dispose()
        for attempt in range(5):  # the server may be restarting under us (see server_uptime)
            try:
                with admin.begin() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
                break
            except OperationalError:
                if attempt == 4:
                    log(f"could not drop the scratch database {name}: drop it by hand")
                    raise
                time.sleep(3)
        admin.dispose()


STATEMENT_COUNTERS = ("Com_insert", "Com_update", "Com_delete", "Com_select", "Com_commit",
                      "Questions")


def statement_counters(engine: Engine) -> dict[str, int]:
    """The server's statement counters (all sessions: another tenant's queries count too)."""
    names = ", ".join(f"'{n}'" for n in STATEMENT_COUNTERS)
    with engine.connect() as conn:
        rows = conn.execute(text(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names})"))
        return {name.lower(): int(value) for name, value in rows}


def server_uptime(engine: Engine) -> int:
    """Seconds since the MariaDB server started: a drop between two readings is a restart."""
    with engine.connect() as conn:
        row = conn.execute(text("SHOW GLOBAL STATUS LIKE 'Uptime'")).first()
    return int(row[1]) if row else 0


def seed(engine: Engine, orders: int, completed_ratio: float) -> int:
    """Pending orders with the fake LIS's ids, four per user; returns how many will complete."""
    plan = seed_plan(orders, prefix=PREFIX, completed_ratio=completed_ratio)
    users = max(1, (orders + 3) // 4)
    with engine.begin() as conn:
        for table in ("local_lab_orders", "b_user"):
            conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text(
            "INSERT INTO b_user (ID, LOGIN, ACTIVE, NAME, LAST_NAME, EMAIL, DATE_REGISTER) "
            "VALUES (:id, :login, 'Y', 'Анна', 'Иванова', :email, '2025-01-01')"),
            [{"id": u, "login": f"user{u}", "email": f"patient{u}@example.org"}
             for u in range(1, users + 1)])
        rows = [{"id": i + 1, "ext": ext, "user": i % users + 1, "day": date.today()}
                for i, (ext, _completed) in enumerate(plan)]
        for start in range(0, len(rows), 10_000):
            conn.execute(text(
                "INSERT INTO local_lab_orders (ID, USER_ID, EXTERNAL_ORDER_ID, ORDER_DATE, STATUS)"
                " VALUES (:id, :user, :ext, :day, 'received')"), rows[start:start + 10_000])
    return sum(completed for _ext, completed in plan)


def reset(engine: Engine, *pdf_dirs: Path) -> None:
    """Every order pending again; results, mail, admin log and labsync's bookkeeping gone."""
    with engine.begin() as conn:
        own = conn.execute(text(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
            " AND TABLE_NAME LIKE 'labsync\\_%'")).scalars().all()
        for table in (*RESET_TABLES, *own):
            conn.execute(text(f"TRUNCATE TABLE {table}"))
        conn.execute(text("UPDATE local_lab_orders SET STATUS = 'received', SYNCED_AT = NULL"))
    for folder in pdf_dirs:
        shutil.rmtree(folder, ignore_errors=True)


def verify(engine: Engine, pdf_dir: Path, *, expected: int, results: int,
           pdf_size: int) -> dict[str, Any]:
    """What a pass left behind, and whether it is exactly what it should be."""
    queries = {
        "completed": "SELECT COUNT(*) FROM local_lab_orders WHERE STATUS = 'completed'",
        "events": "SELECT COUNT(*) FROM b_event",
        "result_rows": "SELECT COUNT(*) FROM local_lab_results",
        "duplicate_results": "SELECT COUNT(*) FROM (SELECT 1 FROM local_lab_results"
                             " GROUP BY ORDER_ID, TEST_CODE HAVING COUNT(*) > 1) AS d",
        "event_log_rows": "SELECT COUNT(*) FROM b_event_log",
    }
    with engine.connect() as conn:
        found: dict[str, Any] = {k: int(conn.execute(text(q)).scalar() or 0)
                                 for k, q in queries.items()}
    files = [p for p in pdf_dir.rglob("*.pdf") if not p.name.startswith(".")] \
        if pdf_dir.exists() else []
    found["pdf_files"] = len(files)
    found["pdf_wrong_size"] = sum(1 for p in files if p.stat().st_size != pdf_size)
    found["expected_completed"] = expected
    found["ok"] = (found["completed"] == found["events"] == found["pdf_files"] == expected
                   and found["result_rows"] == expected * results
                   and found["duplicate_results"] == found["pdf_wrong_size"] == 0
                   and found["event_log_rows"] == 0)
    return found
