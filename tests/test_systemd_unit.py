"""The systemd unit: systemd accepts it, its hardening stays under 2.0, and it agrees with
the example config and the docs (user, config path, credentials, PDF folder).

The systemd-analyze tests skip where the tool is missing (or too old for ``--offline``);
the consistency tests are plain Python and always run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from labsync.cli import EXIT_UNUSABLE
from labsync.config import LisConfig, SyncConfig, load
from labsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "labsync.service"
EXAMPLE_CONFIG = ROOT / "config" / "labsync.example.toml"
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
MAX_EXPOSURE = 2.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value assigned to it, in order (systemd allows repeats)."""
    found: dict[str, list[str]] = {}
    section = ""
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def seconds(span: str) -> float:
    """A systemd time span (``5min``, ``1min 30s``, ``60``) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "": 1, "s": 1, "sec": 1, "m": 60, "min": 60,
             "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return directives(UNIT.read_text())


@pytest.fixture(scope="module")
def example() -> dict:
    return tomllib.loads(EXAMPLE_CONFIG.read_text())


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, found {values}"
    return values[0]


def file_keys(table: dict, prefix: str = "") -> dict[str, str]:
    """Every ``*_file`` key of the config (dotted name -> path)."""
    found: dict[str, str] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            found |= file_keys(value, f"{prefix}{key}.")
        elif key.endswith("_file") and isinstance(value, str):
            found[prefix + key] = value
    return found


def defaults(cls: type) -> dict[str, object]:
    return {f.name: f.default for f in fields(cls)}


# --- what the unit must be ------------------------------------------------------------


def test_unit_is_a_notify_service_with_watchdog_and_restart(unit):
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert one(unit, "Service.ExecStart") == "/opt/labsync/bin/labsync run"
    assert one(unit, "Service.Restart") == "on-failure"
    assert seconds(one(unit, "Service.RestartSec")) > 0


def test_an_unusable_config_stops_the_unit_instead_of_restarting_it_every_10_s(unit):
    """labsync's exit 2 (unusable config, or no database at start) is not restarted, and
    operations.md says what the operator sees then and does."""
    assert one(unit, "Service.RestartPreventExitStatus") == str(EXIT_UNUSABLE) == "2"
    operations = OPERATIONS.read_text()
    assert "`RestartPreventExitStatus=2`" in operations
    assert "journalctl -u labsync" in operations and "systemctl restart labsync" in operations


def test_the_journal_lines_operations_md_shows_for_a_config_mistake_are_labsyncs_own(
        tmp_path):
    """The doc's sample is what labsync prints for that mistake (the example config with a
    misspelt time zone and a base URL without its scheme), not an invented one."""
    block = re.search(r"^```text\n(labsync: the configuration cannot be used:\n.*?)^```",
                      OPERATIONS.read_text(), re.M | re.S)
    assert block, "docs/operations.md shows no config mistake as the journal has it"
    _header, *shown = block.group(1).splitlines()
    text = EXAMPLE_CONFIG.read_text().replace('"Europe/Moscow"', '"Europe/Moskow"')
    text = text.replace('"https://api.qlab.ru/v2"', '"api.qlab.ru/v2"')
    path = tmp_path / "labsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load(path, env={})
    assert shown and {line.strip() for line in shown} <= set(raised.value.problems)


def test_watchdog_outlasts_one_lis_request_with_all_its_retries(unit):
    lis = defaults(LisConfig)
    worst_request = lis["retry_max_seconds"] + lis["connect_timeout"] + lis["read_timeout"]
    assert seconds(one(unit, "Service.WatchdogSec")) > 2 * worst_request


def test_systemd_waits_for_a_clean_stop_before_killing(unit):
    stop_timeout = defaults(SyncConfig)["stop_timeout"]
    assert seconds(one(unit, "Service.TimeoutStopSec")) >= stop_timeout + 30


@pytest.mark.parametrize(("key", "value"), [
    ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"), ("PrivateUsers", "yes"), ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""), ("AmbientCapabilities", ""),
    ("MemoryDenyWriteExecute", "yes"), ("RestrictNamespaces", "yes"),
    ("SystemCallArchitectures", "native"), ("UMask", "0027"), ("ProcSubset", "pid"),
    ("ProtectProc", "invisible"), ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
])
def test_unit_keeps_its_hardening(unit, key, value):
    assert one(unit, f"Service.{key}") == value


def test_system_calls_are_filtered_to_an_unprivileged_service(unit):
    assert unit["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


# --- the unit, the example config and the docs agree -----------------------------------


def test_unit_user_is_the_one_the_docs_create(unit):
    user = one(unit, "Service.User")
    assert one(unit, "Service.Group") == user == "labsync"
    assert re.search(rf"^useradd --system .* {user}$", OPERATIONS.read_text(), re.M)
    assert f"system user `{user}`" in README.read_text()


def test_unit_config_path_is_the_documented_default(unit, example):
    env = dict(v.split("=", 1) for v in unit["Service.Environment"])
    path = env["LABSYNC_CONFIG"]
    assert path == "/etc/labsync/labsync.toml"
    assert f"Copy to {path}" in EXAMPLE_CONFIG.read_text()
    for doc in (README, OPERATIONS):
        assert path in doc.read_text(), doc.name


def test_credentials_are_the_example_configs_secret_files(unit, example):
    secret_files = file_keys(example)
    assert set(secret_files) == {"database.password_file", "lis.api_key_file"}
    # systemd puts LoadCredential=ID at /run/credentials/{unit file name}/ID.
    folder = f"/run/credentials/{UNIT.name}/"
    names = set()
    for key, path in secret_files.items():
        assert path.startswith(folder), f"{key} = {path!r} is not under {folder}"
        names.add(path.removeprefix(folder))
    loaded = dict(v.split(":", 1) for v in unit["Service.LoadCredential"])
    assert set(loaded) == names
    operations, readme = OPERATIONS.read_text(), README.read_text()
    for name, source in loaded.items():
        assert source == f"/etc/labsync/credentials/{name}"
        assert source in operations, f"docs/operations.md does not create {source}"
        assert f"{folder}{name}" in readme, f"README.md does not show {folder}{name}"


def test_pdf_folder_is_the_one_writable_path_and_the_documented_one(unit, example):
    pdf_dir = example["pdf"]["dir"]
    assert unit["Service.ReadWritePaths"] == [pdf_dir]
    state_dirs = [f"/var/lib/{d}" for v in unit["Service.StateDirectory"] for d in v.split()]
    assert pdf_dir in state_dirs, "StateDirectory= must create the PDF folder"
    assert one(unit, "Service.StateDirectoryMode") == "0750"
    for doc in (README, OPERATIONS):
        assert pdf_dir in doc.read_text(), doc.name


def test_metrics_textfile_is_in_the_folder_the_documented_drop_in_makes_writable(unit):
    """The example's textfile, the doc's textfile and its ReadWritePaths= agree; the unit
    itself keeps only the PDF folder writable, so the textfile needs that drop-in."""
    found = re.search(r'^#\s*textfile\s*=\s*"([^"]+)"', EXAMPLE_CONFIG.read_text(), re.M)
    assert found, "config/labsync.example.toml has no [metrics] textfile example"
    textfile = Path(found.group(1))
    operations = OPERATIONS.read_text()
    assert f'"{textfile}"' in operations
    drop_in_paths = re.findall(r"^ReadWritePaths=(\S+)$", operations, re.M)
    assert str(textfile.parent) in drop_in_paths
    assert str(textfile.parent) not in unit["Service.ReadWritePaths"]


def test_docs_install_the_unit_this_repository_ships():
    operations = OPERATIONS.read_text()
    assert "systemd/labsync.service" in operations
    assert "systemctl enable --now labsync" in operations
    assert "/opt/labsync" in operations


# --- systemd's own view ----------------------------------------------------------------


def verify(unit_file: Path) -> list[str]:
    """``systemd-analyze verify`` on a copy whose ExecStart names a binary that exists.

    verify rejects an ExecStart whose binary is missing, and /opt/labsync is not installed
    where tests run; every other line of the unit is checked as written. Only complaints
    about this unit count: verify also loads the units it names (mariadb.service, ...).
    """
    true = shutil.which("true")
    assert true
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={true}", unit_file.read_text(), flags=re.M)
    copy = unit_file.parent / "checked" / "labsync.service"
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(text)
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", str(copy)],
        capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    complaints = [ln for ln in lines if str(copy) in ln or "labsync.service" in ln]
    if done.returncode != 0:
        complaints.append(f"exit status {done.returncode}")
    return complaints


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    unit_file = tmp_path / "labsync.service"
    shutil.copy(UNIT, unit_file)
    assert verify(unit_file) == []


@needs_systemd_analyze
@pytest.mark.parametrize("mistake", [
    ("ProtectSystem=strict", "ProtectSytem=strict"),
    ("WatchdogSec=5min", "WatchdogSec=five minutes"),
    ("Type=notify", "Type=notify-reload-please"),
])
def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path, mistake):
    """The check above is not vacuous: the same call reports a broken line."""
    good, bad = mistake
    text = UNIT.read_text()
    assert re.search(rf"^{re.escape(good)}$", text, re.M)
    unit_file = tmp_path / "labsync.service"
    unit_file.write_text(re.sub(rf"^{re.escape(good)}$", bad, text, flags=re.M))
    assert verify(unit_file)


@needs_systemd_analyze
def test_security_exposure_stays_below_two(tmp_path):
    unit_file = tmp_path / "labsync.service"
    shutil.copy(UNIT, unit_file)
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True, text=True, timeout=60)
    if "--offline" in done.stderr and ("unrecognized" in done.stderr
                                       or "unknown" in done.stderr):
        pytest.skip("systemd-analyze is older than 250: no security --offline")
    found = re.search(r"Overall exposure level for labsync\.service: (\d+(?:\.\d+)?)",
                      done.stdout)
    assert found, done.stdout + done.stderr
    exposure = float(found.group(1))
    assert exposure < MAX_EXPOSURE, done.stdout
