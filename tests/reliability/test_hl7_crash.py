"""SIGKILL of `labsync run` while an HL7 sender streams results over MLLP, again and again;
and MariaDB restarted under it.

A sender (a thread of the test, like a LIS's MLLP client) sends one ORU^R01 after the other
and resends a message until it is acknowledged, reconnecting whenever the listener is gone.
Meanwhile `labsync run` is started and killed with SIGKILL at seeded random moments: while
messages are received, stored, acknowledged, applied. After the last kill one more
`labsync run` is left to finish. Then: every message was acknowledged, every order is
completed with exactly its one result row and exactly one mail, every delivery is recorded
once, and nothing is left in `queue/` or `error/`. A resend of a message that was stored but
not acknowledged before a kill is stored once (its key), and one applied but not moved to
`done/` is only marked done (its id in `labsync_deliveries`).

Through a MariaDB restart the listener goes on acknowledging (a message is stored on disk,
not in the database), and the inbox job applies what waited once the server is back.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from labsync.lis.hl7.ack import read_ack
from labsync.model import LisOrder, OrderStatus, TestResult
from labsync.testing.hl7_sender import MllpSender, oru
from tests import mariadb_server
from tests.helpers import add_orders, completed_count
from tests.processes import labsync, write_config
from tests.reliability.conftest import free_port, mail_counts, record, scaled

pytestmark = [pytest.mark.mariadb, pytest.mark.slow]

SEED = 20261202
SENT_AT = datetime(2026, 12, 1, 9, 0)


def _message(n: int) -> bytes:
    order = LisOrder(f"HK-{n:05d}", OrderStatus.COMPLETED,
                     (TestResult("GLU", "Glucose", f"{4 + n % 30 / 10:.1f}", "mmol/L"),))
    return oru(f"K-{n}", [order], sent_at=SENT_AT, sending_app="LIS", sending_facility="LAB")


class _Sender(threading.Thread):
    """Sends messages 0..count-1 in order, each until it is acknowledged ``AA``."""

    def __init__(self, port: int, count: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.pause = port, count, pause
        self.acked = 0
        self.attempts = 0
        self.refused: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn: MllpSender | None = None
        n = 0
        while n < self.count and not self.stop.is_set():
            try:
                if conn is None:
                    conn = MllpSender("127.0.0.1", self.port, timeout=10)
                self.attempts += 1
                code, control, *_rest = read_ack(conn.send(_message(n)))
            except OSError:  # the listener is gone (killed) or not up yet: reconnect, resend
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
                continue
            if code != "AA" or control != f"K-{n}":
                self.refused.append(f"K-{n}: {code} {control}")
                return
            n += 1
            self.acked = n
            time.sleep(self.pause)  # a LIS validating results one by one
        if conn is not None:
            conn.close()


def _hl7_site(site, tmp_path, count: int) -> tuple[Path, Path, int]:
    """``count`` pending orders and a config for the hl7 adapter listening on a free port:
    (config file, drop folder, port)."""
    add_orders(site, [f"HK-{n:05d}" for n in range(count)])
    port = free_port()
    drop_dir = tmp_path / "hl7"
    config = write_config(
        tmp_path / "c.toml", db_url=site.url, lis_url="http://127.0.0.1:9/unused",
        api_key="unused", pdf_dir=tmp_path / "pdfs", lis={"adapter": "hl7"},
        **{"lis.hl7": {"drop_dir": str(drop_dir), "listen": f"127.0.0.1:{port}"}},
        pdf={"required": False})
    return config, drop_dir, port


def _start_run(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``labsync run``, once its MLLP listener is up."""
    proc = labsync(config, "run", log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"labsync run exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"labsync run did not listen on port {port} within 30 s")


def _wait_all_applied(site, sender: _Sender, proc: subprocess.Popen[bytes], count: int
                      ) -> None:
    """Until the sender is through and every order is completed (at most 5 minutes)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (sender.is_alive() or completed_count(site) < count):
        assert proc.poll() is None, f"labsync run exited with {proc.returncode}"
        time.sleep(0.2)


def _assert_each_applied_once(site, sender: _Sender, drop_dir: Path, count: int) -> None:
    assert sender.refused == [] and sender.acked == count
    assert completed_count(site) == count
    assert site.scalar("SELECT COUNT(*) FROM local_lab_results") == count
    assert site.scalar("SELECT COUNT(DISTINCT ORDER_ID) FROM local_lab_results") == count
    assert site.scalar("SELECT COUNT(*) FROM b_event") == count
    assert set(mail_counts(site).values()) == {1}
    assert site.scalar("SELECT COUNT(*) FROM labsync_deliveries") == count
    assert [p.name for p in (drop_dir / "queue").iterdir()] == []
    assert list((drop_dir / "error").iterdir()) == []
    assert len(list((drop_dir / "done").iterdir())) == count


def test_sigkill_while_messages_stream_in_loses_and_doubles_nothing(site, tmp_path):
    kills = scaled(8, 30)
    count = scaled(400, 1500)
    rng = random.Random(SEED)
    config, drop_dir, port = _hl7_site(site, tmp_path, count)
    sender = _Sender(port, count, pause=0.03)
    sender.start()
    at_kill: list[dict[str, int]] = []
    try:
        for k in range(kills):
            proc = _start_run(config, port, tmp_path / f"kill-{k:02d}.log")
            time.sleep(rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            at_kill.append({"acked": sender.acked, "completed": completed_count(site)})
        assert sender.acked < count, "every message was through before the kills ended"

        final = labsync(config, "run", log=tmp_path / "final.log")
        try:
            _wait_all_applied(site, sender, final, count)
        finally:
            final.send_signal(signal.SIGTERM)
            assert final.wait(timeout=60) == 0
    finally:
        sender.stop.set()
        sender.join(10)

    _assert_each_applied_once(site, sender, drop_dir, count)
    record("SIGKILL of labsync run under an MLLP stream", injected=f"SIGKILL of labsync run, "
           f"{count} HL7 messages resent until acknowledged", times=kills,
           outcome="every message acknowledged and applied once; one mail each", lost=0,
           duplicated=0, sends=sender.attempts, resends=sender.attempts - count,
           detail=at_kill)


@pytest.mark.slow
def test_through_a_mariadb_restart_messages_are_acknowledged_and_then_applied_once(
        site, tmp_path):
    if not mariadb_server.can_restart():
        pytest.skip("cannot restart the local MariaDB server here")
    count = 600
    config, drop_dir, port = _hl7_site(site, tmp_path, count)
    proc = _start_run(config, port, tmp_path / "run.log")
    sender = _Sender(port, count, pause=0.01)
    try:
        sender.start()
        deadline = time.monotonic() + 60
        while completed_count(site) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = sender.acked
        mariadb_server.restart(down_for=3)  # returns once the server answers again
        acked_meanwhile = sender.acked - before
        _wait_all_applied(site, sender, proc, count)
    finally:
        if not mariadb_server.ping():
            mariadb_server.start()
        sender.stop.set()
        sender.join(10)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)

    log = (tmp_path / "run.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert "job.database_unavailable" in log  # the inbox job met the outage
    assert acked_meanwhile > 0  # stored and acknowledged while the database was down
    _assert_each_applied_once(site, sender, drop_dir, count)
    record("MariaDB restarted under labsync run with an MLLP stream",
           injected=f"server shut down for 3 s, {count} HL7 messages", times=1,
           outcome="the listener acknowledged throughout; every message applied once after",
           lost=0, duplicated=0, acknowledged_during_restart=acked_meanwhile)
