"""The ``labsync`` command line, run for real: exit codes, output, and what it never prints."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from labsync import cli
from labsync.testing.fake_qlab import FakeQlab, Fault
from tests.conftest import API_KEY, SQL_DIR, Db, add_order, add_user
from tests.helpers import RESULTS, order_row, restored_logging, results, run_pass

DB_PASSWORD = "s3cr3t-db-pw-77aa"
UNREACHABLE_DB = f"mysql+pymysql://labsync:{DB_PASSWORD}@127.0.0.1:1/bitrix"
OWN_AND_SITE = {"local_lab_orders", "local_lab_results", "labsync_orders", "labsync_passes",
                "labsync_outbox", "labsync_review", "labsync_discovery", "labsync_versions",
                "labsync_cursors", "labsync_deliveries"}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cli.main`` configures logging for the process; put everything back afterwards."""
    with restored_logging():
        yield


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, *, db_url: str, base_url: str, pdf_dir: Path,
                 api_key: str = API_KEY, **sections: dict[str, Any]) -> Path:
    """A config file as an operator would write it; ``sections`` add or override keys."""
    raw: dict[str, dict[str, Any]] = {
        "database": {"url": db_url},
        "site": {"timezone": "Europe/Moscow"},
        "lis": {"adapter": "qlab", "base_url": base_url, "api_key": api_key,
                "connect_timeout": 2, "read_timeout": 5, "retry_attempts": 2,
                "retry_max_seconds": 2},
        "pdf": {"dir": str(pdf_dir)},
        "notify": {"site_id": "s1"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    lines = []
    for name, values in raw.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def labsync(*args: str, cwd: Path | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command in a child process."""
    child_env = {k: v for k, v in os.environ.items() if k != "LABSYNC_CONFIG"}
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "labsync.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=child_env, check=False)


def main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``labsync.cli.main`` in this process; (exit status, stdout, stderr)."""
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def cfg_path(db: Db, fake_lis: FakeQlab, tmp_path: Path) -> Path:
    return write_config(tmp_path / "labsync.toml", db_url=db.url, base_url=fake_lis.base_url,
                        pdf_dir=tmp_path / "lab-results")


# -- a configuration that cannot be used -----------------------------------------------------


@pytest.mark.parametrize("command", ["sync-once", "check", "init-db", "status"])
def test_bad_config_lists_every_problem_and_exits_2_without_traceback(tmp_path, command):
    path = tmp_path / "labsync.toml"
    path.write_text(f"""
[database]
url = "postgresql://labsync:{DB_PASSWORD}@127.0.0.1/bitrix"
[site]
timezone = "Mars/Olympus_Mons"
[lis]
api_key = "{API_KEY}"
[pdf]
dir = "lab-results"
""", encoding="utf-8")

    proc = labsync("--config", str(path), command)

    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "labsync: the configuration cannot be used:"
    keys = sorted(line.strip().split(":", 1)[0] for line in lines[1:])
    assert keys == ["database.url", "lis.base_url", "pdf.dir", "site.timezone"]
    assert all(line.startswith("  ") for line in lines[1:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert API_KEY not in proc.stderr + proc.stdout
    assert DB_PASSWORD not in proc.stderr + proc.stdout


def test_invalid_toml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "labsync.toml"
    path.write_text('[database]\nurl = "sqlite:///x.db\n', encoding="utf-8")

    proc = labsync("--config", str(path), "sync-once")

    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "labsync: the configuration cannot be used:"
    [problem] = proc.stderr.splitlines()[1:]
    assert str(path) in problem
    assert "Traceback" not in proc.stderr


def test_config_file_comes_from_labsync_config_when_no_option(tmp_path):
    missing = tmp_path / "from-env.toml"

    proc = labsync("status", env={"LABSYNC_CONFIG": str(missing)})

    assert proc.returncode == 2
    assert str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


# -- init-db ----------------------------------------------------------------------------------


def _sqlite_schema(path: Path, table: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT type, name, sql FROM sqlite_master WHERE tbl_name = ? "
                            "ORDER BY name", (table,)).fetchall()


def _seed_statements() -> list[str]:
    """The brief's DDL of the site's lab tables, statement by statement."""
    sql = (SQL_DIR / "seed-lab-tables.sql").read_text(encoding="utf-8")
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _sqlite_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_init_db_creates_the_tables_then_says_all_exist(tmp_path, capsys):
    db_file = tmp_path / "site.db"
    path = write_config(tmp_path / "labsync.toml", db_url=f"sqlite:///{db_file}",
                        base_url="http://127.0.0.1:9/v2", pdf_dir=tmp_path / "pdf")

    first = main(capsys, "--config", str(path), "init-db")
    second = main(capsys, "--config", str(path), "init-db")

    assert first[0] == 0
    assert first[1].startswith("created: ")
    assert {t.strip() for t in first[1].split(":", 1)[1].split(",")} == OWN_AND_SITE
    assert OWN_AND_SITE <= _sqlite_tables(db_file)
    assert not {"b_user", "b_event"} & _sqlite_tables(db_file)  # a real site has them
    assert second[0] == 0
    assert second[1].strip() == "all tables already exist"


def test_init_db_never_alters_an_existing_site_table_on_sqlite(tmp_path, capsys):
    db_file = tmp_path / "site.db"
    with sqlite3.connect(db_file) as conn:  # the brief's DDL, as SQLite can hold it
        conn.execute("""CREATE TABLE local_lab_orders (
            ID INTEGER PRIMARY KEY AUTOINCREMENT, USER_ID INT NOT NULL,
            EXTERNAL_ORDER_ID VARCHAR(100) NOT NULL UNIQUE, ORDER_DATE DATE,
            STATUS VARCHAR(20) DEFAULT 'received', SYNCED_AT DATETIME)""")
        conn.execute("CREATE INDEX site_own_idx ON local_lab_orders (USER_ID)")
        conn.execute("INSERT INTO local_lab_orders (USER_ID, EXTERNAL_ORDER_ID) VALUES (5, 'X-1')")
    before = _sqlite_schema(db_file, "local_lab_orders")
    path = write_config(tmp_path / "labsync.toml", db_url=f"sqlite:///{db_file}",
                        base_url="http://127.0.0.1:9/v2", pdf_dir=tmp_path / "pdf")

    status, out, _ = main(capsys, "--config", str(path), "init-db")

    assert status == 0
    assert "local_lab_orders" not in out
    assert "local_lab_results" in out
    assert _sqlite_schema(db_file, "local_lab_orders") == before
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT USER_ID, EXTERNAL_ORDER_ID FROM local_lab_orders"
                            ).fetchall() == [(5, "X-1")]


@pytest.mark.mariadb
def test_init_db_on_mariadb_creates_the_rest_and_never_alters_the_site_table(
        mariadb, tmp_path, capsys):
    name = f"labsync_cli_{os.getpid()}_{secrets.token_hex(3)}"
    admin = mariadb.engine
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8 COLLATE utf8_unicode_ci"))
    url = make_url(mariadb.url).set(database=name)
    fresh = create_engine(url)
    try:
        [ddl] = [s for s in _seed_statements() if "CREATE TABLE local_lab_orders" in s]
        with fresh.begin() as conn:
            conn.execute(text(ddl))

        def show_create() -> str:
            with fresh.connect() as conn:
                return str(conn.execute(text("SHOW CREATE TABLE local_lab_orders")).one()[1])

        before = show_create()
        path = write_config(tmp_path / "labsync.toml",
                            db_url=url.render_as_string(hide_password=False),
                            base_url="http://127.0.0.1:9/v2", pdf_dir=tmp_path / "pdf")

        first = main(capsys, "--config", str(path), "init-db")
        second = main(capsys, "--config", str(path), "init-db")

        assert first[0] == 0
        created = {t.strip() for t in first[1].split(":", 1)[1].split(",")}
        assert created == OWN_AND_SITE - {"local_lab_orders"}
        assert second == (0, "all tables already exist\n", second[2])
        assert show_create() == before
    finally:
        fresh.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))


@pytest.mark.mariadb
def test_init_db_on_the_seeded_mariadb_site_changes_nothing(mariadb, tmp_path, capsys):
    tables = ["local_lab_orders", "local_lab_results", "labsync_orders", "labsync_passes"]

    def show_create() -> list[str]:
        with mariadb.engine.connect() as conn:
            return [str(conn.execute(text(f"SHOW CREATE TABLE {t}")).one()[1]) for t in tables]

    before = show_create()
    path = write_config(tmp_path / "labsync.toml", db_url=mariadb.url,
                        base_url="http://127.0.0.1:9/v2", pdf_dir=tmp_path / "pdf")

    status, out, _ = main(capsys, "--config", str(path), "init-db")

    assert (status, out.strip()) == (0, "all tables already exist")
    assert show_create() == before


# -- sync-once --------------------------------------------------------------------------------


def test_sync_once_completes_an_order_and_logs_json_to_stdout(db, fake_lis, cfg_path, tmp_path):
    add_user(db, 7, email="anna@example.org")
    add_order(db, "CLI-1", 7)
    fake_lis.add_order("CLI-1", results=RESULTS)

    proc = labsync("--config", str(cfg_path), "sync-once")

    assert proc.returncode == 0, proc.stderr
    assert order_row(db, "CLI-1").STATUS == "completed"
    assert len(results(db, "CLI-1")) == 3
    assert (tmp_path / "lab-results" / "7" / "CLI-1.pdf").is_file()
    events = [json.loads(line)["event"] for line in proc.stdout.splitlines()]
    assert "order.completed" in events and "pass.finished" in events
    assert API_KEY not in proc.stdout + proc.stderr


def test_sync_once_exits_0_when_an_order_fails(db, fake_lis, cfg_path):
    add_user(db, 7)
    add_order(db, "CLI-OK", 7)
    add_order(db, "CLI-BAD", 7)
    fake_lis.add_order("CLI-OK", results=RESULTS)
    fake_lis.add_order("CLI-BAD", results=RESULTS)
    fake_lis.inject("CLI-BAD", "results", Fault(status=500), times=None)

    proc = labsync("--config", str(cfg_path), "sync-once")

    assert proc.returncode == 0, proc.stderr
    assert order_row(db, "CLI-OK").STATUS == "completed"
    assert order_row(db, "CLI-BAD").STATUS == "received"


@pytest.mark.parametrize("command", ["sync-once", "init-db"])
def test_unreachable_database_exits_2_naming_the_database_not_the_password(tmp_path, command):
    path = write_config(tmp_path / "labsync.toml", db_url=UNREACHABLE_DB,
                        base_url="http://127.0.0.1:9/v2", pdf_dir=tmp_path / "pdf")

    proc = labsync("--config", str(path), command, timeout=60)

    assert proc.returncode == 2
    [message] = proc.stderr.splitlines()
    assert message.startswith("labsync: database (mysql+pymysql://labsync:***@127.0.0.1:1/bitrix)")
    assert DB_PASSWORD not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_run_exits_75_to_be_restarted_when_the_database_is_not_up_and_2_for_a_bad_config(
        tmp_path):
    """systemd restarts exit 75 (Restart=on-failure) but not exit 2 (RestartPreventExitStatus)."""
    path = write_config(tmp_path / "labsync.toml", db_url=UNREACHABLE_DB,
                        base_url="http://127.0.0.1:9/v2", pdf_dir=tmp_path / "pdf")

    proc = labsync("--config", str(path), "run", timeout=60)

    assert proc.returncode == 75
    [message] = proc.stderr.splitlines()
    assert message.startswith("labsync: database (mysql+pymysql://labsync:***@127.0.0.1:1/bitrix)")
    assert "try again later" in message
    assert DB_PASSWORD not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr

    path.write_text(path.read_text().replace("[pdf]", "[pdf]\nmax_bytes = -1"))
    bad = labsync("--config", str(path), "run", timeout=60)
    assert bad.returncode == 2
    assert "pdf.max_bytes" in bad.stderr


# -- check ------------------------------------------------------------------------------------


def test_check_all_good_exits_0(cfg_path, capsys):
    status, out, err = main(capsys, "--config", str(cfg_path), "check")

    assert status == 0, out
    assert "problem:" not in out
    assert "ok: database reachable" in out
    assert "API key accepted" in out
    assert API_KEY not in out + err


def test_check_says_what_the_adapter_can_do(cfg_path, capsys):
    status, out, _err = main(capsys, "--config", str(cfg_path), "check")

    assert status == 0, out
    assert ('ok: adapter "qlab" can: PDF source, order lookup, order placement, patient search'
            in out), out


def test_check_wrong_api_key_is_a_problem_naming_lis_api_key(db, fake_lis, tmp_path, capsys):
    wrong = "wrong-key-9f8e7d6c"
    path = write_config(tmp_path / "labsync.toml", db_url=db.url, base_url=fake_lis.base_url,
                        pdf_dir=tmp_path / "lab-results", api_key=wrong)

    status, out, err = main(capsys, "--config", str(path), "check")

    assert status == 1
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1
    assert problems[0].startswith("problem: lis.api_key:")
    assert wrong not in out + err
    assert API_KEY not in out + err


def test_check_world_readable_pdf_dir_is_a_problem(db, fake_lis, tmp_path, capsys):
    pdf_dir = tmp_path / "lab-results"
    pdf_dir.mkdir()
    pdf_dir.chmod(0o755)
    path = write_config(tmp_path / "labsync.toml", db_url=db.url, base_url=fake_lis.base_url,
                        pdf_dir=pdf_dir)

    status, out, _ = main(capsys, "--config", str(path), "check")

    assert status == 1
    [problem] = [line for line in out.splitlines() if line.startswith("problem:")]
    assert problem.startswith("problem: pdf.dir:")
    assert "0755" in problem


def test_check_private_existing_pdf_dir_is_fine(db, fake_lis, tmp_path, capsys):
    pdf_dir = tmp_path / "lab-results"
    pdf_dir.mkdir(mode=0o750)
    pdf_dir.chmod(0o750)
    path = write_config(tmp_path / "labsync.toml", db_url=db.url, base_url=fake_lis.base_url,
                        pdf_dir=pdf_dir)

    status, out, _ = main(capsys, "--config", str(path), "check")

    assert status == 0, out
    assert "writable and private" in out


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "not-yet-created"])
def test_check_pdf_dir_inside_the_web_root_is_a_problem(db, fake_lis, tmp_path, capsys, exists):
    web_root = tmp_path / "www"
    pdf_dir = web_root / "upload" / "lab-results"
    if exists:
        pdf_dir.mkdir(parents=True)
        pdf_dir.chmod(0o750)
    else:
        web_root.mkdir()
    path = write_config(tmp_path / "labsync.toml", db_url=db.url, base_url=fake_lis.base_url,
                        pdf_dir=pdf_dir, site={"document_root": str(web_root)})

    status, out, _ = main(capsys, "--config", str(path), "check")

    assert status == 1
    [problem] = [line for line in out.splitlines() if line.startswith("problem:")]
    assert problem.startswith("problem: pdf.dir:")
    assert "web root" in problem


def test_check_missing_tables_is_a_problem_pointing_to_init_db(fake_lis, tmp_path, capsys):
    path = write_config(tmp_path / "labsync.toml", db_url=f"sqlite:///{tmp_path / 'empty.db'}",
                        base_url=fake_lis.base_url, pdf_dir=tmp_path / "lab-results")

    status, out, err = main(capsys, "--config", str(path), "check")

    assert status == 1
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    init_db = [p for p in problems if "init-db" in p]
    assert {p.split("table ")[1].split()[0] for p in init_db} == OWN_AND_SITE
    assert all(p.startswith("problem: database") for p in problems)
    assert API_KEY not in out + err


def test_check_unreachable_database_is_a_problem_without_the_password(
        fake_lis, tmp_path, capsys):
    path = write_config(tmp_path / "labsync.toml", db_url=UNREACHABLE_DB,
                        base_url=fake_lis.base_url, pdf_dir=tmp_path / "lab-results")

    status, out, err = main(capsys, "--config", str(path), "check")

    assert status == 1
    [problem] = [line for line in out.splitlines() if line.startswith("problem:")]
    assert problem.startswith("problem: database.url:")
    assert DB_PASSWORD not in out + err


VERDICT_WORDS = ("ok: ", "warning: ", "skipped: ", "problem: ")


def test_check_lines_each_start_with_one_of_the_four_verdicts(cfg_path, capsys):
    status, out, _ = main(capsys, "--config", str(cfg_path), "check")

    assert status == 0, out
    assert out.splitlines() and all(line.startswith(VERDICT_WORDS) for line in out.splitlines())
    # The site has no b_event_message here: not verified, so not "ok".
    assert "skipped: mail templates not checked: b_event_message is not readable" in out
    assert "ok: mail templates not checked" not in out


def test_check_with_the_lis_down_reports_the_retries_in_its_line_not_as_log_lines(
        fake_lis, cfg_path, capsys):
    # 503 with Retry-After: 0 is retried at once: the retry happens, nothing really sleeps.
    fake_lis.inject(None, "results", Fault(status=503, headers={"Retry-After": "0"}), times=None)

    status, out, err = main(capsys, "--config", str(cfg_path), "check")

    assert status == 1
    assert fake_lis.request_count("results") == 2  # lis.retry_attempts = 2: it did retry
    assert "lis.retry" not in out + err
    assert all(line.startswith(VERDICT_WORDS) for line in out.splitlines())
    [problem] = [line for line in out.splitlines() if line.startswith("problem:")]
    assert problem.startswith(f"problem: lis.base_url: cannot use the LIS at {fake_lis.base_url}")
    assert "HTTP 503" in problem and "(2 tries in " in problem


def test_check_a_lis_that_answers_only_after_a_retry_is_a_warning_not_a_problem(
        fake_lis, cfg_path, capsys):
    fake_lis.inject(None, "results", Fault(status=503, headers={"Retry-After": "0"}), times=1)

    status, out, err = main(capsys, "--config", str(cfg_path), "check")

    assert status == 0, out
    assert "lis.retry" not in out + err
    [warning] = [line for line in out.splitlines() if "LIS reachable" in line]
    assert warning.startswith(f"warning: LIS reachable at {fake_lis.base_url}, API key accepted, "
                              "but only after 1 failed try (")
    assert "HTTP 503" in warning


def test_check_no_longer_holds_the_lis_logger_back_once_the_probe_is_done(
        fake_lis, cfg_path, capsys):
    fake_lis.inject(None, "results", Fault(status=503, headers={"Retry-After": "0"}), times=1)
    main(capsys, "--config", str(cfg_path), "check")

    assert not logging.getLogger("labsync.lis").filters  # the hold ended with the probe


@pytest.mark.mariadb
def test_check_a_3_byte_utf8_results_table_is_a_warning_and_exits_0(
        mariadb, fake_lis, tmp_path, capsys):
    path = write_config(tmp_path / "labsync.toml", db_url=mariadb.url,
                        base_url=fake_lis.base_url, pdf_dir=tmp_path / "lab-results")

    status, out, _ = main(capsys, "--config", str(path), "check")

    assert status == 0, out  # a warning and a skipped check: neither is a problem
    assert ("warning: local_lab_results is utf8 (3-byte): emoji in results will be stored as "
            "U+FFFD") in out
    assert any(line.startswith("skipped: ") for line in out.splitlines())
    assert not any(line.startswith("problem:") for line in out.splitlines())


# -- status and order -------------------------------------------------------------------------


@pytest.fixture
def after_a_pass(db, fake_lis, config, cfg_path) -> Path:
    """Three orders after one pass: ST-OK completed, ST-FAIL failing (HTTP 500), ST-WAIT
    still processing in the LIS. Returns the config file the CLI reads."""
    ten_days_ago = date.today() - timedelta(days=10)
    add_user(db, 7, email="anna@example.org")
    for ext in ("ST-OK", "ST-FAIL", "ST-WAIT"):
        add_order(db, ext, 7, order_date=ten_days_ago)
    fake_lis.add_order("ST-OK", results=RESULTS)
    fake_lis.add_order("ST-FAIL", results=RESULTS)
    fake_lis.add_order("ST-WAIT", status="processing", results=RESULTS[:1], pdf=None)
    fake_lis.inject("ST-FAIL", "results", Fault(status=500), times=None)
    summary = run_pass(config)
    assert (summary.completed, summary.failed, summary.pending) == (1, 1, 1)
    return cfg_path


def test_status_json_is_one_object_with_the_pass_the_failures_and_the_mail(after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "status", "--json")

    assert status == 0
    report = json.loads(out)
    assert isinstance(report, dict)
    assert {"pending", "failures_24h", "last_pass", "mail_queued_unsent"} <= set(report)
    assert report["pending"] == {"received": {"7-30 days": 1}, "processing": {"7-30 days": 1}}
    [failure] = report["failures_24h"]
    assert (failure["order"], failure["failures"], failure["kind"]) == ("ST-FAIL", 1, "transient")
    assert "500" in failure["error"]
    last = report["last_pass"]
    assert (last["CHECKED"], last["COMPLETED"], last["FAILED"], last["PENDING"]) == (3, 1, 1, 1)
    assert last["OUTCOME"] == "ok"
    assert report["mail_queued_unsent"] == 1


def test_status_text_names_the_failing_order(after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "status")

    assert status == 0
    assert "pending orders: 2" in out
    assert "orders failing in the last 24 h: 1" in out
    assert "ST-FAIL: 1x, transient" in out
    assert "mail events waiting for the site to send: 1" in out


def test_status_before_any_pass_says_so(cfg_path, capsys):
    status, out, _ = main(capsys, "--config", str(cfg_path), "status", "--json")

    assert status == 0
    report = json.loads(out)
    assert (report["pending"], report["failures_24h"], report["last_pass"],
            report["mail_queued_unsent"]) == ({}, [], None, 0)


def test_order_shows_polls_pdf_and_mail_of_a_completed_order(after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "order", "ST-OK")

    assert status == 0
    assert out.startswith("order ST-OK ")
    assert "completed" in out
    assert "polls 1" in out
    assert "7/ST-OK.pdf" in out
    assert "mail: queued, b_event #" in out
    assert "results stored: 3" in out
    assert "[abnormal]" in out


def test_order_shows_the_last_error_of_a_failing_order(after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "order", "ST-FAIL")

    assert status == 0
    assert "failures: 1 in a row, 1 in all" in out
    assert "HTTP 500" in out
    assert "results stored: 0" in out


_TIME = r"\d{4}-\d\d-\d\d(?: \d\d:\d\d:\d\d)?"


def _printed_time(out: str, before: str, label: str) -> datetime:
    """The time printed right after ``before``, which must carry ``label``."""
    match = re.search(re.escape(before) + rf" ({_TIME}) {re.escape(label)}", out)
    assert match, f"no {before!r} ... {label!r} in:\n{out}"
    return datetime.fromisoformat(match.group(1))


def test_order_labels_every_time_site_time_for_site_columns_utc_for_labsyncs(
        after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "order", "ST-OK")

    assert status == 0
    times = list(re.finditer(_TIME, out))
    assert len(times) >= 4
    for found in times:  # every time says which clock it is
        rest = out[found.end():]
        assert rest.startswith((" UTC", " (site, Europe/Moscow)")), out
    synced = _printed_time(out, "synced", "(site, Europe/Moscow)")
    last_poll = _printed_time(out, "last poll", "UTC")
    # The same pass wrote both: three hours apart is Moscow against UTC, so the labels are
    # on the right columns.
    assert timedelta(hours=3) - timedelta(minutes=2) < synced - last_poll < timedelta(
        hours=3, minutes=2)
    assert _printed_time(out, "ordered", "(site, Europe/Moscow)").date() == (
        date.today() - timedelta(days=10))
    assert "LIS status: completed" in out


def test_order_whose_polls_all_failed_says_there_is_no_answer_yet(after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "order", "ST-FAIL")

    assert status == 0
    assert "LIS status: no answer yet (its one poll failed)" in out
    assert "None" not in out


def test_order_the_lis_does_not_know_says_so(db, fake_lis, config, cfg_path, capsys):
    add_user(db, 7)
    add_order(db, "ST-GONE", 7)  # on the site, never in the LIS: it answers 404
    run_pass(config)

    status, out, _ = main(capsys, "--config", str(cfg_path), "order", "ST-GONE")

    assert status == 0
    assert "LIS status: unknown to the LIS (it answered 404" in out
    assert "None" not in out
    assert re.search(rf"last error {_TIME} UTC \(unknown_order\): ", out), out


def test_order_of_a_still_processing_order_shows_the_lis_status(after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "order", "ST-WAIT")

    assert status == 0
    assert "LIS status: processing" in out
    assert re.search(rf"next poll: {_TIME} UTC", out), out


def test_order_claimed_but_not_polled_yet_says_the_lis_was_not_asked(db, cfg_path, capsys):
    from sqlalchemy import insert

    from labsync.store.tables import labsync_orders

    add_user(db, 7)
    local_id = add_order(db, "ST-NEW", 7, order_date=date(2026, 11, 20))
    with db.engine.begin() as conn:  # what a pass's claim leaves before the first answer
        conn.execute(insert(labsync_orders).values(
            ORDER_ID=local_id, EXTERNAL_ORDER_ID="ST-NEW",
            FIRST_SEEN_AT=datetime(2026, 11, 20, 9, 0, 5), LEASE_OWNER="host-a:123",
            LEASE_UNTIL=datetime(2026, 11, 20, 9, 10, 5)))

    status, out, _ = main(capsys, "--config", str(cfg_path), "order", "ST-NEW")

    assert status == 0
    assert "LIS status: not asked yet" in out
    assert "ordered 2026-11-20 (site, Europe/Moscow); synced never" in out
    assert "first seen 2026-11-20 09:00:05 UTC; polls 0; last poll none" in out
    assert "claimed by host-a:123 until 2026-11-20 09:10:05 UTC" in out
    assert "None" not in out


def test_order_json_is_one_object(after_a_pass, capsys):
    status, out, _ = main(capsys, "--config", str(after_a_pass), "order", "ST-OK", "--json")

    assert status == 0
    report = json.loads(out)
    assert report["order"]["STATUS"] == "completed"
    assert report["labsync"]["MAIL_STATE"] == "queued"
    assert len(report["results"]) == 3


def test_unknown_order_exits_1(cfg_path, capsys):
    status, out, err = main(capsys, "--config", str(cfg_path), "order", "NO-SUCH-ORDER")

    assert status == 1
    assert out == ""
    assert "NO-SUCH-ORDER" in err


# -- demo -------------------------------------------------------------------------------------


def test_demo_shows_the_patient_view_and_runs_again_in_the_same_folder(tmp_path):
    folder = tmp_path / "d"

    for _ in range(2):
        proc = labsync("demo", "--dir", str(folder), cwd=tmp_path, timeout=60)

        assert proc.returncode == 0, proc.stderr
        for wanted in ("My tests", "ABNORMAL", ".pdf", "LAB_RESULTS_READY"):
            assert wanted in proc.stdout
        assert "Traceback" not in proc.stderr
    assert (folder / "labsync-demo.db").is_file()
    assert not (tmp_path / "labsync-demo").exists()


# -- review -----------------------------------------------------------------------------------


def test_review_lists_open_cases_and_dismiss_closes_one(db, cfg_path, capsys):
    from datetime import datetime

    from sqlalchemy import insert

    from labsync.store.tables import labsync_review

    with db.engine.begin() as conn:
        conn.execute(insert(labsync_review).values(
            EXTERNAL_ORDER_ID="CP-1", PHONE="+79161234567", REASON="ambiguous",
            CANDIDATES="7,8", DETAIL="two users share the phone",
            FIRST_SEEN_AT=datetime(2026, 11, 25), LAST_SEEN_AT=datetime(2026, 11, 25)))

    status, out, _ = main(capsys, "--config", str(cfg_path), "review", "--json")
    assert status == 0
    [case] = json.loads(out)
    assert (case["order"], case["reason"]) == ("CP-1", "ambiguous")
    status, out, _ = main(capsys, "--config", str(cfg_path), "review")
    assert status == 0 and "CP-1" in out
    assert main(capsys, "--config", str(cfg_path), "review", "--dismiss", "CP-1")[0] == 0
    assert json.loads(main(capsys, "--config", str(cfg_path), "review", "--json")[1]) == []
    assert main(capsys, "--config", str(cfg_path), "review", "--dismiss", "CP-1")[0] == 1
