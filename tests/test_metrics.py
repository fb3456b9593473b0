"""Prometheus metrics: disabled is free, enabled records passes, serves and writes a textfile."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from labsync.config.metrics import MetricsConfig, metrics_config_from
from labsync.errors import ConfigError
from labsync.metrics import Metrics
from labsync.sync import PassSummary

prometheus_client = pytest.importorskip("prometheus_client")
requests = pytest.importorskip("requests")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from an exposition text."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: bytes | str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def summary(**fields: object) -> PassSummary:
    defaults: dict[str, object] = {
        "pass_id": 1,
        "checked": 10,
        "completed": 4,
        "cancelled": 1,
        "pending": 3,
        "failed": 1,
        "skipped": 1,
        "events": 4,
        "duration_s": 12.5,
        "outcome": "ok",
    }
    defaults.update(fields)
    return PassSummary(**defaults)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- disabled -----------------------------------------------------------------------------


def test_disabled_metrics_do_nothing_and_never_import_prometheus() -> None:
    code = (
        "import sys\n"
        "from labsync.metrics import Metrics\n"
        "from labsync.sync import PassSummary\n"
        "m = Metrics(None)\n"
        "m.start(); m.pass_finished(PassSummary()); m.lis_error('transient')\n"
        "m.set_orders({'pending': 3}); m.set_mail_queue(7)\n"
        "assert m.render() == b''\n"
        "m.close()\n"
        "assert 'prometheus_client' not in sys.modules, 'imported while disabled'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_disabled_metrics_work_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    metrics = Metrics(None)
    metrics.pass_finished(summary())
    metrics.lis_error("auth")
    assert metrics.render() == b""
    assert not metrics.enabled


def test_enabled_metrics_without_the_package_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError) as caught:
        Metrics(MetricsConfig(port=9464))
    assert caught.value.problems == [
        "metrics: prometheus-client is not installed (pip install 'labsync[metrics]')"
    ]


# -- recording ----------------------------------------------------------------------------


def test_pass_finished_records_duration_outcomes_mail_and_timestamps() -> None:
    clock = Clock()
    metrics = Metrics(MetricsConfig(), clock=clock)
    metrics.pass_finished(summary())
    text = metrics.render()

    assert value(text, "labsync_pass_duration_seconds_count") == 1
    assert value(text, "labsync_pass_duration_seconds_sum") == 12.5
    assert value(text, "labsync_pass_duration_seconds_bucket", le="10.0") == 0
    assert value(text, "labsync_pass_duration_seconds_bucket", le="30.0") == 1
    expected = {"completed": 4, "cancelled": 1, "pending": 3, "failed": 1, "skipped": 1}
    for outcome, count in expected.items():
        assert value(text, "labsync_orders_processed_total", outcome=outcome) == count
    assert value(text, "labsync_mail_events_total") == 4
    assert value(text, "labsync_passes_total", outcome="ok") == 1
    assert value(text, "labsync_last_pass_timestamp_seconds") == clock.now
    assert value(text, "labsync_last_success_timestamp_seconds") == clock.now


def test_counters_accumulate_over_passes() -> None:
    metrics = Metrics(MetricsConfig(), clock=Clock())
    metrics.pass_finished(summary(completed=2, events=2, duration_s=1.0))
    metrics.pass_finished(summary(completed=5, events=1, duration_s=2.0))
    text = metrics.render()
    assert value(text, "labsync_orders_processed_total", outcome="completed") == 7
    assert value(text, "labsync_mail_events_total") == 3
    assert value(text, "labsync_pass_duration_seconds_count") == 2
    assert value(text, "labsync_pass_duration_seconds_sum") == 3.0


def test_last_success_moves_only_on_an_ok_pass() -> None:
    clock = Clock(1000.0)
    metrics = Metrics(MetricsConfig(), clock=clock)
    metrics.pass_finished(summary(outcome="ok"))
    clock.now = 2000.0
    metrics.pass_finished(summary(outcome="lis_auth"))
    clock.now = 3000.0
    metrics.pass_finished(summary(outcome="interrupted"))
    text = metrics.render()
    assert value(text, "labsync_last_pass_timestamp_seconds") == 3000.0
    assert value(text, "labsync_last_success_timestamp_seconds") == 1000.0
    assert value(text, "labsync_passes_total", outcome="lis_auth") == 1
    assert value(text, "labsync_passes_total", outcome="interrupted") == 1


def test_no_success_timestamp_before_the_first_ok_pass() -> None:
    metrics = Metrics(MetricsConfig(), clock=Clock(500.0))
    metrics.pass_finished(summary(outcome="lis_auth"))
    assert value(metrics.render(), "labsync_last_success_timestamp_seconds") == 0


def test_lis_errors_are_counted_per_kind_and_unknown_kinds_count_as_other() -> None:
    metrics = Metrics(MetricsConfig())
    for kind in ("transient", "transient", "auth", "pdf_not_ready", "lis", "surprise"):
        metrics.lis_error(kind)
    text = metrics.render()
    assert value(text, "labsync_lis_errors_total", kind="transient") == 2
    assert value(text, "labsync_lis_errors_total", kind="auth") == 1
    assert value(text, "labsync_lis_errors_total", kind="pdf_not_ready") == 1
    assert value(text, "labsync_lis_errors_total", kind="other") == 2
    assert value(text, "labsync_lis_errors_total", kind="bad_data") == 0  # present before any
    assert value(text, "labsync_lis_errors_total", kind="surprise") is None


def test_order_states_and_mail_queue_are_gauges_set_to_the_latest_counts() -> None:
    metrics = Metrics(MetricsConfig())
    metrics.set_orders({"pending": 12, "processing": 2, "stale": 1, "failing": 3})
    metrics.set_orders({"pending": 9, "failing": 1})
    metrics.set_mail_queue(40)
    metrics.set_mail_queue(5)
    text = metrics.render()
    assert value(text, "labsync_orders", state="pending") == 9
    assert value(text, "labsync_orders", state="processing") == 0
    assert value(text, "labsync_orders", state="stale") == 0
    assert value(text, "labsync_orders", state="failing") == 1
    assert value(text, "labsync_mail_queue_depth") == 5


def test_a_recording_failure_is_logged_not_raised() -> None:
    metrics = Metrics(MetricsConfig())
    with capture_logs() as logs:
        metrics.set_mail_queue("many")  # type: ignore[arg-type]
        metrics.set_orders({"pending": "lots"})  # type: ignore[dict-item]
        metrics.pass_finished(summary(completed="four"))
    assert [(e["event"], e["metric"]) for e in logs] == [
        ("metrics.record_failed", "mail_queue"),
        ("metrics.record_failed", "orders"),
        ("metrics.record_failed", "pass"),
    ]
    assert b"labsync_mail_queue_depth" in metrics.render()


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    first, second = Metrics(MetricsConfig()), Metrics(MetricsConfig())
    first.lis_error("auth")
    assert value(first.render(), "labsync_lis_errors_total", kind="auth") == 1
    assert value(second.render(), "labsync_lis_errors_total", kind="auth") == 0


# -- textfile -----------------------------------------------------------------------------


def test_textfile_is_written_after_a_pass_with_mode_0644_and_no_leftovers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "labsync.prom"
    old_umask = os.umask(0o077)  # a strict umask must not make the file unreadable
    try:
        metrics = Metrics(MetricsConfig(textfile=path), clock=Clock())
        assert not path.exists()
        metrics.pass_finished(summary())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert value(path.read_bytes(), "labsync_orders_processed_total", outcome="completed") == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labsync.prom"]


def test_textfile_is_replaced_not_rewritten_on_the_next_pass(tmp_path: Path) -> None:
    path = tmp_path / "labsync.prom"
    metrics = Metrics(MetricsConfig(textfile=path), clock=Clock())
    metrics.pass_finished(summary(completed=1))
    first_inode = path.stat().st_ino
    reader = path.open("rb")  # what node_exporter holds open keeps the old, whole text
    try:
        metrics.set_mail_queue(6)
        metrics.pass_finished(summary(completed=2))
        assert value(reader.read(), "labsync_orders_processed_total", outcome="completed") == 1
    finally:
        reader.close()
    text = path.read_bytes()
    assert path.stat().st_ino != first_inode
    assert value(text, "labsync_orders_processed_total", outcome="completed") == 3
    assert value(text, "labsync_mail_queue_depth") == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labsync.prom"]


def test_textfile_write_failure_is_logged_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "labsync.prom"
    metrics = Metrics(MetricsConfig(textfile=path))
    with capture_logs() as logs:
        metrics.pass_finished(summary())  # the directory does not exist: logged, pass goes on
    assert [e["event"] for e in logs] == ["metrics.textfile_failed"]
    assert logs[0]["path"] == str(path)
    assert not path.exists()


# -- HTTP endpoint ------------------------------------------------------------------------


def test_endpoint_serves_the_metrics_until_closed() -> None:
    port = free_port()
    metrics = Metrics(MetricsConfig(port=port), clock=Clock())
    metrics.start()
    try:
        assert metrics.port == port
        metrics.lis_error("transient")
        metrics.pass_finished(summary())
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.text
        assert value(text, "labsync_lis_errors_total", kind="transient") == 1
        assert value(text, "labsync_orders_processed_total", outcome="completed") == 4
        assert value(text, "labsync_last_success_timestamp_seconds") == Clock().now
    finally:
        metrics.close()
    assert metrics.port is None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.close()  # twice is fine


def test_a_port_in_use_is_a_config_error_naming_metrics_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = Metrics(MetricsConfig(port=port))
        with pytest.raises(ConfigError) as caught:
            metrics.start()
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"metrics.port: cannot listen on 127.0.0.1:{port}")


# -- config -------------------------------------------------------------------------------


def test_config_absent_or_empty_means_disabled() -> None:
    assert metrics_config_from({}) == (None, [])


def test_config_with_port_textfile_and_host(tmp_path: Path) -> None:
    raw = {"port": 9464, "textfile": str(tmp_path / "labsync.prom"), "host": "0.0.0.0"}
    config, problems = metrics_config_from(raw)
    assert problems == []
    assert config == MetricsConfig(port=9464, textfile=tmp_path / "labsync.prom", host="0.0.0.0")


def test_config_port_alone_listens_on_localhost() -> None:
    assert metrics_config_from({"port": 9464}) == (MetricsConfig(port=9464), [])


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"port": 0}, "metrics.port: must be an integer from 1 to 65535"),
        ({"port": 70000}, "metrics.port: must be an integer from 1 to 65535"),
        ({"port": "9464"}, "metrics.port: must be an integer from 1 to 65535"),
        ({"port": True}, "metrics.port: must be an integer from 1 to 65535"),
        ({"textfile": "labsync.prom"}, "metrics.textfile: must be an absolute path"),
        ({"textfile": 5}, "metrics.textfile: must be a string"),
        (
            {"textfile": "/nonexistent-dir-5c1e/labsync.prom"},
            "metrics.textfile: directory /nonexistent-dir-5c1e does not exist",
        ),
        ({"port": 9464, "host": ""}, "metrics.host: must be a non-empty string"),
        ({"host": "0.0.0.0"}, "metrics.host: has no effect without metrics.port"),
        ({"port": 9464, "listen": "x"}, "metrics.listen: unknown key"),
    ],
)
def test_config_problems_name_their_key(raw: dict[str, object], problem: str) -> None:
    config, problems = metrics_config_from(raw)
    assert config is None
    assert problems == [problem]


def test_config_textfile_must_end_in_prom(tmp_path: Path) -> None:
    config, problems = metrics_config_from({"textfile": str(tmp_path / "labsync.txt")})
    assert config is None
    assert len(problems) == 1 and problems[0].startswith("metrics.textfile: must end in .prom")


def test_config_reports_every_problem_at_once() -> None:
    _, problems = metrics_config_from({"port": -1, "textfile": "rel.prom", "colour": "red"})
    assert problems == [
        "metrics.colour: unknown key",
        "metrics.port: must be an integer from 1 to 65535",
        "metrics.textfile: must be an absolute path",
    ]


def test_config_not_a_table() -> None:
    assert metrics_config_from("9464") == (None, ["metrics: must be a table ([metrics])"])  # type: ignore[arg-type]
