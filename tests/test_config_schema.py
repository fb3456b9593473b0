"""The config package's own parts: the shared readers, the schemas, adapter sections, auth."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from labsync import config as config_mod
from labsync.config import adapters
from labsync.config.adapters import AdapterSchema, adapter_names
from labsync.config.lis import LisConfig
from labsync.config.loader import SECTIONS
from labsync.config.readers import (
    Invalid,
    Secret,
    as_bool,
    as_number,
    as_path,
    describe_range,
    expand_env,
    in_range,
    read_secret_file,
)
from labsync.config.schema import Context, Key, Kind, Section, read_section
from labsync.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEY = "qlab-key-5e1f0c77"
TOKEN = "bearer-token-3a9d61"
PASSWORD = "basic-pass-7b2c40"
VALUE = "Token hdr-value-0c4e19"


def minimal(**lis: Any) -> dict[str, Any]:
    return {
        "database": {"url": "sqlite:////var/lib/labsync/site.db"},
        "lis": {"base_url": "https://api.qlab.ru/v2", **lis},
        "pdf": {"dir": "/var/lib/labsync/lab-results"},
    }


def problems_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.from_mapping(raw, env=env or {})
    return info.value.problems


@pytest.fixture
def extra_adapter(monkeypatch: pytest.MonkeyPatch):
    """Register adapters for one test only; the registry is as it was afterwards."""
    def register(schema: AdapterSchema) -> AdapterSchema:
        monkeypatch.setitem(adapters._SCHEMAS, schema.name, schema)
        return schema
    return register


# -- the shared readers -------------------------------------------------------------------


def test_expand_env_replaces_every_reference_and_names_every_unset_one():
    assert expand_env("${A}-${B}-${A}", {"A": "1", "B": "2"}) == "1-2-1"
    assert expand_env("no references", {}) == "no references"
    with pytest.raises(Invalid) as info:
        expand_env("${ZED}/${ALPHA}/${A}", {"A": "x"})
    assert str(info.value) == "environment variable ALPHA, ZED is not set"


def test_expand_env_in_a_url_percent_encodes_only_the_userinfo():
    url = expand_env("mysql://u:${PW}@${HOST}/db", {"PW": "a@b/c:d", "HOST": "db.local"},
                     url=True)
    assert url == "mysql://u:a%40b%2Fc%3Ad@db.local/db"


def test_read_secret_file_strips_and_reports_unreadable_and_binary_files(tmp_path):
    (tmp_path / "ok").write_text("  s3cret-value \n", encoding="utf-8")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    assert read_secret_file(str(tmp_path / "ok")) == "s3cret-value"
    with pytest.raises(Invalid, match=r"^cannot read .*missing \(No such file"):
        read_secret_file(str(tmp_path / "missing"))
    with pytest.raises(Invalid, match="is not UTF-8 text"):
        read_secret_file(str(tmp_path / "bin"))


def test_numbers_refuse_booleans_and_floats_take_integers():
    assert as_number(5, integer=True) == 5
    assert as_number(5, integer=False) == 5.0 and isinstance(as_number(5, integer=False), float)
    for value, integer in ((True, True), (False, False), (2.5, True), ("5", False)):
        with pytest.raises(Invalid):
            as_number(value, integer=integer)


@pytest.mark.parametrize(("bounds", "inside", "outside", "words"), [
    ({"low": 1, "high": 65535}, [1, 65535], [0, 65536], "from 1 to 65535"),
    ({"above": 0}, [0.001, 7], [0, -1], "more than zero"),
    ({"low": 0}, [0, 3], [-0.5], "zero or more"),
    ({"low": 2.5}, [2.5], [2], "at least 2.5"),
])
def test_ranges_and_their_words(bounds, inside, outside, words):
    assert all(in_range(v, **bounds) for v in inside)
    assert not any(in_range(v, **bounds) for v in outside)
    assert describe_range(bounds.get("low"), bounds.get("high"), bounds.get("above")) == words


def test_booleans_are_toml_booleans_only():
    assert as_bool(True) is True and as_bool(False) is False
    for value in ("yes", 1, "true", None):
        with pytest.raises(Invalid, match="must be true or false"):
            as_bool(value)


def test_paths_absolute_and_existing(tmp_path):
    (tmp_path / "f").write_text("x")
    assert as_path(str(tmp_path / "f"), absolute=True, exists="file") == tmp_path / "f"
    assert as_path(str(tmp_path), exists="dir") == tmp_path
    with pytest.raises(Invalid, match="must be an absolute path"):
        as_path("relative/f", absolute=True)
    with pytest.raises(Invalid, match="is not a file"):
        as_path(str(tmp_path), exists="file")
    with pytest.raises(Invalid, match="is not a directory"):
        as_path(str(tmp_path / "f"), exists="dir")


# -- one schema, read the same way for every section ---------------------------------------

DEMO = Section("demo", (
    Key("name", required=True),
    Key("count", Kind.INT, default=3, low=1, high=10),
    Key("ratio", Kind.FLOAT, default=0.5, above=0),
    Key("wait", Kind.DURATION, default=60.0),
    Key("on", Kind.BOOL, default=False),
    Key("mode", default="a", choices=("a", "b"), message="must be 'a' or 'b', not {value!r}"),
    Key("where", Kind.PATH, absolute=True),
    Key("secret", Kind.SECRET, nonempty=True),
))


def test_a_section_reports_unknown_keys_first_then_each_key_in_declared_order():
    ctx = Context({})
    values = read_section(DEMO, {"wait": "soon", "zzz": 1, "count": 11, "on": "yes",
                                 "mode": "c", "ratio": 0, "where": "rel", "secret": 5,
                                 "aaa": 2}, ctx)
    assert ctx.problems == [
        "demo.zzz: unknown key",
        "demo.aaa: unknown key",
        "demo.name: required",
        "demo.count: must be an integer from 1 to 10",
        "demo.ratio: must be more than zero",
        "demo.wait: 'soon' is not a duration like '30s', '15m', '1h' or '30d'",
        "demo.on: must be true or false",
        "demo.mode: must be 'a' or 'b', not 'c'",
        "demo.where: must be an absolute path",
        "demo.secret: must be a string",
    ]
    # Refused values fall back to their defaults; the builder can tell them apart.
    assert (values["count"], values["ratio"], values["wait"]) == (3, 0.5, 60.0)
    assert values.failed == {"count", "ratio", "wait", "on", "mode", "where", "secret"}
    assert not values.ok("count")


def test_a_section_converts_what_it_accepts():
    ctx = Context({"WHO": "labsync"})
    values = read_section(DEMO, {"name": "${WHO}", "count": 10, "ratio": 2, "wait": "2h",
                                 "on": True, "mode": "b", "where": "/srv/x",
                                 "secret": "${WHO}-key"}, ctx)
    assert ctx.problems == []
    assert values == {"name": "labsync", "count": 10, "ratio": 2.0, "wait": 7200.0,
                      "on": True, "mode": "b", "where": Path("/srv/x"),
                      "secret": Secret("labsync-key")}
    assert values.ok("secret") and DEMO.secret_keys == (DEMO.key("secret"),)


def test_a_secret_key_accepts_its_file_form_and_refuses_both_forms(tmp_path):
    (tmp_path / "s").write_text("from-file-9c1d\n")
    ctx = Context({})
    values = read_section(DEMO, {"name": "n", "secret_file": str(tmp_path / "s")}, ctx)
    assert ctx.problems == [] and values["secret"] == Secret("from-file-9c1d")

    read_section(DEMO, {"name": "n", "secret": "x", "secret_file": str(tmp_path / "s")}, ctx)
    assert ctx.problems == ["demo.secret: give demo.secret or demo.secret_file, not both"]


def test_a_file_only_secret_takes_no_inline_value():
    section = Section("s", (Key("password", Kind.SECRET, inline=False, required=True),))
    ctx = Context({})
    read_section(section, {"password": "inline-value"}, ctx)
    assert ctx.problems == ["s.password: unknown key", "s.password_file: required"]


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_an_unknown_key_is_a_problem_in_every_section(name):
    raw = minimal()
    raw.setdefault(name, {})["colour"] = "blue"

    assert f"{name}.colour: unknown key" in problems_of(raw)


# -- [lis.<adapter>] -------------------------------------------------------------------------


def test_an_empty_lis_qlab_section_is_allowed(tmp_path):
    path = tmp_path / "labsync.toml"
    path.write_text(textwrap.dedent(f"""
        [database]
        url = "sqlite:////var/lib/labsync/site.db"
        [lis]
        adapter = "qlab"
        base_url = "https://api.qlab.ru/v2"
        api_key = "{KEY}"
        [lis.qlab]
        [pdf]
        dir = "/var/lib/labsync/lab-results"
    """), encoding="utf-8")

    config = config_mod.load(path, env={})

    assert dict(config.lis.options) == {}
    assert config.lis.api_key.reveal() == KEY


def test_an_unknown_key_in_lis_qlab_is_a_problem_naming_it():
    raw = minimal(api_key=KEY, qlab={"colour": "blue", "page": 2})

    assert problems_of(raw) == ["lis.qlab.colour: unknown key", "lis.qlab.page: unknown key"]


def test_lis_qlab_must_be_a_table():
    assert problems_of(minimal(api_key=KEY, qlab="yes")) == ["lis.qlab: must be a table "
                                                              "([lis.qlab])"]


def test_a_section_for_no_known_adapter_is_a_problem():
    [problem] = problems_of(minimal(api_key=KEY, helix={"x": 1}))
    assert problem.startswith("lis.helix: unknown key")
    assert "qlab" in problem


def test_an_adapters_own_keys_are_validated_and_handed_to_it(extra_adapter):
    extra_adapter(AdapterSchema("memo", keys=(
        Key("page_size", Kind.INT, default=100, low=1, high=1000),
        Key("feed", required=True),
        Key("feed_secret", Kind.SECRET),
    )))

    config = config_mod.from_mapping(minimal(adapter="memo", api_key=KEY,
                                             memo={"feed": "all", "feed_secret": "fs-81d2"}),
                                     env={})
    assert dict(config.lis.options) == {"page_size": 100, "feed": "all",
                                        "feed_secret": Secret("fs-81d2")}
    with pytest.raises(TypeError):
        config.lis.options["feed"] = "mine"
    # Its secrets are declared in its schema, so the redaction knows them too.
    assert "fs-81d2" in config.secrets()

    problems = problems_of(minimal(adapter="memo", api_key=KEY,
                                   memo={"page_size": 0, "colour": 1}))
    assert problems == ["lis.memo.colour: unknown key",
                        "lis.memo.page_size: must be an integer from 1 to 1000",
                        "lis.memo.feed: required"]


def test_another_adapters_section_has_no_effect_and_says_so(extra_adapter):
    extra_adapter(AdapterSchema("memo"))

    assert problems_of(minimal(api_key=KEY, memo={})) == [
        "lis.memo: [lis.memo] has no effect: lis.adapter is 'qlab'"]


def test_an_adapter_without_http_needs_no_base_url_or_key(extra_adapter):
    extra_adapter(AdapterSchema("inbox", needs_base_url=False, needs_credentials=False))
    raw = minimal(adapter="inbox")
    del raw["lis"]["base_url"]

    config = config_mod.from_mapping(raw, env={})

    assert config.lis.adapter == "inbox" and config.lis.auth_headers() == {}
    # qlab, the default adapter, needs both.
    del raw["lis"]["adapter"]
    assert sorted(p.split(":")[0] for p in problems_of(raw)) == ["lis.api_key", "lis.base_url"]


def test_an_unknown_adapter_lists_the_registered_ones(extra_adapter):
    extra_adapter(AdapterSchema("memo"))

    [problem] = problems_of(minimal(adapter="helix", api_key=KEY))

    assert problem == ("lis.adapter: unknown adapter 'helix' "
                       f"(known: {', '.join(adapter_names())})")
    assert "memo" in adapter_names() and "qlab" in adapter_names()


def test_the_config_knows_the_adapters_the_lis_registry_builds():
    from labsync.lis import registry

    assert adapter_names() == registry.adapter_names()


# -- lis.auth -------------------------------------------------------------------------------


def lis_of(**lis: Any) -> LisConfig:
    return config_mod.from_mapping(minimal(**lis), env={}).lis


def test_without_lis_auth_the_api_key_goes_in_x_api_key_as_before():
    lis = lis_of(api_key=KEY)
    assert (lis.auth, lis.auth_headers()) == ("api-key", {"X-Api-Key": KEY})
    assert lis.credential == ("lis.api_key", "API key")


def test_each_auth_mode_computes_its_headers(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "value").write_text(VALUE + "\n")
    pair = base64.b64encode(f"lab:{PASSWORD}".encode()).decode()

    assert lis_of(api_key=KEY, auth_header="X-Lab-Key").auth_headers() == {"X-Lab-Key": KEY}
    assert lis_of(auth="bearer", token=TOKEN).auth_headers() == {
        "Authorization": f"Bearer {TOKEN}"}
    assert lis_of(auth="bearer", token_file=str(tmp_path / "token")).auth_headers() == {
        "Authorization": f"Bearer {TOKEN}"}
    assert lis_of(auth="basic", username="lab", password=PASSWORD).auth_headers() == {
        "Authorization": f"Basic {pair}"}
    assert lis_of(auth="header", auth_header="X-Token",
                  auth_value_file=str(tmp_path / "value")).auth_headers() == {"X-Token": VALUE}


@pytest.mark.parametrize(("lis", "problems"), [
    ({"auth": "bearer"}, ['lis.token: required with lis.auth = "bearer" (or lis.token_file)']),
    ({"auth": "bearer", "token": TOKEN, "api_key": KEY},
     ['lis.api_key: used only with lis.auth = "api-key" (lis.auth is "bearer")']),
    ({"auth": "basic"}, ['lis.username: required with lis.auth = "basic"',
                         'lis.password: required with lis.auth = "basic" (or '
                         'lis.password_file)']),
    ({"auth": "basic", "username": "a:b", "password": PASSWORD},
     ["lis.username: must not contain ':' (HTTP Basic puts it between the user name and the "
      "password)"]),
    ({"auth": "header", "auth_value": VALUE},
     ['lis.auth_header: required with lis.auth = "header"']),
    ({"auth": "header", "auth_header": "X Token", "auth_value": VALUE},
     ["lis.auth_header: 'X Token' is not an HTTP header name"]),
    ({"api_key": KEY, "auth_header": "Accept"},
     ["lis.auth_header: Accept is a header labsync sets itself"]),
    ({"auth": "bearer", "token": TOKEN, "auth_header": "X-Token"},
     ['lis.auth_header: used only with lis.auth = "api-key" or "header" (lis.auth is '
      '"bearer")']),
    ({"auth": "oauth", "api_key": KEY},
     ["lis.auth: must be one of api-key, bearer, basic, header"]),
    ({"auth": "bearer", "token": ""}, ["lis.token: is empty"]),
])
def test_auth_combinations_that_cannot_work_are_problems_naming_the_key(lis, problems):
    assert problems_of(minimal(**lis)) == problems


def test_a_credential_of_another_mode_is_named_as_written(tmp_path):
    (tmp_path / "token").write_text(TOKEN)

    assert problems_of(minimal(api_key=KEY, token_file=str(tmp_path / "token"))) == [
        'lis.token_file: used only with lis.auth = "bearer" (lis.auth is "api-key")']


def test_every_auth_problem_is_reported_at_once():
    problems = problems_of(minimal(auth="basic", api_key=KEY, token=TOKEN, max_rps=-1))

    assert sorted(p.split(":")[0] for p in problems) == [
        "lis.api_key", "lis.max_rps", "lis.password", "lis.token", "lis.username"]


def test_auth_secrets_and_headers_reach_the_redaction():
    basic = config_mod.from_mapping(minimal(auth="basic", username="lab", password=PASSWORD),
                                    env={})
    pair = base64.b64encode(f"lab:{PASSWORD}".encode()).decode()
    assert PASSWORD in basic.secrets() and pair in basic.secrets()
    assert basic.secret_headers() == ["Authorization"]
    assert basic.lis.credential == ("lis.password", "user name and password")

    header = config_mod.from_mapping(minimal(auth="header", auth_header="X-Token",
                                             auth_value=VALUE), env={})
    assert VALUE in header.secrets() and header.secret_headers() == ["X-Token"]
    assert VALUE not in repr(header) and TOKEN not in repr(lis_of(auth="bearer", token=TOKEN))


# -- importing the config loads nothing above it ---------------------------------------------

_ABOVE = ("jinja2", "labsync.mail", "labsync.store", "labsync.lis", "labsync.notify",
          "labsync.discovery", "labsync.sync", "labsync.app")
_LOADED_ABOVE = ("import sys\n{imports}\n"
                 "print(sorted(m for m in sys.modules if m.startswith({above!r})))")


def _loaded_above(imports: str) -> str:
    code = _LOADED_ABOVE.format(imports=imports, above=_ABOVE)
    return subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()


def test_importing_the_config_loads_no_templates_tables_mail_or_adapters():
    assert _loaded_above("import labsync.config") == "[]"
    # Nor does loading a config without [smtp].
    assert _loaded_above(
        "from labsync.config import from_mapping\n"
        f"from_mapping({minimal(api_key=KEY)!r}, env={{}})") == "[]"
    # The check sees such an import when there is one.
    assert "'labsync.mail'" in _loaded_above("import labsync.config, labsync.mail")


def test_an_adapters_own_secret_headers_and_bare_tokens_are_redacted():
    mapped = config_mod.from_mapping({
        "database": {"url": "sqlite:////nonexistent/x.db"}, "pdf": {"dir": "/nonexistent/p"},
        "lis": {"adapter": "mapped", "base_url": "https://lims.example/api",
                "mapped": {"auth_header": "X-Lims-Token", "auth_value": "Token s3cr3t-abc",
                           "order_url": "/r/{id}", "status": "state",
                           "status_map": {"done": "completed"},
                           "results": {"each": "tests[]", "value": "value"}}}}, env={})
    fhir = config_mod.from_mapping({
        "database": {"url": "sqlite:////nonexistent/x.db"}, "pdf": {"dir": "/nonexistent/p"},
        "lis": {"adapter": "fhir", "base_url": "https://lis.example/fhir",
                "fhir": {"token": "fhir-t0ken"}}}, env={})

    assert "X-Lims-Token" in mapped.secret_headers()
    assert {"Token s3cr3t-abc", "s3cr3t-abc"} <= set(mapped.secrets())
    assert "Authorization" in fhir.secret_headers() and "fhir-t0ken" in fhir.secrets()
