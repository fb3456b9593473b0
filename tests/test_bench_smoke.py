"""The benchmark cannot rot: a small run of ``bench/perf.py``, and the LIS load caps it relies on.

No assertion here is about speed. The smoke run checks the benchmark's structure and that
both contenders wrote exactly what they should; the timing targets live in its report
(docs/performance.md). The cap tests check a property of labsync, not a speed: never more
than ``lis.max_concurrency`` requests in flight, never more than ``lis.max_rps`` started in
any second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from labsync import config as config_mod
from labsync.app import open_app
from labsync.testing.fake_qlab import FakeQlab, sample_results, seed_plan
from tests.conftest import API_KEY, MARIADB_ADMIN_URL, Db, add_order, add_user, make_config
from tests.helpers import run_pass

ROOT = Path(__file__).resolve().parent.parent


def _bench_databases() -> set[str]:
    engine = create_engine(MARIADB_ADMIN_URL)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text("SHOW DATABASES LIKE 'labsync\\_bench\\_%'")).scalars())
    finally:
        engine.dispose()


@pytest.mark.mariadb
def test_floor_benchmark_smoke_run_prints_every_figure(mariadb: Db):
    finished = subprocess.run(
        [sys.executable, "-m", "bench.floor", "--requests", "5", "--orders", "10",
         "--admin-url", MARIADB_ADMIN_URL],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)

    assert finished.returncode == 0, finished.stderr[-3000:]
    figures = dict(line.rsplit("  ", 1) for line in finished.stdout.splitlines())
    assert len(figures) == 11
    assert all(float(value.split()[0]) > 0 for value in figures.values())
    names = {name.strip() for name in figures}
    assert "observe step, 16 worker(s), per order (half with PDF)" in names
    assert "observe step, 1 worker(s), per order (all with PDF)" in names


@pytest.mark.mariadb
@pytest.mark.slow
def test_benchmark_smoke_run_measures_both_and_checks_what_they_wrote(mariadb: Db, tmp_path):
    out = tmp_path / "report.json"
    before = _bench_databases()

    finished = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--orders", "40", "--latency", "0.01",
         "--concurrency", "4", "--pdf-size", "20000", "--rss-orders", "0", "--noop-runs", "1",
         "--repeat", "2", "--profile", "--profile-top", "5", "--admin-url", MARIADB_ADMIN_URL,
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "BASELINE" in finished.stdout and "targets:" in finished.stdout
    report = json.loads(out.read_text())
    [run] = report["runs"]
    baseline, labsync = run["baseline"], run["labsync"]
    for measured in (baseline, labsync):
        assert measured["ok"] and measured["exit_code"] == 0
        assert measured["completed"] == measured["expected_completed"] == 20
        assert measured["events"] == measured["pdf_files"] == 20
        assert measured["result_rows"] == 20 * 10
        assert measured["duplicate_results"] == measured["pdf_wrong_size"] == 0
        assert measured["event_log_rows"] == 0
        assert measured["lis_by_endpoint"] == {"pdf": 20, "results": 40}
        assert measured["lis_requests"] == 60
        assert measured["wall_s"] > 0 and measured["cpu_s"] > 0 and measured["peak_rss_mb"] > 0
        assert measured["maxrss_wait4_mb"] > 0
        assert measured["little_limit_s"] > 0
    assert baseline["lis_max_in_flight"] == 1
    assert 1 <= labsync["lis_max_in_flight"] <= 4
    assert labsync["pass"]["completed"] == 20 and labsync["pass"]["failed"] == 0
    assert labsync["cpu_ms_per_completed"] is not None and labsync["cpu_ms_per_completed"] >= 0
    assert run["speedup"] > 0
    repeats = run["labsync_repeats"]
    assert len(repeats) == 2 and all(r["ok"] for r in repeats)
    assert labsync["cpu_ms_per_completed"] in [r["cpu_ms_per_completed"] for r in repeats]
    assert report["noop"]["cpu_s"] > 0
    assert report["rss"] is None
    assert report["profile"]["top"] and report["profile"]["profiled_cpu_s"] > 0
    threads = report["profile"]["threads"]
    assert threads["exit_code"] == 0
    assert threads["by_thread_s"]["main"] > 0 and threads["by_thread_s"]["labsync-lis"] > 0
    assert "the LIS workers" in finished.stdout
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    assert report["targets"][-1]["met"]  # every run wrote exactly what it should
    assert _bench_databases() <= before  # the scratch database is dropped


def test_seed_plan_spreads_the_completed_share_evenly() -> None:
    plan = seed_plan(100_000, completed_ratio=0.1)

    assert sum(done for _id, done in plan) == 10_000
    assert [done for _id, done in plan[:11]] == [True] + [False] * 9 + [True]
    assert plan[-1][0] == "QL-100000"
    assert [done for _id, done in seed_plan(4)] == [True, False, True, False]


def _orders(db: Db, fake: FakeQlab, count: int, *, completed_every: int) -> None:
    add_user(db, 7)
    for i in range(count):
        external_id = f"CAP-{i:04d}"
        add_order(db, external_id, 7)
        if i % completed_every == 0:
            fake.add_order(external_id, results=sample_results(3))
        else:
            fake.add_order(external_id, status="processing", pdf=None)


def test_lis_requests_in_flight_never_exceed_max_concurrency(db, fake_lis, tmp_path):
    fake_lis.latency = 0.05  # long enough for every worker to be waiting at once
    _orders(db, fake_lis, 60, completed_every=2)
    config = make_config(db, fake_lis, tmp_path / "pdfs", lis={"max_concurrency": 3})

    summary = run_pass(config)

    assert (summary.checked, summary.completed, summary.failed) == (60, 30, 0)
    assert fake_lis.request_count() == 90
    assert fake_lis.max_in_flight == 3  # reached, never passed


def test_lis_requests_keep_to_max_rps_under_load(db, tmp_path):
    """The fake runs in a process of its own: in this one, its arrival times would wait for
    the GIL behind labsync's threads and bunch up, which is not what an LIS sees."""
    rps, orders = 20.0, 20
    add_user(db, 7)
    for external_id, _completed in seed_plan(orders, prefix="CAP-", completed_ratio=1.0):
        add_order(db, external_id, 7)
    fake = subprocess.Popen(
        [sys.executable, "-m", "labsync.testing.fake_qlab", "--port", "0", "--api-key",
         API_KEY, "--orders", str(orders), "--prefix", "CAP-", "--completed-ratio", "1",
         "--results", "3", "--latency", "0.02", "--stats", "--times"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        base_url = fake.stdout.readline().strip()
        config = config_mod.from_mapping({
            "database": {"url": db.url}, "site": {"timezone": "Europe/Moscow"},
            "lis": {"adapter": "qlab", "base_url": base_url, "api_key": API_KEY,
                    "max_rps": rps, "max_concurrency": 8},
            "pdf": {"dir": str(tmp_path / "pdfs")}, "notify": {"site_id": "s1"}}, env={})
        with open_app(config) as app:  # the real client: its rate limiter really sleeps
            summary = app.sync.run_pass(due_only=False)
    finally:
        fake.terminate()
        stats = json.loads(fake.communicate(timeout=30)[0].splitlines()[-1])

    assert (summary.completed, summary.failed) == (orders, 0)
    starts = sorted(stats["request_times"])
    assert len(starts) == 2 * orders
    # Eight workers would send all 40 in ~0.1 s; the cap spaces them 1/rps apart.
    assert starts[-1] - starts[0] >= (len(starts) - 1) / rps - 0.05
    busiest = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert busiest <= rps + 1  # one of slack: a request the scheduler held back a moment


def test_peak_rss_is_the_childs_own_not_the_benchmarks(tmp_path) -> None:
    """Linux carries the parent's RSS into an exec'd child's ru_maxrss; the benchmark, which
    holds the seeded orders, must not report its own size as labsync's."""
    from bench.measure import run_measured

    ballast = bytearray(200 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: resident
    measured = run_measured([sys.executable, "-c", "import time; time.sleep(0.3)"],
                            tmp_path / "child.log")
    del ballast
    assert measured["exit_code"] == 0
    assert measured["maxrss_wait4_mb"] >= 200  # what wait4 alone would have said
    assert 0 < measured["peak_rss_mb"] < 100


@pytest.mark.mariadb
def test_fhir_feed_benchmark_smoke_run_delivers_every_completed_order_once(mariadb: Db,
                                                                          tmp_path):
    """``bench.fhir_feed`` at a tiny size: both runs (feed, then order-by-order polling)
    deliver every order the fake lab completed, exactly once, and the report has every
    figure. Nothing about speed is asserted."""
    out = tmp_path / "fhir.json"
    before = _bench_databases()

    finished = subprocess.run(
        [sys.executable, "-m", "bench.fhir_feed", "--orders", "40", "--rate", "2",
         "--duration", "3", "--feed-interval", "1s", "--sync-interval", "3s",
         "--pdf-size", "20000", "--idle-sizes", "10,40", "--idle-reads", "3",
         "--sim-warmup-days", "0", "--admin-url", MARIADB_ADMIN_URL, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "goals (issue 13):" in finished.stdout and "simulated" in finished.stdout
    report = json.loads(out.read_text())
    for name, feed in (("feed", True), ("polling", False)):
        run = report[name]
        delivery, checked, window = run["delivery"], run["verify"], run["window"]
        assert run["feed"] is feed and run["ok"]
        assert run["labsync"]["exit_code"] == 0
        assert delivery["completed_in_lis"] == run["driver"]["completed"] >= 4
        assert delivery["delivered"] == delivery["completed_in_lis"]
        assert delivery["not_delivered"] == 0
        assert 0 <= delivery["delay_median_s"] <= delivery["delay_p95_s"]
        assert checked["exactly_once"]
        assert checked["completed"] == checked["ready_mails"] == checked["pdf_files"] \
            == delivery["delivered"]
        assert checked["result_rows"] == 10 * delivery["delivered"]
        assert checked["duplicate_results"] == checked["other_mails"] == 0
        assert checked["completed_not_in_lis"] == checked["completed_in_lis_missing"] == 0
        assert window["pdf_requests"] == delivery["delivered"]  # one Binary read each
        assert window["requests"]["observation"] == 0  # the searches include them
        assert window["requests_per_delivered"] is not None
        assert window["labsync_cpu_s"] >= 0 and run["warmup"]["s"] > 0
    assert report["feed"]["window"]["requests"]["search"] == 0  # the feed brings it all
    assert report["feed"]["window"]["requests"]["feed"] >= 1
    assert report["polling"]["window"]["requests"]["feed"] == 0
    assert report["polling"]["window"]["requests"]["search"] >= 40  # a pass asks them all
    assert [i["pending_orders"] for i in report["idle"]] == [10, 40]
    for idle in report["idle"]:
        assert idle["first_read"]["applied"] == 1
        assert idle["requests_per_read"] == {"median": 1, "min": 1, "max": 1}
        assert idle["cpu_ms"]["median"] > 0
    assert {g["name"] for g in report["goals"]} >= {"exactly once"}
    assert all(isinstance(g["met"], bool) for g in report["goals"])
    assert set(report["simulation"]) >= {"from_empty", "steady_state"}
    assert _bench_databases() <= before  # the scratch database is dropped
