"""The adapters the config knows, each with the schema of its own ``[lis.<name>]`` section.

The config layer may not import ``labsync.lis`` (it sits below it), so the adapters' names
and section schemas are declared here, one ``AdapterSchema`` each, and ``lis.adapter`` is
checked against them. ``labsync.lis.registry`` maps the same names to classes; a test
keeps the two lists equal. An adapter with keys of its own declares them as
``Key``s, and the section it is handed (``LisConfig.options``) holds their values:

    register_adapter(AdapterSchema("fhir", keys=(
        Key("page_size", Kind.INT, default=100, low=1, high=1000),
    )))

``needs_base_url`` / ``needs_credentials`` say which shared ``[lis]`` keys the adapter
requires: an HTTP adapter both, an HL7 feed that pushes into a folder neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from labsync.config.schema import Key, Section


@dataclass(frozen=True)
class AdapterSchema:
    """What the config needs to know of one adapter, by its ``lis.adapter`` name."""

    name: str
    keys: tuple[Key, ...] = ()
    needs_base_url: bool = True
    needs_credentials: bool = True
    # The validated [lis.<name>] values → what the adapter is handed (default: read-only dict)
    build: Callable[[Mapping[str, Any]], Any] | None = None
    # The HTTP headers the adapter puts its own secrets in, from its values (a Bearer token's
    # Authorization, a mapping's auth_header), so the log redaction masks them by name too
    secret_headers: Callable[[Mapping[str, Any]], list[str]] | None = None

    @property
    def section(self) -> Section:
        return Section(f"lis.{self.name}", self.keys)

    def options(self, values: Mapping[str, Any]) -> Any:
        return self.build(values) if self.build else MappingProxyType(dict(values))


_SCHEMAS: dict[str, AdapterSchema] = {}


def register_adapter(schema: AdapterSchema) -> AdapterSchema:
    """Add an adapter's schema (its name must be new); returns it."""
    if schema.name in _SCHEMAS:
        raise ValueError(f"adapter {schema.name!r} is registered already")
    _SCHEMAS[schema.name] = schema
    return schema


def adapter_schema(name: str) -> AdapterSchema | None:
    return _SCHEMAS.get(name)


def adapter_names() -> list[str]:
    """The names ``lis.adapter`` accepts, sorted."""
    return sorted(_SCHEMAS)


# QLAB: REST over HTTPS, needs lis.base_url and a credential; no keys of its own yet.
register_adapter(AdapterSchema("qlab"))

# FHIR R4 (issue 13): its [lis.fhir] keys are declared in fhir.py.
from labsync.config.fhir import FHIR_SCHEMA  # noqa: E402 - needs AdapterSchema above

register_adapter(FHIR_SCHEMA)

# HL7 v2 (issue 14): a drop folder and an MLLP listener; its [lis.hl7] keys are in hl7.py.
from labsync.config.hl7 import HL7  # noqa: E402 - needs AdapterSchema above

register_adapter(HL7)

# Any REST or SOAP LIS by configuration (issue 15): its [lis.mapped] keys are in mapped.py.
from labsync.config.mapped import MAPPED_SCHEMA  # noqa: E402 - needs AdapterSchema above

register_adapter(MAPPED_SCHEMA)
