"""``[lis.mapped]``: an LIS connected by configuration, its answers mapped by JMESPath.

The keys say how to ask (REST URLs relative to ``lis.base_url``, or SOAP operations of a
WSDL), where the credential goes, and, as JMESPath expressions, where the order's status,
results, PDF and patient search answers are in what the LIS sends (``docs/mapped.md``).

Everything is checked while the config is read, every problem naming its key and reported
with all the others: an expression that does not compile, a status mapped to something
labsync does not know, keys of one transport given for the other. What needs ``[lis]``
too (``lis.base_url`` for REST) is checked when the adapter is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from labsync.config.adapters import AdapterSchema
from labsync.config.readers import Invalid
from labsync.config.schema import Context, Key, Kind, Section, Values
from labsync.model import OrderStatus

TRANSPORTS = ("rest", "soap")
STATUSES = tuple(status.value for status in OrderStatus)
#: ``[lis.mapped.results]``: the fields of one result, and the expression each defaults to.
RESULT_FIELDS = ("code", "name", "value", "unit", "ref_min", "ref_max", "abnormal",
                 "result_date")
#: ``[lis.mapped.find]``: the fields of one order found by phone (``find_each`` items).
FIND_FIELDS = ("id", "status", "order_date", "phone", "last_name", "first_name", "birth_date")
#: The placeholders each URL template may use.
URL_PLACEHOLDERS = {"order_url": ("id",), "pdf_url": ("id",), "probe_url": (),
                    "find_url": ("phone", "phone_digits", "date_from")}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110)
_REST_ONLY = ("order_url", "pdf_url", "probe_url")
_SOAP_ONLY = ("wsdl", "order_operation", "order_args", "pdf_operation", "pdf_args",
              "not_found_fault", "auth_fault")


def check_expression(text: str) -> str:
    """``text`` if it is a JMESPath expression that compiles and calls only known functions;
    ``Invalid`` saying what is wrong otherwise (one line: the expression, where, what)."""
    import jmespath  # here, not at the top: importing the config stays light
    from jmespath import exceptions, functions

    try:
        parsed = jmespath.compile(text)
    except exceptions.EmptyExpressionError:
        raise Invalid("must not be empty (a JMESPath expression; @ is the whole answer)"
                      ) from None
    except exceptions.JMESPathError as exc:
        position = getattr(exc, "lex_position", None)
        where = f" at position {position}" if isinstance(position, int) else ""
        what = getattr(exc, "message", None) or getattr(exc, "msg", None) or "invalid"
        raise Invalid(f"{text!r} is not a JMESPath expression ({what}{where})") from None
    known = functions.Functions.FUNCTION_TABLE
    unknown = sorted({name for name in _function_names(parsed.parsed) if name not in known})
    if unknown:
        raise Invalid(f"{text!r} calls unknown JMESPath function {', '.join(unknown)}")
    return text


def _function_names(node: Any) -> list[str]:
    if not isinstance(node, dict):
        return []
    names = [node["value"]] if node.get("type") == "function_expression" else []
    for child in node.get("children", ()):
        names += _function_names(child)
    return names


def _header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise Invalid(f"{name!r} is not an HTTP header name")
    return name


def _url_template(placeholders: tuple[str, ...], *, needs_id: bool = False) -> Any:
    def check(text: str) -> str:
        if "://" in text or not text.startswith("/"):
            raise Invalid("must be a path relative to lis.base_url, starting with /")
        used = _PLACEHOLDER.findall(text)
        wrong = sorted({name for name in used if name not in placeholders})
        if wrong:
            allowed = ", ".join("{" + p + "}" for p in placeholders) or "none"
            raise Invalid(f"unknown placeholder {', '.join('{' + w + '}' for w in wrong)} "
                          f"(allowed: {allowed})")
        if needs_id and "id" not in used:
            raise Invalid("must hold {id}, where the order's id goes")
        return text
    return check


def _wsdl(text: str) -> str:
    if text.startswith(("http://", "https://")):
        return text
    from pathlib import Path

    if not Path(text).is_file():
        raise Invalid(f"{text} is neither an http(s) URL nor a file")
    return text


def _soap_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """SOAP arguments: strings (``{id}``, ``{auth}`` filled in per call), numbers, booleans,
    and tables or arrays of them."""
    def valid(value: Any) -> bool:
        if isinstance(value, str | int | float | bool):
            return True
        if isinstance(value, list):
            return all(valid(v) for v in value)
        if isinstance(value, Mapping):
            return all(isinstance(k, str) and valid(v) for k, v in value.items())
        return False
    bad = sorted(name for name, value in args.items() if not valid(value))
    if bad:
        raise Invalid(f"{', '.join(bad)}: must be a string, a number, true/false, or a table "
                      "or array of them")
    for name, value in args.items():
        for found in _PLACEHOLDER.findall(_flat_text(value)):
            if found not in ("id", "auth"):
                raise Invalid(f"{name}: unknown placeholder {{{found}}} (allowed: {{id}}, "
                              "{auth})")
    return dict(args)


def _flat_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_flat_text(v) for v in value)
    if isinstance(value, Mapping):
        return " ".join(_flat_text(v) for v in value.values())
    return ""


def _expression_key(name: str, default: str | None = None, **more: Any) -> Key:
    return Key(name, default=default, nonempty=True, strip=True, check=check_expression,
               **more)


RESULTS = Key("results", Kind.TABLE, required=True, keys=(
    _expression_key("each", required=True),
    *(_expression_key(name, name) for name in RESULT_FIELDS),
    Key("abnormal_values", Kind.STRINGS, default=()),
))
FIND = Key("find", Kind.TABLE, keys=tuple(_expression_key(name, name) for name in FIND_FIELDS))
STATUS_MAP = Key("status_map", Kind.TABLE, each=Key(
    "status", choices=STATUSES, message=f"{{value!r}} is not a labsync status (one of "
                                        f"{', '.join(STATUSES)})"))


def _cross_checks(values: Values, ctx: Context) -> None:
    """What involves several keys of ``[lis.mapped]``."""
    if "transport" in values.failed:
        return
    transport = values["transport"]
    other = "soap" if transport == "rest" else "rest"
    for name in _SOAP_ONLY if transport == "rest" else _REST_ONLY:
        if name in values.given:
            ctx.problem(f"lis.mapped.{name}", f'used only with lis.mapped.transport = '
                                              f'"{other}" (it is "{transport}")')
    needed = ("order_url",) if transport == "rest" else ("wsdl", "order_operation")
    for name in needed:
        if name not in values.given:
            ctx.problem(f"lis.mapped.{name}", f'required with lis.mapped.transport = '
                                              f'"{transport}"')
    if values.ok("pdf_url") and values.ok("pdf_base64"):
        ctx.problem("lis.mapped.pdf_base64", "give lis.mapped.pdf_url or lis.mapped.pdf_base64"
                                             ", not both")
    if "pdf_args" in values.given and "pdf_operation" not in values.given:
        ctx.problem("lis.mapped.pdf_args", "used only with lis.mapped.pdf_operation")
    if ("find_url" in values.given) != ("find_each" in values.given):
        missing = "find_each" if "find_url" in values.given else "find_url"
        ctx.problem(f"lis.mapped.{missing}", "find_url and find_each go together (patient "
                                             "search)")
    if "find" in values.given and "find_url" not in values.given:
        ctx.problem("lis.mapped.find", "used only with lis.mapped.find_url")
    _check_auth(values, ctx, transport)


def _check_auth(values: Values, ctx: Context, transport: str) -> None:
    has_value = "auth_value" in values.given
    if "auth_header" in values.given and not has_value:
        ctx.problem("lis.mapped.auth_value", "required with lis.mapped.auth_header (or "
                                             "lis.mapped.auth_value_file)")
    if has_value and "auth_header" not in values.given:
        in_args = any("{auth}" in _flat_text(values.get(name) or {})
                      for name in ("order_args", "pdf_args"))
        if transport == "rest" or not in_args:
            where = "" if transport == "rest" else ", or use {auth} in lis.mapped.order_args"
            ctx.problem("lis.mapped.auth_header", f"required with lis.mapped.auth_value (the "
                                                  f"header the credential goes in{where})")


class _MappedSchema(AdapterSchema):
    """The schema, with the checks that involve several keys run as the section is read."""

    @property
    def section(self) -> Section:
        return Section(f"lis.{self.name}", self.keys, check=_cross_checks)


MAPPED_SCHEMA = _MappedSchema(
    "mapped",
    secret_headers=lambda values: [values["auth_header"]] if values.get("auth_header") else [],
    keys=(
        Key("transport", default="rest", choices=TRANSPORTS),
        Key("auth_header", nonempty=True, strip=True, check=_header_name),
        Key("auth_value", Kind.SECRET, nonempty=True),  # or auth_value_file
        Key("order_url", nonempty=True, strip=True,
            check=_url_template(URL_PLACEHOLDERS["order_url"], needs_id=True)),
        Key("pdf_url", nonempty=True, strip=True,
            check=_url_template(URL_PLACEHOLDERS["pdf_url"], needs_id=True)),
        Key("probe_url", nonempty=True, strip=True,
            check=_url_template(URL_PLACEHOLDERS["probe_url"])),
        Key("wsdl", nonempty=True, strip=True, check=_wsdl),
        Key("order_operation", nonempty=True, strip=True),
        Key("order_args", Kind.TABLE, check=_soap_args),
        Key("pdf_operation", nonempty=True, strip=True),
        Key("pdf_args", Kind.TABLE, check=_soap_args),
        Key("not_found_fault", nonempty=True, strip=True),
        Key("auth_fault", nonempty=True, strip=True),
        _expression_key("status", required=True),
        _expression_key("order_id"),
        _expression_key("changed_at"),
        _expression_key("version"),
        _expression_key("pdf_base64"),
        Key("find_url", nonempty=True, strip=True,
            check=_url_template(URL_PLACEHOLDERS["find_url"])),
        _expression_key("find_each"),
        FIND,
        STATUS_MAP,
        RESULTS,
    ),
    # SOAP needs no lis.base_url (the WSDL names the endpoint); REST's is checked when the
    # adapter is built. The credential is this section's own (auth_header, auth_value), and
    # one in [lis] (lis.auth) still works as for any HTTP adapter.
    needs_base_url=False,
    needs_credentials=False,
)
