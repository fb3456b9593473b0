"""The daemon's schedule under a controlled clock: no real sleeping, no real passes.

APScheduler reads the time through ``datetime.now`` in its scheduler module; the tests
replace that with a clock they move by hand, and wake the scheduler up after each move.
The jobs are the daemon's own (its wrapper, its defaults), around a stand-in pass.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from io import StringIO
from types import SimpleNamespace

import apscheduler.schedulers.base as apscheduler_base
import pytest
import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from labsync import logs
from labsync.daemon import Daemon, job_defaults
from tests.helpers import restored_logging

INTERVAL = 900.0


class _Clock:
    """A datetime stand-in whose ``now`` is whatever the test says (ahead of real time)."""

    def __init__(self) -> None:
        self.now_value = datetime.now(UTC) + timedelta(days=1)

    def advance(self, seconds: float) -> None:
        self.now_value += timedelta(seconds=seconds)

    def now(self, tz=None):
        return self.now_value.astimezone(tz) if tz else self.now_value


class _Pass:
    """A stand-in for SyncEngine.run_pass: counts calls, can block or fail on demand."""

    liveness = SimpleNamespace(enabled=False)  # SQLite-like: no takeover job
    pushed = SimpleNamespace(has_inbox=False, has_feed=False)  # QLAB-like: asked order by order

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False
        self.done = threading.Semaphore(0)
        self._lock = threading.Lock()

    def run_pass(self, stop=None):
        with self._lock:
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.release.wait(10)
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("the pass broke")
            return SimpleNamespace(outcome="ok")
        finally:
            with self._lock:
                self.running -= 1
            self.done.release()


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()

    class FakeDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return fake.now(tz)

    monkeypatch.setattr(apscheduler_base, "datetime", FakeDatetime)
    return fake


def _started_daemon(clock: _Clock) -> tuple[Daemon, _Pass]:
    fake_pass = _Pass()
    app = SimpleNamespace(
        config=SimpleNamespace(sync=SimpleNamespace(interval=INTERVAL, stop_timeout=5),
                               discovery=SimpleNamespace(enabled=False)),
        sync=fake_pass, metrics=SimpleNamespace(enabled=False, pass_finished=lambda s: None),
        mail=None,
    )
    d = Daemon(app, env={}, scheduler_class=BackgroundScheduler)  # type: ignore[arg-type]
    d.add_jobs(now=clock.now_value)
    d.scheduler.remove_job("housekeeping")
    d.scheduler.start()
    return d, fake_pass


@pytest.fixture
def daemon(clock):
    d, fake_pass = _started_daemon(clock)
    yield d, fake_pass
    fake_pass.release.set()
    d.scheduler.shutdown(wait=True)


def _tick(d: Daemon, clock: _Clock, seconds: float) -> None:
    clock.advance(seconds)
    d.scheduler.wakeup()


def _wait_done(fake_pass: _Pass, n: int = 1) -> None:
    for _ in range(n):
        assert fake_pass.done.acquire(timeout=5), "the pass never ran"


def test_every_job_is_coalesced_single_instance_with_a_grace_time_of_one_interval():
    assert job_defaults(INTERVAL) == {"coalesce": True, "max_instances": 1,
                                      "misfire_grace_time": 900}


def test_first_pass_runs_at_start_then_once_per_interval(daemon, clock):
    d, fake_pass = daemon
    _wait_done(fake_pass)
    assert fake_pass.calls == 1
    _tick(d, clock, INTERVAL / 2)
    time.sleep(0.2)
    assert fake_pass.calls == 1
    _tick(d, clock, INTERVAL / 2)
    _wait_done(fake_pass)
    assert fake_pass.calls == 2


def test_a_long_pass_never_overlaps_itself(daemon, clock):
    d, fake_pass = daemon
    _wait_done(fake_pass)
    fake_pass.release.clear()  # the next pass hangs until released
    _tick(d, clock, INTERVAL)
    deadline = time.monotonic() + 5
    while fake_pass.running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(3):  # three more intervals pass while it is still running
        _tick(d, clock, INTERVAL)
        time.sleep(0.1)
    fake_pass.release.set()
    _wait_done(fake_pass)
    time.sleep(0.2)
    assert fake_pass.max_running == 1
    assert fake_pass.calls == 2


def test_runs_missed_while_the_host_slept_run_once_not_n_times(daemon, clock):
    d, fake_pass = daemon
    _wait_done(fake_pass)
    _tick(d, clock, INTERVAL * 10 + 1)  # ten intervals asleep
    _wait_done(fake_pass)
    time.sleep(0.3)
    assert fake_pass.calls == 2
    next_run = d.scheduler.get_job("sync").next_run_time
    assert next_run > clock.now_value  # the schedule moved on past the sleep


def test_apscheduler_info_chatter_stays_out_of_the_log_and_its_warnings_do_not(clock):
    stream = StringIO()
    with restored_logging():
        logs.setup("info", "json", stream=stream)  # as `labsync run` sets it up
        d, fake_pass = _started_daemon(clock)  # adds the jobs, then starts: the chatty part
        try:
            _wait_done(fake_pass)
            fake_pass.release.clear()  # the next pass hangs...
            _tick(d, clock, INTERVAL)
            deadline = time.monotonic() + 5
            while fake_pass.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            _tick(d, clock, INTERVAL)  # ...and is still running when the one after is due
            time.sleep(0.3)
        finally:
            fake_pass.release.set()
            d.scheduler.shutdown(wait=True)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    from_apscheduler = [line for line in lines if line["logger"].startswith("apscheduler")]
    [skipped] = from_apscheduler
    assert skipped["level"] == "warning"
    assert skipped["event"].startswith('Execution of job "sync ')
    assert "skipped: maximum number of running instances reached" in skipped["event"]


def test_a_failing_pass_is_logged_and_the_next_one_still_runs(daemon, clock):
    d, fake_pass = daemon
    _wait_done(fake_pass)
    fake_pass.fail_next = True
    with structlog.testing.capture_logs() as logged:
        _tick(d, clock, INTERVAL)
        _wait_done(fake_pass)
        time.sleep(0.1)
    assert any(e["event"] == "job.failed" and e["log_level"] == "error" for e in logged)
    _tick(d, clock, INTERVAL)
    _wait_done(fake_pass)
    assert fake_pass.calls == 3


def test_no_pass_starts_once_stopping(daemon, clock):
    d, fake_pass = daemon
    _wait_done(fake_pass)
    d.stop.set()
    _tick(d, clock, INTERVAL)
    time.sleep(0.3)
    assert fake_pass.calls == 1


def test_watchdog_pings_only_while_the_pass_makes_progress(tmp_path):
    import socket

    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(1)
    sync = SimpleNamespace(busy=True, progress_at=time.monotonic())
    app = SimpleNamespace(config=SimpleNamespace(sync=SimpleNamespace(interval=INTERVAL)),
                          sync=sync)
    d = Daemon(app, env={"NOTIFY_SOCKET": str(path)},  # type: ignore[arg-type]
               scheduler_class=BackgroundScheduler)
    d.watchdog_job(watchdog=60)
    assert server.recv(100) == b"WATCHDOG=1"
    sync.progress_at = time.monotonic() - 120  # no progress for two minutes
    d.watchdog_job(watchdog=60)
    with pytest.raises(TimeoutError):
        server.recv(100)
    sync.busy = False  # idle between passes is fine
    d.watchdog_job(watchdog=60)
    assert server.recv(100) == b"WATCHDOG=1"
    server.close()


def test_the_feed_job_runs_at_the_adapters_feed_interval(clock):
    fake_pass = _Pass()
    fake_pass.pushed = SimpleNamespace(has_inbox=False, has_feed=True,
                                       follow_feed=lambda stop=None: None)
    app = SimpleNamespace(
        config=SimpleNamespace(sync=SimpleNamespace(interval=INTERVAL, stop_timeout=5),
                               discovery=SimpleNamespace(enabled=False)),
        sync=fake_pass, metrics=SimpleNamespace(enabled=False, pass_finished=lambda s: None),
        mail=None, lis=SimpleNamespace(feed_interval=timedelta(seconds=7)),
    )
    d = Daemon(app, env={}, scheduler_class=BackgroundScheduler)  # type: ignore[arg-type]
    d.add_jobs(now=clock.now_value)

    assert d.scheduler.get_job("feed").trigger.interval == timedelta(seconds=7)
    assert d.scheduler.get_job("inbox") is None


def test_an_adapter_that_cannot_start_its_listener_exits_75_for_systemd_to_retry(clock):
    from labsync.errors import PermanentLisError

    class Busy:
        def start(self):
            raise PermanentLisError("lis.hl7.listen: cannot listen on 127.0.0.1:2575: in use")

    started = []
    app = SimpleNamespace(
        config=SimpleNamespace(sync=SimpleNamespace(interval=INTERVAL, stop_timeout=5),
                               discovery=SimpleNamespace(enabled=False)),
        sync=_Pass(), mail=None, lis=Busy(),
        metrics=SimpleNamespace(enabled=False, start=lambda: started.append("metrics")),
    )
    d = Daemon(app, env={}, scheduler_class=BackgroundScheduler)  # type: ignore[arg-type]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert d.run() == 75
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert started == [] and not d.scheduler.running
