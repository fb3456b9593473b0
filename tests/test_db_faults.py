"""Database faults: the server restarted mid-pass, idle connections dropped."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import text

from labsync.testing.fake_qlab import FakeQlab
from labsync.testing.pdfs import sample_pdf
from tests import mariadb_server
from tests.conftest import API_KEY, add_order, add_user, make_config
from tests.helpers import RESULTS, add_orders, completed_count, run_pass
from tests.invariants import check_invariants, temp_files
from tests.processes import labsync, wait_until, write_config

pytestmark = pytest.mark.mariadb


@pytest.mark.slow
def test_daemon_survives_mariadb_restarting_mid_pass(mariadb, tmp_path):
    if not mariadb_server.can_restart():
        pytest.skip("cannot restart the local MariaDB server here")
    mariadb.clear()
    add_user(mariadb, 7)
    names = [f"R-{i:04d}" for i in range(300)]
    pdfs = {n: sample_pdf(f"Lab results {n}") for n in names}
    add_orders(mariadb, names)
    with FakeQlab(api_key=API_KEY, latency=0.02) as lis:
        for name in names:
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
        config = write_config(tmp_path / "c.toml", db_url=mariadb.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=tmp_path / "pdfs",
                              lis={"max_concurrency": 2}, sync={"interval": "2s",
                                                                "page_size": 20})
        proc = labsync(config, "run", log=tmp_path / "run.log")
        try:
            wait_until(lambda: completed_count(mariadb) >= 30, 60, "the pass to get going")
            mariadb_server.restart(down_for=2)
            assert proc.poll() is None, "the daemon died with the database"
            wait_until(lambda: completed_count(mariadb) == 300, 120,
                       "every order after the restart")
        finally:
            if not mariadb_server.ping():
                mariadb_server.start()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log[-3000:]
    assert "db.retry" in log or "job.failed" in log or "database" in log  # it did notice
    counts = check_invariants(mariadb, tmp_path / "pdfs",
                              expected_results={n: 3 for n in names}, expected_pdfs=pdfs)
    assert counts == {"completed": 300, "not_completed": 0}
    assert mariadb.scalar("SELECT COUNT(*) FROM b_event") == 300
    assert temp_files(tmp_path / "pdfs") == []


def test_connections_dropped_while_idle_are_replaced(mariadb, tmp_path):
    """As when the server's wait_timeout closes the pool's idle connections between passes."""
    mariadb.clear()
    add_user(mariadb, 7)
    with FakeQlab(api_key=API_KEY) as lis:
        config = make_config(mariadb, lis, tmp_path / "pdfs")
        from labsync.app import open_app
        from labsync.lis.qlab import QlabClient

        with open_app(config, lis=QlabClient(config.lis, sleep=lambda _s: None)) as app:
            add_order(mariadb, "W-1", 7)
            lis.add_order("W-1", results=RESULTS)
            assert app.sync.run_pass(due_only=False).completed == 1
            database = app.engine.url.database
            with mariadb.engine.connect() as admin:
                ids = admin.execute(text(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db "
                    "AND ID <> CONNECTION_ID()"), {"db": database}).scalars().all()
                for conn_id in ids:
                    admin.execute(text(f"KILL CONNECTION {int(conn_id)}"))
            assert ids, "the pool held no connection to drop"
            add_order(mariadb, "W-2", 7)
            lis.add_order("W-2", results=RESULTS)
            summary = app.sync.run_pass(due_only=False)
    assert summary.completed == 1 and summary.failed == 0
    assert mariadb.scalar("SELECT COUNT(*) FROM b_event") == 2


def test_sync_once_exits_2_when_the_database_is_down(tmp_path):
    config = write_config(tmp_path / "c.toml", db_url="mysql+pymysql://labsync:s3cret-pw@127.0.0.1:1/x",
                          lis_url="http://127.0.0.1:9/v2", api_key=API_KEY,
                          pdf_dir=tmp_path / "pdfs")
    proc = labsync(config, "sync-once", log=tmp_path / "out.log")
    assert proc.wait(timeout=60) == 2
    out = (tmp_path / "out.log").read_text()
    assert "database" in out and "s3cret-pw" not in out and "Traceback" not in out


def test_a_pass_run_directly_after_a_restart_recovers(mariadb, tmp_path):
    """The engine's own pool reconnects after the server came back (pool_pre_ping)."""
    if not mariadb_server.can_restart():
        pytest.skip("cannot restart the local MariaDB server here")
    mariadb.clear()
    add_user(mariadb, 7)
    with FakeQlab(api_key=API_KEY) as lis:
        config = make_config(mariadb, lis, tmp_path / "pdfs")
        add_order(mariadb, "X-1", 7)
        lis.add_order("X-1", results=RESULTS)
        assert run_pass(config).completed == 1
        mariadb_server.restart(down_for=0.5)
        add_order(mariadb, "X-2", 7)
        lis.add_order("X-2", results=RESULTS)
        assert run_pass(config).completed == 1
    check_invariants(mariadb, tmp_path / "pdfs", expected_results={"X-1": 3, "X-2": 3},
                     expected_pdfs={"X-1": sample_pdf(), "X-2": sample_pdf()})
