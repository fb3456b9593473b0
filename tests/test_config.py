"""Loading the TOML configuration: expansion, secrets, validation, every problem at once."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from labsync import config as config_mod
from labsync.config import Config, Secret, load, parse_duration
from labsync.errors import ConfigError

API_KEY = "qlab-key-7c1e2f9a0b"
DB_PASSWORD = "db-pass-4d8e1a"

FULL = f"""
[database]
url = "mysql+pymysql://labsync:{DB_PASSWORD}@127.0.0.1:3306/bitrix"
pool_size = 3

[site]
timezone = "Asia/Yekaterinburg"
document_root = "/var/www/site"

[lis]
adapter = "qlab"
base_url = "https://api.qlab.ru/v2/"
api_key = "{API_KEY}"
max_concurrency = 4
max_rps = 2.5

[pdf]
dir = "/var/lib/labsync/lab-results"

[notify]
backend = "bitrix"
site_id = "s2"
event_name = "MY_LAB_EVENT"
result_url = "/lk/analyses/{{order_id}}/"
duplicate = "Y"

[sync]
interval = "5m"
stale_after = "14d"

[log]
level = "debug"
format = "json"
"""

# The least a config needs; everything else has a default.
MINIMAL = """
[database]
url = "sqlite:////var/lib/labsync/site.db"

[lis]
base_url = "https://api.qlab.ru/v2"
api_key = "qlab-key-minimal-1"

[pdf]
dir = "/var/lib/labsync/lab-results"
"""


def write(tmp_path: Path, text: str, name: str = "labsync.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env=env or {})
    return info.value.problems


def minimal_with(**sections: dict[str, object]) -> dict[str, dict[str, object]]:
    raw: dict[str, dict[str, object]] = {
        "database": {"url": "sqlite:////var/lib/labsync/site.db"},
        "lis": {"base_url": "https://api.qlab.ru/v2", "api_key": "qlab-key-minimal-1"},
        "pdf": {"dir": "/var/lib/labsync/lab-results"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def mapping_problems(raw: dict[str, dict[str, object]], env: dict[str, str] | None = None
                     ) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.from_mapping(raw, env=env or {})
    return info.value.problems


# -- a valid file ---------------------------------------------------------------------------


def test_full_valid_file_loads_every_value(tmp_path):
    path = write(tmp_path, FULL)

    config = load(path, env={})

    assert isinstance(config, Config)
    assert config.source == str(path)
    assert config.database.url.drivername == "mysql+pymysql"
    assert config.database.url.password == DB_PASSWORD
    assert config.database.pool_size == 3
    assert not config.database.is_sqlite
    assert config.site.timezone.key == "Asia/Yekaterinburg"
    assert config.site.document_root == Path("/var/www/site")
    assert config.lis.adapter == "qlab"
    assert config.lis.base_url == "https://api.qlab.ru/v2"  # trailing slash dropped
    assert config.lis.api_key.reveal() == API_KEY
    assert (config.lis.max_concurrency, config.lis.max_rps) == (4, 2.5)
    assert config.pdf.dir == Path("/var/lib/labsync/lab-results")
    assert (config.notify.site_id, config.notify.event_name, config.notify.duplicate) == (
        "s2", "MY_LAB_EVENT", "Y")
    assert config.notify.result_url == "/lk/analyses/{order_id}/"
    assert config.sync.interval == 300.0
    assert config.sync.stale_after == 14 * 86400.0
    assert (config.log.level, config.log.format) == ("debug", "json")


def test_config_is_frozen_all_the_way_down(tmp_path):
    config = load(write(tmp_path, FULL), env={})

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lis = config.lis  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lis.base_url = "https://elsewhere.example/v2"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sync.interval = 1.0  # type: ignore[misc]


def test_minimal_file_gets_the_documented_defaults(tmp_path):
    config = load(write(tmp_path, MINIMAL), env={})

    assert config.sync.interval == 900.0
    assert config.lis.max_concurrency == 8
    assert config.lis.adapter == "qlab"
    assert config.notify.event_name == "LAB_RESULTS_READY"
    assert config.notify.duplicate == "N"
    assert config.notify.site_id == "s1"
    assert config.notify.backend == "bitrix"
    assert config.notify.result_url == "/personal/lab-results/{order_id}/"
    assert config.site.timezone.key == "Europe/Moscow"
    assert config.site.document_root is None
    assert config.database.is_sqlite


# -- ${ENV} and *_file ----------------------------------------------------------------------


def test_env_references_are_expanded_in_strings(tmp_path):
    path = write(tmp_path, """
        [database]
        url = "mysql+pymysql://labsync:${LABSYNC_DB_PASSWORD}@${DB_HOST}:3306/bitrix"
        [lis]
        base_url = "https://${LIS_HOST}/v2"
        api_key = "${QLAB_API_KEY}"
        [pdf]
        dir = "/var/lib/labsync/lab-results"
    """)

    config = load(path, env={"LABSYNC_DB_PASSWORD": DB_PASSWORD, "DB_HOST": "db.internal",
                             "LIS_HOST": "api.qlab.ru", "QLAB_API_KEY": API_KEY})

    assert config.database.url.password == DB_PASSWORD
    assert config.database.url.host == "db.internal"
    assert config.lis.base_url == "https://api.qlab.ru/v2"
    assert config.lis.api_key.reveal() == API_KEY


def test_unset_env_variable_is_a_problem_naming_the_key_and_the_variable(tmp_path):
    path = write(tmp_path, MINIMAL.replace('"qlab-key-minimal-1"', '"${QLAB_API_KEY}"'))

    problems = problems_of(path, env={"SOMETHING_ELSE": "x"})

    assert len(problems) == 1
    assert problems[0].startswith("lis.api_key:")
    assert "QLAB_API_KEY" in problems[0]


def test_env_is_read_from_the_process_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LABSYNC_TEST_KEY", API_KEY)
    path = write(tmp_path, MINIMAL.replace('"qlab-key-minimal-1"', '"${LABSYNC_TEST_KEY}"'))

    assert load(path).lis.api_key.reveal() == API_KEY


def test_secrets_are_read_from_files_without_the_trailing_newline(tmp_path):
    (tmp_path / "qlab_api_key").write_text(API_KEY + "\n", encoding="utf-8")
    (tmp_path / "db_password").write_text(DB_PASSWORD + "\n", encoding="utf-8")
    path = write(tmp_path, f"""
        [database]
        url = "mysql+pymysql://labsync@127.0.0.1:3306/bitrix"
        password_file = "{tmp_path}/db_password"
        [lis]
        base_url = "https://api.qlab.ru/v2"
        api_key_file = "{tmp_path}/qlab_api_key"
        [pdf]
        dir = "/var/lib/labsync/lab-results"
    """)

    config = load(path, env={})

    assert config.lis.api_key.reveal() == API_KEY
    assert config.database.url.password == DB_PASSWORD
    assert config.database.url.username == "labsync"


def test_secret_file_path_may_use_the_systemd_credentials_directory(tmp_path):
    (tmp_path / "qlab_api_key").write_text(API_KEY, encoding="utf-8")
    path = write(tmp_path, MINIMAL.replace(
        'api_key = "qlab-key-minimal-1"',
        'api_key_file = "${CREDENTIALS_DIRECTORY}/qlab_api_key"'))

    config = load(path, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert config.lis.api_key.reveal() == API_KEY


def test_missing_secret_file_is_a_problem_naming_the_file_key(tmp_path):
    path = write(tmp_path, f"""
        [database]
        url = "mysql+pymysql://labsync@127.0.0.1:3306/bitrix"
        password_file = "{tmp_path}/no-such-password"
        [lis]
        base_url = "https://api.qlab.ru/v2"
        api_key_file = "{tmp_path}/no-such-key"
        [pdf]
        dir = "/var/lib/labsync/lab-results"
    """)

    problems = problems_of(path)

    assert sorted(p.split(":", 1)[0] for p in problems) == [
        "database.password_file", "lis.api_key_file"]
    assert any("no-such-key" in p for p in problems)


def test_api_key_and_api_key_file_together_is_a_problem(tmp_path):
    (tmp_path / "qlab_api_key").write_text(API_KEY, encoding="utf-8")
    path = write(tmp_path, MINIMAL.replace(
        'api_key = "qlab-key-minimal-1"',
        f'api_key = "qlab-key-minimal-1"\napi_key_file = "{tmp_path}/qlab_api_key"'))

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith("lis.api_key:")
    assert "lis.api_key_file" in problems[0]


def test_empty_api_key_file_is_a_problem(tmp_path):
    (tmp_path / "qlab_api_key").write_text("\n", encoding="utf-8")
    path = write(tmp_path, MINIMAL.replace(
        'api_key = "qlab-key-minimal-1"', f'api_key_file = "{tmp_path}/qlab_api_key"'))

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith("lis.api_key_file:")
    assert "empty" in problems[0]


def test_empty_inline_api_key_is_a_problem(tmp_path):
    path = write(tmp_path, MINIMAL.replace('"qlab-key-minimal-1"', '""'))

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith("lis.api_key:")


def test_secret_file_that_is_not_text_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "qlab_api_key").write_bytes(b"\xff\xfe\x00binary")
    path = write(tmp_path, MINIMAL.replace(
        'api_key = "qlab-key-minimal-1"', f'api_key_file = "{tmp_path}/qlab_api_key"'))

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith("lis.api_key_file:")


# -- every problem at once --------------------------------------------------------------------


def test_every_problem_is_reported_at_once_each_naming_its_key(tmp_path):
    path = write(tmp_path, """
        [database]
        url = "sqlite:////var/lib/labsync/site.db"
        [site]
        timezone = "Mars/Olympus_Mons"
        [lis]
        api_key = "qlab-key-minimal-1"
        max_concurrency = "eight"
        colour = "blue"
        [pdf]
        dir = "/var/lib/labsync/lab-results"
        [sync]
        interval = "fast"
    """)

    problems = problems_of(path)

    keys = sorted(p.split(":", 1)[0] for p in problems)
    assert keys == ["lis.base_url", "lis.colour", "lis.max_concurrency", "site.timezone",
                    "sync.interval"]
    assert all(re.match(r"^[a-z_]+(\.[a-z_]+)*: \S", p) for p in problems), problems
    by_key = {p.split(":", 1)[0]: p for p in problems}
    assert "Mars/Olympus_Mons" in by_key["site.timezone"]
    assert "required" in by_key["lis.base_url"]
    assert "unknown key" in by_key["lis.colour"]
    assert "integer" in by_key["lis.max_concurrency"]
    assert "'fast'" in by_key["sync.interval"]


def test_config_error_message_holds_every_problem(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_mod.from_mapping(minimal_with(site={"timezone": "Nowhere/At_All"},
                                             notify={"duplicate": "maybe"}), env={})

    assert "site.timezone" in str(info.value)
    assert "notify.duplicate" in str(info.value)


def test_unknown_section_is_a_problem():
    problems = mapping_problems(minimal_with(sycn={"interval": "5m"}))

    assert problems == ["sycn: unknown section"]


def test_section_that_is_not_a_table_is_reported_once():
    raw = minimal_with()
    raw["sync"] = "15m"  # type: ignore[assignment]

    problems = mapping_problems(raw)

    assert problems == ["sync: must be a table ([sync])"]


def test_missing_required_keys_are_each_reported():
    problems = mapping_problems({})

    assert sorted(p.split(":", 1)[0] for p in problems) == [
        "database.url", "lis.api_key", "lis.base_url", "pdf.dir"]


def test_relative_pdf_dir_and_bad_base_url_are_problems():
    problems = mapping_problems(minimal_with(pdf={"dir": "lab-results"},
                                             lis={"base_url": "api.qlab.ru/v2"}))

    assert sorted(p.split(":", 1)[0] for p in problems) == ["lis.base_url", "pdf.dir"]


def test_booleans_are_not_accepted_as_integers():
    problems = mapping_problems(minimal_with(lis={"max_concurrency": True}))

    assert problems == ["lis.max_concurrency: must be an integer"]


# -- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("15m", 900.0), ("1h", 3600.0), ("30d", 30 * 86400.0), (" 2h ", 7200.0)])
def test_duration_strings_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds
    config = config_mod.from_mapping(minimal_with(sync={"interval": text}), env={})
    assert config.sync.interval == seconds


@pytest.mark.parametrize("text", ["15", "0m", "fast", "1.5h", "-5m", "15 minutes", ""])
def test_bad_duration_is_a_problem_naming_the_key(text):
    with pytest.raises(ValueError):
        parse_duration(text)

    problems = mapping_problems(minimal_with(sync={"interval": text}))

    assert len(problems) == 1
    assert problems[0].startswith("sync.interval: ")


def test_duration_given_as_a_number_is_a_problem():
    problems = mapping_problems(minimal_with(sync={"interval": 900}))

    assert len(problems) == 1
    assert problems[0].startswith("sync.interval: ")


# -- adapters ---------------------------------------------------------------------------------


def test_unknown_adapter_is_a_problem_listing_the_known_ones():
    problems = mapping_problems(minimal_with(lis={"adapter": "helix"}))

    assert len(problems) == 1
    assert problems[0].startswith("lis.adapter: ")
    assert "'helix'" in problems[0]
    assert "qlab" in problems[0]


# -- secrets stay secret ----------------------------------------------------------------------


def test_repr_of_config_shows_no_secret(tmp_path):
    config = load(write(tmp_path, FULL), env={})

    text = f"{config!r} {config} {config.database!r} {config.lis!r} {config.database.url}"

    assert API_KEY not in text
    assert DB_PASSWORD not in text
    assert repr(config.lis.api_key) == "Secret('***')"
    assert str(config.lis.api_key) == "Secret('***')"


def test_config_errors_never_show_secrets():
    raw = minimal_with(
        database={"url": f"postgresql://labsync:{DB_PASSWORD}@127.0.0.1/bitrix"},
        lis={"api_key": API_KEY, "base_url": f"ftp://labsync:{DB_PASSWORD}@api.qlab.ru/v2",
             "max_concurrency": API_KEY},
        site={"timezone": "Nowhere/At_All"},
    )

    with pytest.raises(ConfigError) as info:
        config_mod.from_mapping(raw, env={})

    text = f"{info.value} {info.value!r} " + " ".join(info.value.problems)
    assert len(info.value.problems) == 4
    assert API_KEY not in text
    assert DB_PASSWORD not in text


def test_unparseable_database_url_error_does_not_echo_the_password():
    problems = mapping_problems(minimal_with(
        database={"url": f"mysql+pymysql://labsync:{DB_PASSWORD}@127.0.0.1:notaport/bitrix"}))

    assert len(problems) == 1
    assert problems[0].startswith("database.url: ")
    assert DB_PASSWORD not in problems[0]


def test_secrets_lists_the_api_key_and_the_database_password(tmp_path):
    config = load(write(tmp_path, FULL), env={})

    assert sorted(config.secrets()) == sorted([API_KEY, DB_PASSWORD])


def test_secrets_include_a_password_read_from_a_file(tmp_path):
    (tmp_path / "db_password").write_text(DB_PASSWORD, encoding="utf-8")
    config = config_mod.from_mapping(minimal_with(database={
        "url": "mysql+pymysql://labsync@127.0.0.1/bitrix",
        "password_file": str(tmp_path / "db_password")}), env={})

    assert DB_PASSWORD in config.secrets()
    assert "qlab-key-minimal-1" in config.secrets()


def test_secret_compares_by_value_and_is_falsy_when_empty():
    assert Secret("a-key") == Secret("a-key")
    assert Secret("a-key") != Secret("b-key")
    assert not Secret("")


def test_env_password_with_url_special_characters_stays_the_password():
    password = "p@ss/w:rd#1"
    config = config_mod.from_mapping(minimal_with(database={
        "url": "mysql+pymysql://labsync:${LABSYNC_DB_PASSWORD}@127.0.0.1:3306/bitrix"}),
        env={"LABSYNC_DB_PASSWORD": password})

    assert config.database.url.password == password
    assert config.database.url.host == "127.0.0.1"


# -- database.url -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "driver"), [
    ("sqlite:////var/lib/labsync/site.db", "sqlite"),
    ("mysql+pymysql://labsync:pw@127.0.0.1:3306/bitrix", "mysql+pymysql"),
    ("mysql://labsync:pw@127.0.0.1:3306/bitrix", "mysql+pymysql"),
    ("mariadb://labsync:pw@127.0.0.1:3306/bitrix", "mariadb+pymysql"),
])
def test_database_url_accepts_sqlite_and_mysql_with_the_pymysql_driver(url, driver):
    config = config_mod.from_mapping(minimal_with(database={"url": url}), env={})

    assert config.database.url.drivername == driver


@pytest.mark.parametrize("url", ["postgresql://labsync:pw@127.0.0.1/bitrix",
                                 "postgresql+psycopg://labsync@127.0.0.1/bitrix",
                                 "mssql+pyodbc://labsync@dsn"])
def test_database_url_refuses_other_databases(url):
    problems = mapping_problems(minimal_with(database={"url": url}))

    assert len(problems) == 1
    assert problems[0].startswith("database.url: ")
    assert "unsupported" in problems[0]


def test_database_url_not_a_url_is_a_problem():
    problems = mapping_problems(minimal_with(database={"url": "the site's database"}))

    assert len(problems) == 1
    assert problems[0].startswith("database.url: ")


# -- the file itself --------------------------------------------------------------------------


def test_invalid_toml_is_one_problem_naming_the_file(tmp_path):
    path = write(tmp_path, '[database]\nurl = "sqlite:///x.db\n[lis\n')

    with pytest.raises(ConfigError) as info:
        load(path, env={})

    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: ")
    assert "TOML" in info.value.problems[0]
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_config_file_is_a_problem(tmp_path):
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigError) as info:
        load(path, env={})

    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: ")


def test_config_path_prefers_the_option_then_the_environment(monkeypatch):
    monkeypatch.setenv("LABSYNC_CONFIG", "/srv/labsync.toml")
    assert config_mod.config_path("/etc/other.toml") == Path("/etc/other.toml")
    assert config_mod.config_path(None) == Path("/srv/labsync.toml")
    monkeypatch.delenv("LABSYNC_CONFIG")
    assert config_mod.config_path(None) == Path("/etc/labsync/labsync.toml")
