"""Database faults on real MariaDB: a restart under `sync-once`, connections dropped by a real
``wait_timeout`` under the daemon, a row lock held past ``innodb_lock_wait_timeout``, and a
deadlock with a second connection.

Not repeated here: the daemon through a restart, a pass directly after one, idle
connections killed with KILL CONNECTION, and `sync-once` against a server that is down
(tests/test_db_faults.py).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import pytest
import structlog
from sqlalchemy import text
from structlog.contextvars import merge_contextvars

from labsync.testing.fake_qlab import FakeQlab
from labsync.testing.pdfs import sample_pdf
from tests import mariadb_server
from tests.conftest import API_KEY, add_order, make_config
from tests.helpers import RESULTS, add_orders, completed_count, order_row, results
from tests.invariants import check_invariants, temp_files
from tests.processes import labsync, wait_until, write_config
from tests.reliability.conftest import record, run_pass_with

pytestmark = pytest.mark.mariadb


# -- a restart under sync-once --------------------------------------------------------------


@pytest.mark.slow
def test_sync_once_through_a_mariadb_restart_exits_2_and_the_next_pass_finishes(site, tmp_path):
    if not mariadb_server.can_restart():
        pytest.skip("cannot restart the local MariaDB server here")
    names = [f"R-{i:04d}" for i in range(200)]
    pdfs = {n: sample_pdf(f"Lab results {n}") for n in names}
    add_orders(site, names)
    pdf_dir = tmp_path / "pdfs"
    with FakeQlab(api_key=API_KEY, latency=0.03) as lis:
        for name in names:
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=pdf_dir, lis={"max_concurrency": 2},
                              sync={"page_size": 10, "lease": "2s"})
        proc = labsync(config, "sync-once", log=tmp_path / "once.log")
        try:
            wait_until(lambda: completed_count(site) >= 20, 60, "the pass to get going")
            mariadb_server.restart(down_for=3)
            code = proc.wait(timeout=120)
        finally:
            if not mariadb_server.ping():
                mariadb_server.start()
            if proc.poll() is None:
                proc.kill()
        out = (tmp_path / "once.log").read_text()
        assert code == 2, out[-3000:]
        assert "database" in out and "Traceback" not in out
        at_restart = check_invariants(site, pdf_dir, expected_results={n: 3 for n in names},
                                      expected_pdfs=pdfs)
        left = temp_files(pdf_dir)
        # The dead pass could not release its claims (the database was gone); they run out.
        time.sleep(2.1)
        proc = labsync(config, "sync-once", "--all", log=tmp_path / "again.log")
        assert proc.wait(timeout=120) == 0
    counts = check_invariants(site, pdf_dir, expected_results={n: 3 for n in names},
                              expected_pdfs=pdfs)
    assert counts == {"completed": len(names), "not_completed": 0}
    assert site.scalar("SELECT COUNT(*) FROM b_event") == len(names)
    record("MariaDB restarted under sync-once", injected="server shut down for 3 s mid-pass",
           times=1, outcome=f"exit 2 with one database line; {at_restart['completed']} done "
           f"before, the rest on the next pass", temp_files_left=len(left))
    assert left == [], f"{len(left)} temporary files left by the aborted pass"


# -- wait_timeout ----------------------------------------------------------------------------


@pytest.fixture
def short_wait_timeout(site):
    """``wait_timeout`` of 2 s for the ``rt_…`` accounts only (through ``init_connect``)."""
    with site.engine.begin() as conn:
        old = conn.execute(text("SELECT @@GLOBAL.init_connect")).scalar()
        if old:
            pytest.skip("init_connect is in use on this server")
        conn.execute(text(
            "SET GLOBAL init_connect = 'SET SESSION wait_timeout = "
            "IF(CURRENT_USER() LIKE ''rt\\\\_%'', 2, @@GLOBAL.wait_timeout)'"))
    try:
        yield 2
    finally:
        with site.engine.begin() as conn:
            conn.execute(text("SET GLOBAL init_connect = ''"))


def _connections_of(site, url: str) -> int:
    from sqlalchemy.engine import make_url

    return site.scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = :u",
                       u=make_url(url).username)


def test_the_daemon_goes_on_when_wait_timeout_drops_its_idle_connections(
        site, db_account, short_wait_timeout, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    pdfs: dict[str, bytes] = {}
    with FakeQlab(api_key=API_KEY) as lis:
        def add(name: str) -> None:
            pdfs[name] = sample_pdf(f"Lab results {name}")
            add_order(site, name, 7)
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])

        for i in range(5):
            add(f"W-0-{i}")
        config = write_config(tmp_path / "c.toml", db_url=db_account, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=pdf_dir, sync={"interval": "5s"})
        log = tmp_path / "run.log"
        proc = labsync(config, "run", log=log)
        drops = 0
        try:
            for round_ in range(1, 4):
                wait_until(lambda r=round_: completed_count(site) == 5 * r, 30, f"round {round_}")
                # Idle past wait_timeout: the server closes every connection of the pool.
                wait_until(lambda: _connections_of(site, db_account) == 0, 10,
                           "the server to drop the idle connections")
                drops += 1
                for i in range(5):
                    add(f"W-{round_}-{i}")
            wait_until(lambda: completed_count(site) == 20, 30, "the last round")
            assert proc.poll() is None, "the daemon died"
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert '"job.failed"' not in out and '"order.failed"' not in out
    counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                              expected_pdfs=pdfs)
    assert counts == {"completed": 20, "not_completed": 0}
    record("Idle connections dropped by wait_timeout", injected="wait_timeout=2 s for "
           "labsync's account; pool idle 5 s between passes", times=drops,
           outcome="daemon went on; every later pass reconnected without an error")


# -- row locks -------------------------------------------------------------------------------


@pytest.fixture
def short_lock_wait(site):
    """``innodb_lock_wait_timeout`` of 2 s for sessions opened from now on; restored after."""
    with site.engine.begin() as conn:
        old = conn.execute(text("SELECT @@GLOBAL.innodb_lock_wait_timeout")).scalar()
        conn.execute(text("SET GLOBAL innodb_lock_wait_timeout = 2"))
    try:
        yield 2
    finally:
        with site.engine.begin() as conn:
            conn.execute(text(f"SET GLOBAL innodb_lock_wait_timeout = {int(old)}"))


def _seed(site, lis: FakeQlab, names: list[str]) -> dict[str, bytes]:
    pdfs = {}
    for name in names:
        pdfs[name] = sample_pdf(f"Lab results {name}")
        add_order(site, name, 7)
        lis.add_order(name, results=RESULTS, pdf=pdfs[name])
    return pdfs


def test_a_row_locked_past_the_lock_wait_timeout_fails_that_order_only(
        site, short_lock_wait, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    names = ["L-1", "L-2", "L-3", "L-4", "L-5"]
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis, names)
        config = make_config(site, lis, pdf_dir)
        victim = order_row(site, "L-3").ID
        holder = site.engine.connect()
        try:
            holder.begin()
            holder.execute(text("SELECT * FROM local_lab_orders WHERE ID = :id FOR UPDATE"),
                           {"id": victim})  # the site, say, editing the order
            with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
                started = time.monotonic()
                summary = run_pass_with(config)
                took = time.monotonic() - started
        finally:
            holder.rollback()
            holder.close()
        assert (summary.completed, summary.failed) == (4, 1), summary
        retries = [e for e in logged if e["event"] == "db.retry"]
        assert len(retries) == 2 and all(e["kind"] == "lock" for e in retries)
        assert all("1205" in e["error"] for e in retries)
        state = site.rows("SELECT * FROM labsync_orders WHERE ORDER_ID = :id", id=victim)[0]
        assert state.FAILURES == 1 and "Lock wait timeout" in state.LAST_ERROR
        assert results(site, "L-3") == [] and temp_files(pdf_dir) == []
        check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                         expected_pdfs=pdfs)

        again = run_pass_with(config)
    assert again.completed == 1
    counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                              expected_pdfs=pdfs)
    assert counts == {"completed": 5, "not_completed": 0}
    record("Row lock held past innodb_lock_wait_timeout", injected="SELECT … FOR UPDATE on one "
           "local_lab_orders row for the whole pass; lock wait timeout 2 s", times=3,
           outcome=f"that order failed after 3 tries ({took:.1f} s pass), 4 others completed; "
           "completed next pass")


def _lock_waits(site, table: str) -> int:
    """Statements waiting (over 0.2 s) to lock rows of ``table`` with SELECT … FOR UPDATE."""
    return site.scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE :q "
                       "AND TIME_MS > 200", q=f"SELECT {table}.%FOR UPDATE")


def test_a_deadlock_with_another_connection_is_retried_and_the_order_completes(site, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    with FakeQlab(api_key=API_KEY) as lis:
        # D-1 is in the lab with preliminary results: its rows exist for the other side to lock.
        add_order(site, "D-1", 7)
        lis.add_order("D-1", status="processing", results=RESULTS)
        config = make_config(site, lis, pdf_dir)
        assert run_pass_with(config).pending == 1
        pdfs = {"D-1": sample_pdf("Lab results D-1")}
        lis.add_order("D-1", results=RESULTS, pdf=pdfs["D-1"])
        pdfs.update(_seed(site, lis, ["E-1", "E-2", "E-3", "E-4"]))
        order_id = order_row(site, "D-1").ID
        with site.engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS rt_scratch "
                              "(ID INT PRIMARY KEY, V INT) ENGINE=InnoDB"))
            conn.execute(text("DELETE FROM rt_scratch"))
            conn.execute(text("INSERT INTO rt_scratch VALUES " + ", ".join(
                f"({i}, 0)" for i in range(500))))
        problems: list[BaseException] = []
        holding = threading.Event()

        def other_side() -> None:
            """Lock D-1's result rows, wait for labsync to queue behind them, then want the
            order row labsync holds. The heavier transaction wins: labsync is the victim."""
            try:
                with site.engine.connect() as conn:
                    conn.begin()
                    conn.execute(text("UPDATE rt_scratch SET V = V + 1"))
                    conn.execute(text("SELECT ID FROM local_lab_results WHERE ORDER_ID = :id "
                                      "FOR UPDATE"), {"id": order_id})
                    holding.set()
                    wait_until(lambda: _lock_waits(site, "local_lab_results") > 0, 30,
                               "labsync to wait for the result rows")
                    conn.execute(text("SELECT ID FROM local_lab_orders WHERE ID = :id "
                                      "FOR UPDATE"), {"id": order_id})
                    time.sleep(0.3)
                    conn.rollback()
            except BaseException as exc:  # reported by the test below
                problems.append(exc)

        thread = threading.Thread(target=other_side)
        thread.start()
        try:
            assert holding.wait(10)
            with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
                summary = run_pass_with(config)
        finally:
            thread.join(60)
            with site.engine.begin() as conn:
                conn.execute(text("DROP TABLE IF EXISTS rt_scratch"))
    assert problems == []
    retries = [e for e in logged if e["event"] == "db.retry"]
    assert [e["kind"] for e in retries] == ["lock"] and "1213" in retries[0]["error"], retries
    assert (summary.completed, summary.failed) == (5, 0), summary
    counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                              expected_pdfs=pdfs)
    assert counts == {"completed": 5, "not_completed": 0}
    assert len(results(site, "D-1")) == 3  # the preliminary rows updated, not doubled
    record("Deadlock with a second connection", injected="the other side locks the order's "
           "result rows, then its order row", times=1,
           outcome="labsync chosen as victim (1213); transaction retried whole; completed in "
           "the same pass")


# -- a commit whose answer never comes -----------------------------------------------------


class _CommitEater:
    """A TCP proxy to MariaDB that, once, lets an order's COMMIT through and then cuts the
    connection before the server's answer reaches labsync: the commit happened, but labsync
    cannot know it. Packets are MySQL's: 3 bytes length, 1 byte sequence, payload."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = True
        self.eaten = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            mute = threading.Event()  # set: the server's answers no longer reach labsync
            threading.Thread(target=self._pipe, args=(server, client, mute),
                             daemon=True).start()
            threading.Thread(target=self._client_to_server, args=(client, server, mute),
                             daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, mute: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while (data := source.recv(65536)) and not mute.is_set():
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def _client_to_server(self, client: socket.socket, server: socket.socket,
                          mute: threading.Event) -> None:
        queued_mail = False
        buffer = b""
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                buffer += data
                while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:3],
                                                                               "little"):
                    size = 4 + int.from_bytes(buffer[:3], "little")
                    packet, buffer = buffer[:size], buffer[size:]
                    query = packet[5:].decode("utf-8", "replace").strip().upper() \
                        if packet[4:5] == b"\x03" else ""
                    queued_mail = queued_mail or query.startswith("INSERT INTO B_EVENT")
                    eat = query == "COMMIT" and queued_mail and self.armed
                    if eat:
                        mute.set()
                    server.sendall(packet)
                    if eat:
                        self.armed = False
                        self.eaten += 1
                        time.sleep(0.3)  # the server commits; its OK goes nowhere
                        server.shutdown(socket.SHUT_RDWR)
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    if query == "COMMIT":
                        queued_mail = False
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.close()


def test_a_commit_whose_answer_is_lost_is_not_done_twice(site, tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(site.url)
    proxy = _CommitEater((url.host, url.port or 3306))
    pdf_dir = tmp_path / "pdfs"
    try:
        with FakeQlab(api_key=API_KEY) as lis:
            pdfs = _seed(site, lis, ["A-1", "A-2", "A-3"])
            proxied = site.__class__(site.kind, url.set(host="127.0.0.1", port=proxy.port)
                                     .render_as_string(hide_password=False), site.engine)
            with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
                summary = run_pass_with(make_config(proxied, lis, pdf_dir))
    finally:
        proxy.close()
    assert proxy.eaten == 1
    # The lost commit was the batch's, all three first completions: a batch is tried once,
    # then each order alone, which finds it completed and leaves it.
    [batch] = [e for e in logged if e["event"] == "batch.one_by_one"]
    assert batch["orders"] == 3 and batch["error"].startswith("database error"), batch
    assert [e["event"] for e in logged].count("order.changed_meanwhile") == 3
    assert summary.failed == 0 and summary.completed + summary.skipped == 3, summary
    counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                              expected_pdfs=pdfs)
    assert counts == {"completed": 3, "not_completed": 0}
    assert site.scalar("SELECT COUNT(*) FROM b_event") == 3
    record("Commit acknowledgement lost", injected="a TCP proxy cuts the connection after the "
           "COMMIT of a batch of 3 first completions reached the server", times=1,
           outcome="each order then applied alone found itself completed and was left "
           "(order.changed_meanwhile ×3); one mail each, no twin rows")
