"""``[lis.mapped]``: every expression compiled while the config is read, every problem named
by its key and reported at once; the examples load as written; the schema's tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from labsync import config as config_mod
from labsync.config import Secret
from labsync.config.readers import Invalid
from labsync.config.schema import Context, Key, Kind, Section, Values, read_section
from labsync.errors import ConfigError
from labsync.lis import registry
from labsync.lis.base import Capability, capabilities
from labsync.lis.mapped import MappedClient
from labsync.lis.mapped.spec import spec_from
from labsync.model import OrderStatus
from tests.mapped_support import EXAMPLES

TOKEN = "mapped-token-31c7aa"


def raw_config(mapped: dict[str, Any], *, base_url: str | None = "https://lims.example/v3"
               ) -> dict[str, Any]:
    lis: dict[str, Any] = {"adapter": "mapped", "mapped": mapped}
    if base_url:
        lis["base_url"] = base_url
    return {"database": {"url": "sqlite:////var/lib/labsync/site.db"},
            "pdf": {"dir": "/var/lib/labsync/lab-results"}, "lis": lis}


def rest(**keys: Any) -> dict[str, Any]:
    mapped: dict[str, Any] = {"order_url": "/referrals/{id}", "status": "state.code",
                              "results": {"each": "samples[].tests[]"}}
    mapped.update(keys)
    return {k: v for k, v in mapped.items() if v is not None}


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping(raw, env={})
    return caught.value.problems


def test_every_problem_is_reported_at_once_each_naming_its_key() -> None:
    mapped = rest(status="state.[", order_url="/referrals", pdf_url="https://x/{id}",
                  status_map={"done": "finished", "new": "received"},
                  results={"each": "samples[", "value": "to_numbr(v)", "colour": "red",
                           "abnormal_values": "H"},
                  wsdl="https://lims.example/?wsdl", auth_header="Authorization")

    assert problems_of(raw_config(mapped)) == [
        "lis.mapped.order_url: must hold {id}, where the order's id goes",
        "lis.mapped.pdf_url: must be a path relative to lis.base_url, starting with /",
        "lis.mapped.status: 'state.[' is not a JMESPath expression (Invalid jmespath "
        "expression at position 7)",
        "lis.mapped.status_map.done: 'finished' is not a labsync status (one of received, "
        "processing, completed, cancelled)",
        "lis.mapped.results.colour: unknown key",
        "lis.mapped.results.each: 'samples[' is not a JMESPath expression (Invalid jmespath "
        "expression at position 8)",
        "lis.mapped.results.value: 'to_numbr(v)' calls unknown JMESPath function to_numbr",
        "lis.mapped.results.abnormal_values: must be an array of strings",
        'lis.mapped.wsdl: used only with lis.mapped.transport = "soap" (it is "rest")',
        "lis.mapped.auth_value: required with lis.mapped.auth_header (or "
        "lis.mapped.auth_value_file)",
    ]


def test_soap_needs_its_wsdl_and_operation_and_refuses_rest_keys() -> None:
    mapped = {"transport": "soap", "status": "StateCode", "order_url": "/o/{id}",
              "results": {"each": "Results.Result[]"}}

    assert problems_of(raw_config(mapped, base_url=None)) == [
        'lis.mapped.order_url: used only with lis.mapped.transport = "rest" (it is "soap")',
        'lis.mapped.wsdl: required with lis.mapped.transport = "soap"',
        'lis.mapped.order_operation: required with lis.mapped.transport = "soap"',
    ]


def test_soap_may_send_its_credential_as_an_argument_instead_of_a_header() -> None:
    soap = {"transport": "soap", "wsdl": "https://lims.example/?wsdl", "status": "State",
            "order_operation": "GetOrder", "results": {"each": "Results.Result[]"},
            "auth_value": TOKEN}

    config = config_mod.from_mapping(raw_config(
        {**soap, "order_args": {"Id": "{id}", "Token": "{auth}"}}, base_url=None), env={})
    assert config.lis.options["order_args"] == {"Id": "{id}", "Token": "{auth}"}
    assert TOKEN in config.secrets() and TOKEN not in repr(config)
    assert problems_of(raw_config({**soap, "order_args": {"Id": "{id}"}}, base_url=None)) == [
        "lis.mapped.auth_header: required with lis.mapped.auth_value (the header the "
        "credential goes in, or use {auth} in lis.mapped.order_args)"]


@pytest.mark.parametrize(("keys", "problem"), [
    ({"pdf_url": "/r/{id}/pdf", "pdf_base64": "documents[0].content"},
     "lis.mapped.pdf_base64: give lis.mapped.pdf_url or lis.mapped.pdf_base64, not both"),
    ({"find_url": "/r?phone={phone}"},
     "lis.mapped.find_each: find_url and find_each go together (patient search)"),
    ({"find": {"id": "number"}}, "lis.mapped.find: used only with lis.mapped.find_url"),
    ({"find_url": "/r?phone={tel}", "find_each": "items[]"},
     "lis.mapped.find_url: unknown placeholder {tel} (allowed: {phone}, {phone_digits}, "
     "{date_from})"),
    ({"auth_value": TOKEN}, "lis.mapped.auth_header: required with lis.mapped.auth_value "
                            "(the header the credential goes in)"),
    ({"transport": "graphql"}, "lis.mapped.transport: must be one of rest, soap"),
    ({"results": None}, "lis.mapped.results: required"),
    ({"status_map": "done=completed"},
     "lis.mapped.status_map: must be a table ([lis.mapped.status_map] or { … })"),
    ({"auth_header": "Bad Header", "auth_value": TOKEN},
     "lis.mapped.auth_header: 'Bad Header' is not an HTTP header name"),
])
def test_keys_that_do_not_fit_together_are_named(keys: dict[str, Any], problem: str) -> None:
    assert problems_of(raw_config(rest(**keys))) == [problem]


def test_soap_arguments_are_scalars_or_tables_of_them_with_known_placeholders() -> None:
    soap = {"transport": "soap", "wsdl": "https://lims.example/?wsdl", "status": "State",
            "order_operation": "GetOrder", "results": {"each": "R[]"}}
    from datetime import date

    assert problems_of(raw_config({**soap, "order_args": {"Id": "{order}"}}, base_url=None)
                       ) == ["lis.mapped.order_args: Id: unknown placeholder {order} "
                             "(allowed: {id}, {auth})"]
    assert problems_of(raw_config({**soap, "order_args": {"Day": date(2024, 1, 1)}},
                                  base_url=None)) == [
        "lis.mapped.order_args: Day: must be a string, a number, true/false, or a table or "
        "array of them"]


def test_a_status_map_maps_text_exactly_and_without_one_labsyncs_names_are_used() -> None:
    given = config_mod.from_mapping(raw_config(rest(status_map={"3": "completed"})), env={})
    plain = config_mod.from_mapping(raw_config(rest()), env={})

    assert spec_from(given.lis.options).status_map == {"3": OrderStatus.COMPLETED}
    assert spec_from(plain.lis.options).status_map == {s.value: s for s in OrderStatus}


def test_options_built_by_hand_are_compiled_too_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        spec_from({"status": "a.[", "results": {"each": "x[", "value": 5},
                   "status_map": {"x": "done"}})

    assert caught.value.problems == [
        "lis.mapped.status: 'a.[' is not a JMESPath expression (Invalid jmespath expression "
        "at position 3)",
        "lis.mapped.results.each: 'x[' is not a JMESPath expression (Invalid jmespath "
        "expression at position 2)",
        "lis.mapped.results.value: must be a JMESPath expression (a string)",
        "lis.mapped.status_map.x: 'done' is not a labsync status"]


def test_capabilities_follow_the_configuration() -> None:
    assert registry.adapter_capabilities("mapped") == {
        Capability.ORDER_LOOKUP, Capability.PDF, Capability.PATIENT_SEARCH}
    assert registry.capability_problems("mapped", discovery_enabled=True) == []
    bare = MappedClient(config_mod.from_mapping(raw_config(rest()), env={}).lis)
    full = MappedClient(config_mod.from_mapping(raw_config(rest(
        pdf_url="/r/{id}/pdf", find_url="/r?phone={phone}&from={date_from}",
        find_each="items[]")), env={}).lis)

    assert capabilities(bare) == {Capability.ORDER_LOOKUP}
    assert capabilities(full) == registry.adapter_capabilities("mapped")


# -- the examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["medwork-rest", "nested-lims", "calab-soap"])
def test_each_example_loads_as_written_with_its_credentials_in_place(
        name: str, tmp_path: Path) -> None:
    text = (EXAMPLES / f"{name}.toml").read_text(encoding="utf-8")
    credentials = "/run/credentials/labsync.service/"
    for line in text.splitlines():
        if credentials in line:
            file_name = line.split(credentials)[1].split('"')[0]
            (tmp_path / file_name).write_text(f"secret-{file_name}\n")
    path = tmp_path / "labsync.toml"
    text = text.replace(credentials, f"{tmp_path}/")
    if name == "calab-soap":  # a WSDL file instead of the example's URL: nothing is fetched
        (tmp_path / "calab.wsdl").write_text("<definitions/>")
        text = text.replace("https://calab.example/calab/LabService.svc?wsdl",
                            str(tmp_path / "calab.wsdl"))
    path.write_text(text, encoding="utf-8")

    config = config_mod.load(path, env={})

    assert config.lis.adapter == "mapped"
    token = next(s for s in config.secrets() if s.startswith("secret-") and "db_" not in s)
    assert config.lis.options["auth_value"] == Secret(token)
    client = MappedClient(config.lis)
    assert client.spec.status_map and client.field_sources()["results.value"]
    client.close()


# -- the schema's tables, lists and cross-key checks ---------------------------------------------


def test_a_table_key_is_read_like_a_section_and_its_problems_name_the_full_key() -> None:
    def ordered(table: dict[str, Any]) -> dict[str, Any]:
        if table["low"] > table["high"]:
            raise Invalid("low must not be above high")
        return table

    def both(values: Values, ctx: Context) -> None:  # a section's check sees every key read
        if values.ok("names") and "free" not in values.given:
            ctx.problem("s.names", "used only with s.free")

    section = Section("s", (
        Key("t", Kind.TABLE, keys=(Key("low", Kind.INT), Key("high", Kind.INT)),
            check=ordered),
        Key("m", Kind.TABLE, each=Key("v", choices=("a", "b"))),
        Key("free", Kind.TABLE),
        Key("names", Kind.STRINGS, default=()),
    ), check=both)
    ctx = Context({"X": "b"})

    values = read_section(section, {"t": {"low": 1, "high": "2", "x": 0},
                                    "m": {"one": "a", "two": "c", "three": "${X}"},
                                    "names": ["${X}", "c"]}, ctx)

    assert ctx.problems == ["s.t.x: unknown key", "s.t.high: must be an integer",
                            "s.m.two: must be one of a, b", "s.names: used only with s.free"]
    assert values["names"] == ("b", "c") and values.failed == {"t", "m"}

    ctx = Context({})
    values = read_section(section, {"t": {"low": 3, "high": 2}, "free": {"any": [1]},
                                    "m": {"one": "a"}}, ctx)
    assert ctx.problems == ["s.t: low must not be above high"]
    assert values["free"] == {"any": [1]} and values["m"] == {"one": "a"}


def test_a_refused_credential_names_the_key_that_holds_it() -> None:
    own = MappedClient(config_mod.from_mapping(raw_config(rest(
        auth_header="X-Lims-Key", auth_value=TOKEN)), env={}).lis)
    shared = config_mod.from_mapping(raw_config(rest()), env={})
    shared_lis = config_mod.from_mapping({**raw_config(rest()), "lis": {
        **raw_config(rest())["lis"], "auth": "bearer", "token": TOKEN}}, env={}).lis

    assert own.credential == ("lis.mapped.auth_value", "credential")
    assert MappedClient(shared_lis).credential == ("lis.token", "token")
    assert MappedClient(shared.lis).credential == shared.lis.credential
