"""A real `labsync run` process on MariaDB with the fake LIS over HTTP."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from labsync.testing.fake_qlab import FakeQlab, Fault
from labsync.testing.pdfs import sample_pdf
from tests.conftest import API_KEY, add_order, add_user
from tests.helpers import RESULTS, completed_count
from tests.invariants import check_invariants, temp_files
from tests.processes import labsync, wait_until, write_config

pytestmark = pytest.mark.mariadb


def _seed(db, lis: FakeQlab, names: list[str], pdfs: dict[str, bytes]) -> None:
    for name in names:
        add_order(db, name, 7)
        pdfs[name] = sample_pdf(f"Lab results {name}")
        lis.add_order(name, results=RESULTS, pdf=pdfs[name])


@pytest.fixture
def site(mariadb):
    mariadb.clear()
    add_user(mariadb, 7)
    return mariadb


def test_run_works_orders_off_picks_up_new_ones_and_stops_cleanly(site, tmp_path):
    pdfs: dict[str, bytes] = {}
    with FakeQlab(api_key=API_KEY) as lis:
        _seed(site, lis, [f"D-{i}" for i in range(30)], pdfs)
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=tmp_path / "pdfs",
                              sync={"interval": "1s"})
        proc = labsync(config, "run", log=tmp_path / "run.log")
        try:
            wait_until(lambda: completed_count(site) == 30, 30, "the first 30 orders")
            _seed(site, lis, [f"N-{i}" for i in range(5)], pdfs)  # added while it runs
            wait_until(lambda: completed_count(site) == 35, 30, "the orders added later")
            assert proc.poll() is None, "the daemon exited by itself"
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log[-2000:]
    assert '"daemon.stopped"' in log
    counts = check_invariants(site, tmp_path / "pdfs",
                              expected_results={k: 3 for k in pdfs}, expected_pdfs=pdfs)
    assert counts == {"completed": 35, "not_completed": 0}
    assert API_KEY not in log


def test_sigterm_mid_pass_exits_0_with_no_half_done_order(site, tmp_path):
    pdfs: dict[str, bytes] = {}
    with FakeQlab(api_key=API_KEY, latency=0.05) as lis:
        _seed(site, lis, [f"T-{i}" for i in range(300)], pdfs)
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=tmp_path / "pdfs",
                              lis={"max_concurrency": 4}, sync={"page_size": 50})
        proc = labsync(config, "run", log=tmp_path / "run.log")
        try:
            wait_until(lambda: completed_count(site) >= 20, 60, "the pass to get going")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log[-2000:]
    counts = check_invariants(site, tmp_path / "pdfs",
                              expected_results={k: 3 for k in pdfs}, expected_pdfs=pdfs)
    assert 20 <= counts["completed"] < 300, counts  # it really stopped mid-pass
    assert '"outcome": "interrupted"' in log
    assert temp_files(tmp_path / "pdfs") == []
    assert site.scalar("SELECT COUNT(*) FROM labsync_orders WHERE LEASE_OWNER IS NOT NULL") == 0


def test_a_second_signal_exits_at_once(site, tmp_path):
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs: dict[str, bytes] = {}
        _seed(site, lis, [f"S-{i}" for i in range(40)], pdfs)
        lis.inject(None, "results", Fault(delay=4), times=None)  # every answer is slow
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=tmp_path / "pdfs",
                              lis={"max_concurrency": 2}, sync={"stop_timeout": "60s"})
        proc = labsync(config, "run", log=tmp_path / "run.log")
        try:
            wait_until(lambda: "pass.started" in (tmp_path / "run.log").read_text(), 30,
                       "the first pass")
            # Requests in flight, each answered after 4 s: the pass cannot end before that.
            # (Signalled any sooner, it could cancel every queued order and exit 0 first.)
            wait_until(lambda: lis.in_flight > 0, 30, "the first LIS request")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the first one is being handled: the pass is winding down
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=5)
            assert time.monotonic() - started < 2
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code != 0
    check_invariants(site, tmp_path / "pdfs", expected_results={k: 3 for k in pdfs},
                     expected_pdfs=pdfs)
