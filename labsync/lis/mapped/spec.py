"""The ``[lis.mapped]`` section, compiled: every JMESPath expression once, at start.

``spec_from(options)`` turns ``LisConfig.options`` (validated by ``labsync.config.mapped``)
into a frozen ``Spec``: the expressions compiled and named by their key, the status map,
the requests to make. An expression that does not compile is a ``ConfigError`` naming its
key, reported with every other problem at once (the config reader reports the same when it
reads the file; this also covers options built by hand).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jmespath
from jmespath.parser import ParsedResult

from labsync.config import Secret
from labsync.config.mapped import FIND_FIELDS, RESULT_FIELDS, check_expression
from labsync.config.readers import NO_SECRET, Invalid
from labsync.errors import BadLisData, ConfigError
from labsync.lis.classify import excerpt
from labsync.model import OrderStatus

_SECTION = "lis.mapped"
# jmespath's own errors at search time (a function given the wrong type, say)
_SEARCH_ERRORS = (jmespath.exceptions.JMESPathError, TypeError, ValueError)
# AST nodes whose first child is where the expression starts reading the answer
_LEADING = frozenset({"projection", "flatten", "subexpression", "filter_projection", "pipe",
                      "index_expression", "value_projection"})


@dataclass(frozen=True)
class Expression:
    """One JMESPath expression of the config: its key (``lis.mapped.results.value``), its text
    as written, and its compiled form."""

    key: str
    text: str
    compiled: ParsedResult = field(repr=False, compare=False)

    def search(self, data: Any, where: str) -> Any:
        """What the expression finds in ``data``; ``BadLisData`` naming ``where`` and the key
        when it cannot be applied to it."""
        try:
            return self.compiled.search(data)
        except _SEARCH_ERRORS as exc:
            raise BadLisData(f"{where}: {self.key} ({self.text}) cannot be applied: "
                             f"{excerpt(str(exc))}") from None

    @property
    def name(self) -> str:
        """The key without its section: ``results.value``."""
        return self.key.removeprefix(f"{_SECTION}.")

    @property
    def root_field(self) -> str | None:
        """The answer's field the expression starts from (``Results`` of
        ``Results.Result[]``), or None when it starts otherwise (``@``, a function)."""
        node: Any = self.compiled.parsed
        while isinstance(node, dict) and node.get("type") in _LEADING and node["children"]:
            node = node["children"][0]
        if isinstance(node, dict) and node.get("type") == "field":
            return str(node["value"])
        return None


@dataclass(frozen=True)
class Spec:
    """How to ask the LIS and where the answer's parts are, for ``MappedClient``."""

    transport: str  # rest | soap
    status: Expression
    status_map: Mapping[str, OrderStatus]
    each: Expression
    fields: Mapping[str, Expression]  # RESULT_FIELDS → expression, relative to one result
    abnormal_values: frozenset[str] = frozenset()
    order_id: Expression | None = None
    changed_at: Expression | None = None
    version: Expression | None = None
    pdf_base64: Expression | None = None
    find_each: Expression | None = None
    find_fields: Mapping[str, Expression] = field(default_factory=dict)
    # REST
    order_url: str | None = None
    pdf_url: str | None = None
    probe_url: str | None = None
    find_url: str | None = None
    # SOAP
    wsdl: str | None = None
    order_operation: str | None = None
    order_args: Mapping[str, Any] = field(default_factory=dict)
    pdf_operation: str | None = None
    pdf_args: Mapping[str, Any] = field(default_factory=dict)
    not_found_fault: str | None = None
    auth_fault: str | None = None
    # the credential: the whole header value (``Token abc``), and the header it goes in
    auth_header: str | None = None
    auth_value: Secret = NO_SECRET

    @property
    def has_pdf_source(self) -> bool:
        """Whether PDFs are fetched by the order's id (a URL, or an operation of their own)."""
        return bool(self.pdf_url if self.transport == "rest" else self.pdf_operation)

    @property
    def inline_pdf(self) -> bool:
        """Whether the order's own answer carries the PDF (``pdf_base64`` without a source)."""
        return self.pdf_base64 is not None and not self.has_pdf_source

    def sources(self) -> dict[str, str]:
        """Each mapped field and the expression that gives it, for the dry run."""
        found = {e.name: e.text for e in (self.status, self.order_id, self.changed_at,
                                          self.version, self.pdf_base64, self.each)
                 if e is not None}
        found.update({e.name: e.text for e in self.fields.values()})
        return found


class _Compiler:
    """Compiles expressions, collecting every problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def expression(self, key: str, text: Any, *, default: str | None = None
                   ) -> Expression | None:
        text = default if text is None else text
        if text is None:
            return None
        try:
            check_expression(text) if isinstance(text, str) else _not_text()
        except Invalid as exc:
            self.problems.append(f"{key}: {exc}")
            return None
        return Expression(key, text, jmespath.compile(text))


def _not_text() -> None:
    raise Invalid("must be a JMESPath expression (a string)")


def spec_from(options: Mapping[str, Any]) -> Spec:
    """The compiled ``Spec`` of a ``[lis.mapped]`` section's values; ``ConfigError`` listing
    every problem (each naming its key) when any expression does not compile."""
    compiler = _Compiler()
    results: Mapping[str, Any] = options.get("results") or {}
    find: Mapping[str, Any] = options.get("find") or {}
    top = {name: compiler.expression(f"{_SECTION}.{name}", options.get(name))
           for name in ("status", "order_id", "changed_at", "version", "pdf_base64",
                        "find_each")}
    each = compiler.expression(f"{_SECTION}.results.each", results.get("each"))
    fields = {name: compiler.expression(f"{_SECTION}.results.{name}", results.get(name),
                                        default=name) for name in RESULT_FIELDS}
    find_fields = {name: compiler.expression(f"{_SECTION}.find.{name}", find.get(name),
                                             default=name) for name in FIND_FIELDS}
    if options.get("status") is None:
        compiler.problems.append(f"{_SECTION}.status: required")
    if results.get("each") is None:
        compiler.problems.append(f"{_SECTION}.results.each: required")
    status_map = _status_map(options.get("status_map"), compiler.problems)
    if compiler.problems:
        raise ConfigError(compiler.problems)
    assert top["status"] is not None and each is not None
    return Spec(
        transport=options.get("transport") or "rest",
        status=top["status"], status_map=status_map, each=each,
        fields={k: v for k, v in fields.items() if v is not None},
        abnormal_values=frozenset(str(v) for v in results.get("abnormal_values") or ()),
        order_id=top["order_id"], changed_at=top["changed_at"], version=top["version"],
        pdf_base64=top["pdf_base64"], find_each=top["find_each"],
        find_fields={k: v for k, v in find_fields.items() if v is not None},
        order_url=options.get("order_url"), pdf_url=options.get("pdf_url"),
        probe_url=options.get("probe_url"), find_url=options.get("find_url"),
        wsdl=options.get("wsdl"), order_operation=options.get("order_operation"),
        order_args=dict(options.get("order_args") or {}),
        pdf_operation=options.get("pdf_operation"),
        pdf_args=dict(options.get("pdf_args") or {}),
        not_found_fault=options.get("not_found_fault"), auth_fault=options.get("auth_fault"),
        auth_header=options.get("auth_header"),
        auth_value=options.get("auth_value") or NO_SECRET,
    )


def _status_map(given: Mapping[str, Any] | None, problems: list[str]) -> dict[str, OrderStatus]:
    """The LIS's status texts → labsync's; without a map, labsync's own names."""
    if given is None:
        return {status.value: status for status in OrderStatus}
    mapped: dict[str, OrderStatus] = {}
    for text, status in given.items():
        try:
            mapped[str(text)] = OrderStatus(status)
        except ValueError:
            problems.append(f"{_SECTION}.status_map.{text}: {status!r} is not a labsync status")
    return mapped
