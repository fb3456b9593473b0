"""Adapter name → class. The core asks here; it never names a vendor itself."""

from __future__ import annotations

import inspect
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labsync.config import LisConfig
    from labsync.lis.base import Capability, LisClient

# name → "module:Class", imported on demand so an adapter's dependencies load only when used
_ADAPTERS: dict[str, str] = {
    "qlab": "labsync.lis.qlab:QlabClient",
    "fhir": "labsync.lis.fhir:FhirClient",
    "hl7": "labsync.lis.hl7:Hl7Inbox",
    "mapped": "labsync.lis.mapped:MappedClient",
}


def adapter_names() -> list[str]:
    return sorted(_ADAPTERS)


def make_client(config: LisConfig, **options: Any) -> LisClient:
    """The configured adapter. ``config.adapter`` was validated against ``adapter_names()``.

    ``options`` go to the adapter's constructor, each only if the constructor takes it:
    every adapter takes ``sleep`` (the function its retry waits use, so a stopping daemon
    can cut them short); the wiring also offers what lives outside ``[lis]`` and some
    adapter may need (``zone``: the site's time zone; ``pdf_max_bytes``: ``pdf.max_bytes``).
    """
    cls = adapter_class(config.adapter)
    accepted = inspect.signature(cls.__init__).parameters
    taken = {name: value for name, value in options.items() if name in accepted}
    return cls(config, **taken)  # type: ignore[call-arg]


def adapter_class(name: str) -> type[LisClient]:
    """The class of adapter ``name``, imported now; ``ConfigError`` naming ``lis.adapter``
    for a name the registry does not know."""
    from labsync.errors import ConfigError

    if name not in _ADAPTERS:
        raise ConfigError([_unknown(name)])
    module_name, class_name = _ADAPTERS[name].split(":")
    cls: type[LisClient] = getattr(import_module(module_name), class_name)
    return cls


def adapter_capabilities(name: str) -> frozenset[Capability]:
    """What adapter ``name`` can do, read from its class (no adapter is built, nothing is
    reached). ``ConfigError`` for an unknown name."""
    from labsync.lis.base import capabilities

    return capabilities(adapter_class(name))


def capability_problems(adapter_name: str, discovery_enabled: bool) -> list[str]:
    """Why the configured adapter cannot do what the configuration asks of it, one line per
    problem naming the key, e.g. ``discovery.enabled: the "hl7" adapter cannot search orders
    by patient (no patient search)``; empty when it can. Nothing is built or reached."""
    from labsync.lis.base import Capability

    if adapter_name not in _ADAPTERS:
        return [_unknown(adapter_name)]
    have = adapter_capabilities(adapter_name)
    # (the key that asks for it, what it asks, the capabilities of which one will do)
    wanted: list[tuple[str, str, frozenset[Capability]]] = [
        ("lis.adapter", "bring results (no order lookup, change feed or inbox)",
         frozenset({Capability.ORDER_LOOKUP, Capability.CHANGE_FEED, Capability.INBOX})),
    ]
    if discovery_enabled:
        search = Capability.PATIENT_SEARCH
        wanted.append(("discovery.enabled", f"{search.ability} (no {search.label})",
                       frozenset({search})))
    return [f'{key}: the "{adapter_name}" adapter cannot {what}'
            for key, what, any_of in wanted if have.isdisjoint(any_of)]


def _unknown(name: str) -> str:
    return f"lis.adapter: unknown adapter {name!r} (known: {', '.join(adapter_names())})"
