"""docs/operations.md's database steps, in their order as written, and the account that
sql/grants.sql makes: enough for a whole pass of batched completions, and no more.

The steps are read from the doc itself: the fenced ``sh`` blocks of the ``**N. Database.**``
install step, one command a line. ``labsync --config FILE init-db`` runs ``init-db`` with an
administrator's config; ``mariadb … < sql/grants.sql`` runs the file's statements as an
administrator, with the database name, the account's user name (unique per run) and host
part, and the password put in the way an operator edits them. Making a config file (``sed``,
``install``, ``cp``, ``chmod``) is left to the test, which writes its own. Any other command
fails the test until it is taught here, so the doc cannot drift away from what runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

import labsync.app as app_module
from labsync import cli
from labsync.config import DatabaseConfig
from labsync.store.bitrix import queue_mail_events
from labsync.store.db import TextFitter, make_engine
from labsync.sync import COMPLETION_BATCH
from labsync.testing.fake_qlab import FakeQlab
from tests.conftest import API_KEY, MARIADB_ADMIN_URL, REQUIRE_MARIADB, SQL_DIR, sql_statements
from tests.helpers import RESULTS, mail_fields, restored_logging

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = ROOT / "docs" / "operations.md"
GRANTS = ROOT / "sql" / "grants.sql"
EXAMPLE_CONFIG = ROOT / "config" / "labsync.example.toml"
ORDERS = 25  # more than one completion batch, so both batches queue several mails at once

_ACCOUNT = re.compile(r"CREATE USER IF NOT EXISTS '([^']+)'@'([^']+)' IDENTIFIED BY '([^']*)'")


# -- the doc's steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str  # "init-db" or "grants"
    line: str  # as written in the doc


def database_steps(doc: str) -> list[Step]:
    """The database steps of operations.md's install section, in the order written."""
    section = re.search(r"^\*\*\d+\. Database\.\*\*(.*?)^\*\*\d+\. ", doc, re.M | re.S)
    assert section, "docs/operations.md has no '**N. Database.**' install step"
    steps: list[Step] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", section.group(1), re.M | re.S):
        assert lang == "sh", f"a ```{lang} block in the Database step: teach {__name__} to run it"
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "labsync" and words[-1] == "init-db" and "--config" in words:
                steps.append(Step("init-db", line))
            elif (words[0] in ("mariadb", "mysql") and "<" in words
                  and words[words.index("<") + 1] == "sql/grants.sql"):
                steps.append(Step("grants", line))
            elif words[0] not in ("install", "cp", "chmod", "sed"):
                pytest.fail(f"operations.md's Database step {line!r} is not understood by "
                            f"{__name__}: teach the test what it does")
    return steps


def test_the_database_steps_are_found_in_operations_md():
    """The walk below is not vacuous: the doc's section yields both kinds of step."""
    kinds = [s.kind for s in database_steps(OPERATIONS.read_text())]
    assert sorted(set(kinds)) == ["grants", "init-db"] and len(kinds) == 2, kinds


def test_grants_sql_account_host_fits_the_example_database_url():
    """``localhost`` is the unix socket, ``127.0.0.1`` is TCP: the account grants.sql makes
    must be the one the example config's URL logs in as (with skip_name_resolve too)."""
    import tomllib

    [(user, host, _)] = _ACCOUNT.findall(GRANTS.read_text())
    url = make_url(tomllib.loads(EXAMPLE_CONFIG.read_text())["database"]["url"])
    assert url.username == user
    expected = "localhost" if "unix_socket" in url.query else url.host
    assert host == expected, f"grants.sql makes '{user}'@'{host}', the example URL needs {expected}"
    for doc in (OPERATIONS, GRANTS):
        assert f"'{user}'@'{host}'" in doc.read_text(), doc.name


# -- a fresh site, the steps walked, a pass as the account ---------------------------------------


@pytest.fixture
def admin() -> Iterator[Engine]:
    """An administrator's engine on the server (no database): fails, not skips, without a
    server when LABSYNC_REQUIRE_MARIADB=1, as the ``mariadb`` fixture does."""
    url = make_url(MARIADB_ADMIN_URL)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        message = f"MariaDB not reachable at {url.render_as_string()}: {exc}"
        if REQUIRE_MARIADB:
            pytest.fail(message)
        pytest.skip(message)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cli.main`` configures logging for the process; put everything back afterwards."""
    with restored_logging():
        yield


@dataclass
class Site:
    """A fresh site database: only Bitrix's core tables (and, live, the seed tables)."""

    name: str
    url: URL  # the administrator's URL for it
    engine: Engine

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def execute(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)


@pytest.fixture
def site(admin: Engine) -> Iterator[Site]:
    name = f"labsync_g_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8 COLLATE utf8_unicode_ci"))
    url = admin.url.set(database=name)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in sql_statements((SQL_DIR / "core-tables.sql").read_text()):
                conn.execute(text(statement))
        yield Site(name, url, engine)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))


@dataclass(frozen=True)
class Account:
    user: str
    host: str
    password: str


@pytest.fixture
def account(admin: Engine) -> Iterator[Account]:
    """The user name and host part the grants are edited to; the user is dropped afterwards.

    The host part is the one the server sees for this test's own connections (the admin URL's
    host, over the same transport): ``127.0.0.1`` over TCP with skip_name_resolve."""
    with admin.connect() as conn:
        seen_as = str(conn.execute(text("SELECT USER()")).scalar_one())
    made = Account(f"labsync_t_{secrets.token_hex(4)}", seen_as.rsplit("@", 1)[1],
                   secrets.token_hex(12))
    yield made
    with admin.begin() as conn:
        conn.execute(text(f"DROP USER IF EXISTS '{made.user}'@'{made.host}'"))


def edited_grants(site: Site, account: Account) -> list[str]:
    """sql/grants.sql as an operator edits it: database, account, password."""
    sql = GRANTS.read_text()
    [(user, host, password)] = _ACCOUNT.findall(sql)
    statements = sql_statements(sql)
    assert statements, "sql/grants.sql has no statements"
    edited = []
    for statement in statements:
        assert f"'{user}'@'{host}'" in statement, f"not for the labsync account: {statement}"
        statement = statement.replace(f"'{user}'@'{host}'", f"'{account.user}'@'{account.host}'")
        statement = statement.replace(f"IDENTIFIED BY '{password}'",
                                      f"IDENTIFIED BY '{account.password}'")
        statement = re.sub(r"\bbitrix\.", f"{site.name}.", statement)
        assert "bitrix" not in statement.replace(site.name, ""), statement
        edited.append(statement)
    return edited


def walk_database_steps(site: Site, account: Account, admin_config: Path,
                        capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run operations.md's database steps in the order written; what each step was."""
    done = []
    for step in database_steps(OPERATIONS.read_text()):
        if step.kind == "init-db":
            status = cli.main(["--config", str(admin_config), "init-db"])
            out, err = capsys.readouterr()
            assert status == 0, f"{step.line!r} failed: {out}{err}"
        else:
            with site.engine.begin() as conn:
                for statement in edited_grants(site, account):
                    try:
                        conn.execute(text(statement))
                    except DBAPIError as exc:
                        pytest.fail(f"{step.line!r} failed at {statement.splitlines()[0]!r}: "
                                    f"{exc.orig}")
        done.append(step.kind)
    return done


def write_config(path: Path, *, url: URL, password_file: Path | None, lis: FakeQlab,
                 pdf_dir: Path) -> Path:
    database = f'url = "{url.render_as_string(hide_password=False)}"\n'
    if password_file is not None:
        database += f'password_file = "{password_file}"\n'
    path.write_text(
        f"[database]\n{database}\n"
        '[site]\ntimezone = "Europe/Moscow"\n\n'
        f'[lis]\nadapter = "qlab"\nbase_url = "{lis.base_url}"\napi_key = "{API_KEY}"\n'
        "connect_timeout = 2\nread_timeout = 5\nretry_attempts = 2\nretry_max_seconds = 2\n\n"
        f'[pdf]\ndir = "{pdf_dir}"\n\n'
        '[notify]\nsite_id = "s1"\n', encoding="utf-8")
    return path


def add_patient_orders(site: Site, lis: FakeQlab, names: list[str], first_user: int) -> None:
    """Orders the site placed, each for a user of its own, all completed in the LIS."""
    for n, name in enumerate(names):
        user_id = first_user + n
        site.execute("INSERT INTO b_user (ID, LOGIN, ACTIVE, NAME, LAST_NAME, EMAIL, "
                     "DATE_REGISTER) VALUES (:id, :login, 'Y', :name, 'Ivanova', :email, :now)",
                     id=user_id, login=f"user{user_id}", name=f"Name{user_id}",
                     email=f"patient{user_id}@example.org", now=datetime(2025, 1, 1))
        site.execute("INSERT INTO local_lab_orders (USER_ID, EXTERNAL_ORDER_ID, STATUS) "
                     "VALUES (:user, :ext, 'received')", user=user_id, ext=name)
        lis.add_order(name, results=RESULTS)


def log_events(out: str) -> list[dict[str, Any]]:
    """The JSON log lines ``cli.main`` wrote to stdout."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _show_create(site: Site, table: str) -> str:
    return str(site.rows(f"SHOW CREATE TABLE {table}")[0][1])


@pytest.mark.mariadb
@pytest.mark.parametrize("kind", ["empty", "live"])
def test_operations_md_database_steps_then_a_batched_pass_as_the_grants_account(
        kind, site, account, fake_lis, tmp_path, capsys, monkeypatch):
    names = [f"G-{n:03d}" for n in range(ORDERS)]
    seed_ddl: dict[str, str] = {}
    if kind == "live":  # the site's lab tables are there already, with an order in them
        for statement in sql_statements((SQL_DIR / "seed-lab-tables.sql").read_text()):
            site.execute(statement)
        add_patient_orders(site, fake_lis, ["LIVE-0"], first_user=900)
        names.append("LIVE-0")
        seed_ddl = {t: _show_create(site, t) for t in ("local_lab_orders", "local_lab_results")}
    admin_config = write_config(tmp_path / "admin.toml", url=site.url, password_file=None,
                                lis=fake_lis, pdf_dir=tmp_path / "lab-results")

    assert walk_database_steps(site, account, admin_config, capsys) == [
        s.kind for s in database_steps(OPERATIONS.read_text())]

    assert {t: _show_create(site, t) for t in seed_ddl} == seed_ddl  # init-db altered nothing
    add_patient_orders(site, fake_lis, names[:ORDERS], first_user=100)
    password_file = tmp_path / "db_password"
    password_file.write_text(account.password)
    own_url = site.url.set(username=account.user, password=None)
    assert own_url.host == make_url(MARIADB_ADMIN_URL).host  # the host part fits this transport
    config = write_config(tmp_path / "labsync.toml", url=own_url, password_file=password_file,
                          lis=fake_lis, pdf_dir=tmp_path / "lab-results")
    mail_inserts: list[str] = []

    def counted_engine(*args: Any, **kwargs: Any) -> Engine:  # the pass's own engine
        engine = make_engine(*args, **kwargs)

        @event.listens_for(engine, "before_cursor_execute")
        def seen(_conn, _cursor, statement, *_args):
            if statement.lstrip().startswith("INSERT INTO b_event"):
                mail_inserts.append(statement)

        return engine

    monkeypatch.setattr(app_module, "make_engine", counted_engine)
    status = cli.main(["--config", str(config), "sync-once"])
    out, err = capsys.readouterr()

    assert status == 0, err
    logged = log_events(out)
    assert [e for e in logged if e["event"] == "batch.one_by_one"] == []
    assert [e for e in logged if e["event"] == "order.failed"] == []
    # every completion batch queued its mails in one INSERT: the batch path ran, as this account
    assert len(mail_inserts) == math.ceil(len(names) / COMPLETION_BATCH)
    orders = {r.EXTERNAL_ORDER_ID: r for r in site.rows(
        "SELECT o.ID, o.USER_ID, o.EXTERNAL_ORDER_ID, o.STATUS, s.MAIL_EVENT_ID "
        "FROM local_lab_orders o JOIN labsync_orders s ON s.ORDER_ID = o.ID")}
    assert sorted(orders) == sorted(names)
    assert {r.STATUS for r in orders.values()} == {"completed"}
    mails = {r.ID: mail_fields(r.C_FIELDS) for r in site.rows("SELECT ID, C_FIELDS FROM b_event")}
    assert len(mails) == len(names)
    for name, order in orders.items():  # one mail per order, naming it, to its own patient
        fields = mails[order.MAIL_EVENT_ID]
        assert (fields["ORDER_ID"], fields["LOCAL_ORDER_ID"]) == (name, str(order.ID))
        assert fields["EMAIL"] == f"patient{order.USER_ID}@example.org"

    status = cli.main(["--config", str(config), "status", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    report = json.loads(out)
    assert report["last_pass"]["COMPLETED"] == len(names)
    assert report["mail_queued_unsent"] == len(names)
    status = cli.main(["--config", str(config), "status"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert f"mail events waiting for the site to send: {len(names)}" in out

    # and no more than that: the account cannot read what the site's other mails say
    limited = create_engine(own_url.set(password=account.password))
    try:
        for denied in ("SELECT C_FIELDS FROM b_event", "SELECT * FROM b_user",
                       "SELECT OTP_SECRET FROM b_user_phone_auth"):
            with limited.connect() as conn, pytest.raises(OperationalError, match="denied"):
                conn.execute(text(denied))
    finally:
        limited.dispose()


# -- the batch's mail INSERT names no column ----------------------------------------------------


@pytest.mark.mariadb
def test_batched_mail_insert_follows_the_live_b_event_column_order(admin, tmp_path):
    """Without a column list, each value must land in its column however the site's b_event
    orders them, with columns labsync does not know left to their defaults."""
    name = f"labsync_g_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8 COLLATE utf8_unicode_ci"))
    engine = make_engine(DatabaseConfig(url=admin.url.set(database=name)))
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: statements.append(statement))
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "CREATE TABLE b_event (ID INT NOT NULL AUTO_INCREMENT PRIMARY KEY, "
                "LID VARCHAR(255) NOT NULL, C_FIELDS LONGTEXT, "
                "SITE_EXTRA VARCHAR(10) NOT NULL DEFAULT 'kept', EVENT_NAME VARCHAR(255) NOT NULL, "
                "DUPLICATE CHAR(1) NOT NULL DEFAULT 'Y', HIDDEN INT INVISIBLE DEFAULT 7, "
                "SUCCESS_EXEC CHAR(1) NOT NULL DEFAULT 'N', DATE_INSERT DATETIME, "
                "MESSAGE_ID INT, DATE_EXEC DATETIME, LANGUAGE_ID CHAR(2))"))
        statements.clear()
        with engine.begin() as conn:
            first = queue_mail_events(conn, TextFitter(), event_name="LAB_RESULTS_READY",
                                      site_id="s1", fields=[{"ORDER_ID": "A"}, {"ORDER_ID": "B"}],
                                      duplicate="N", now_site=datetime(2026, 11, 20, 9, 30, 15))
            second = queue_mail_events(conn, TextFitter(), event_name="LAB_RESULTS_READY",
                                       site_id="s1", fields=[{"ORDER_ID": "C"}, {"ORDER_ID": "D"}],
                                       duplicate="N", now_site=datetime(2026, 11, 20, 9, 31))
        with engine.connect() as conn:
            rows = {r.ID: r for r in conn.execute(text(
                "SELECT ID, LID, C_FIELDS, SITE_EXTRA, EVENT_NAME, DUPLICATE, HIDDEN, "
                "SUCCESS_EXEC, DATE_INSERT, MESSAGE_ID FROM b_event"))}
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))

    inserts = [s for s in statements if s.startswith("INSERT INTO b_event")]
    assert len(inserts) == 2 and all(s.startswith("INSERT INTO b_event VALUES") for s in inserts)
    assert sum("information_schema" in s for s in statements) == 1  # read once per connection
    assert sorted(rows) == sorted(first + second)
    for event_id, order in zip(first + second, "ABCD", strict=True):
        row = rows[event_id]
        assert mail_fields(row.C_FIELDS) == {"ORDER_ID": order}
        assert (row.LID, row.EVENT_NAME, row.DUPLICATE, row.SUCCESS_EXEC) == (
            "s1", "LAB_RESULTS_READY", "N", "N")
        assert (row.SITE_EXTRA, row.HIDDEN, row.MESSAGE_ID) == ("kept", 7, None)
    assert rows[first[0]].DATE_INSERT == datetime(2026, 11, 20, 9, 30, 15)
