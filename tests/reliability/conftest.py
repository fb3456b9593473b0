"""Shared pieces of the reliability suite: the scale knob, a figures log, and a pass helper.

``LABSYNC_RELIABILITY_SCALE=full`` runs the counts docs/reliability.md reports (30+ crash
kills, 10,000 orders under load, hundreds of generated bad-data examples); the default is a
smaller run that fits CI. ``LABSYNC_RELIABILITY_FIGURES=FILE`` appends one JSON line per
scenario with what was injected, how often and what came of it: the source of the table in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from labsync.app import open_app
from labsync.config import Config
from labsync.lis.qlab import QlabClient
from labsync.sync import PassSummary
from tests.conftest import Db, add_user

SCALE = os.environ.get("LABSYNC_RELIABILITY_SCALE", "ci")
FULL = SCALE == "full"
FIGURES = os.environ.get("LABSYNC_RELIABILITY_FIGURES")


def scaled(ci: int, full: int) -> int:
    """``full`` under ``LABSYNC_RELIABILITY_SCALE=full``, else the CI-sized ``ci``."""
    return full if FULL else ci


def record(scenario: str, *, injected: str, times: int, outcome: str, lost: int = 0,
           duplicated: int = 0, **extra: Any) -> None:
    """Append one scenario's figures to ``$LABSYNC_RELIABILITY_FIGURES`` (if set)."""
    if not FIGURES:
        return
    line = {"scenario": scenario, "scale": SCALE, "injected": injected, "times": times,
            "outcome": outcome, "lost": lost, "duplicated": duplicated, **extra,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(FIGURES, "a", encoding="utf-8") as out:
        out.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


def run_pass_with(config: Config, *, sleeps: list[float] | None = None, due_only: bool = False,
                  lis: QlabClient | None = None) -> PassSummary:
    """One real pass (`sync-once --all`); retry waits are recorded in ``sleeps``, not slept."""
    sink: Callable[[float], None] = sleeps.append if sleeps is not None else (lambda _s: None)
    client = lis or QlabClient(config.lis, sleep=sink)
    with open_app(config, lis=client) as app:
        return app.sync.run_pass(due_only=due_only)


def free_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def files_outside(root: Path, inside: Path) -> set[Path]:
    """Every file and folder under ``root`` that is not ``inside`` or under it."""
    return {p for p in root.rglob("*") if p != inside and inside not in p.parents}


@pytest.fixture
def site(mariadb: Db) -> Iterator[Db]:
    """The session's MariaDB database, emptied, with patient 7 (who can get mail)."""
    mariadb.clear()
    add_user(mariadb, 7)
    yield mariadb


def mail_counts(db: Db) -> dict[str, int]:
    """Mail events per EXTERNAL_ORDER_ID, read from C_FIELDS."""
    pattern = re.compile(r's:8:"ORDER_ID";s:\d+:"([^"]*)";')
    counts: dict[str, int] = {}
    for (c_fields,) in db.rows("SELECT C_FIELDS FROM b_event"):
        match = pattern.search(c_fields)
        key = match.group(1) if match else "?"
        counts[key] = counts.get(key, 0) + 1
    return counts


DB_PASSWORD = "Db-Pa55-rel1ab1l1ty-7c4e"


@pytest.fixture
def db_account(site: Db) -> Iterator[str]:
    """A MariaDB account of its own (``rt_…``, with a password) on the test database; its URL.

    The tests that need a password to hide, or a server setting for labsync's sessions
    only, connect as this account instead of root.
    """
    import secrets

    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    user = f"rt_{secrets.token_hex(4)}"
    url = make_url(site.url)
    with site.engine.begin() as conn:
        for host in ("127.0.0.1", "localhost"):
            conn.execute(text(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{DB_PASSWORD}'"))
            conn.execute(text(f"GRANT ALL PRIVILEGES ON `{url.database}`.* TO "
                              f"'{user}'@'{host}'"))
    try:
        yield url.set(username=user, password=DB_PASSWORD).render_as_string(hide_password=False)
    finally:
        with site.engine.begin() as conn:
            for host in ("127.0.0.1", "localhost"):
                conn.execute(text(f"DROP USER IF EXISTS '{user}'@'{host}'"))
