"""``[lis.fhir]``: the FHIR R4 adapter's own keys, and the settings it reads from them.

``FHIR_SCHEMA`` is registered in ``adapters.py``; ``LisConfig.options`` then holds the
validated values (durations in seconds, ``token`` a ``Secret``), and
``fhir_settings(options)`` turns them into the ``FhirSettings`` the adapter works with,
filling in the defaults for any key missing (a test may build the options by hand).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from labsync.config.adapters import AdapterSchema
from labsync.config.readers import NO_SECRET, Invalid, Secret, parse_duration
from labsync.config.schema import Key, Kind

DEFAULT_CODE_SYSTEMS = ("http://loinc.org",)


def _code_systems(value: Any) -> tuple[str, ...]:
    """Code system URIs, in preference order (``Kind.STRINGS`` checked the array)."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise Invalid('must be an array of strings, like ["http://loinc.org"]')
    systems = tuple(v.strip() for v in value)
    if any(not v for v in systems):
        raise Invalid("must not hold an empty string")
    return systems


FHIR_SCHEMA = AdapterSchema(
    "fhir",
    keys=(
        Key("token", Kind.SECRET, nonempty=True),  # or token_file
        Key("order_system", nonempty=True, strip=True),
        Key("feed", Kind.BOOL, default=True),
        Key("feed_interval", Kind.DURATION, default=30.0),
        Key("page_size", Kind.INT, default=50, low=1, high=1000),
        Key("overlap", Kind.DURATION, default=120.0, zero_ok=True),
        Key("verify_every", Kind.DURATION, default=86400.0, zero_ok=True),
        Key("code_systems", Kind.STRINGS, default=DEFAULT_CODE_SYSTEMS, check=_code_systems),
    ),
    # The token is optional (a FHIR server inside the hospital network may want none), and a
    # credential in [lis] (lis.auth) still works as for any HTTP adapter.
    needs_credentials=False,
    secret_headers=lambda values: ["Authorization"] if values.get("token") else [],
)


@dataclass(frozen=True)
class FhirSettings:
    """What the FHIR adapter needs of ``[lis.fhir]``, typed."""

    token: Secret = NO_SECRET
    order_system: str | None = None
    feed: bool = True
    feed_interval: timedelta = timedelta(seconds=30)
    page_size: int = 50
    overlap: timedelta = timedelta(minutes=2)
    verify_every: timedelta | None = timedelta(hours=24)  # None ("0s"): the polling rhythm
    code_systems: tuple[str, ...] = DEFAULT_CODE_SYSTEMS


def fhir_settings(options: Mapping[str, Any]) -> FhirSettings:
    """``LisConfig.options`` of a ``fhir`` adapter as ``FhirSettings``; absent keys keep the
    defaults. Durations are seconds (as the config gives them), a ``timedelta`` or a
    duration string; the token a ``Secret`` or a string."""
    unknown = sorted(set(options) - {key.name for key in FHIR_SCHEMA.keys})
    if unknown:
        raise ValueError(f"not keys of [lis.fhir]: {', '.join(unknown)}")
    token = options.get("token")
    verify = _delta(options.get("verify_every"), FhirSettings.verify_every)
    return FhirSettings(
        token=token if isinstance(token, Secret) else Secret(token or ""),
        order_system=options.get("order_system") or None,
        feed=bool(options.get("feed", True)),
        feed_interval=_delta(options.get("feed_interval"), FhirSettings.feed_interval)
        or FhirSettings.feed_interval,
        page_size=int(options.get("page_size") or FhirSettings.page_size),
        overlap=_delta(options.get("overlap"), FhirSettings.overlap) or timedelta(0),
        verify_every=verify or None,
        code_systems=_code_systems(list(options.get("code_systems") or DEFAULT_CODE_SYSTEMS)),
    )


def _delta(value: Any, default: timedelta | None) -> timedelta | None:
    if value is None:
        return default
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        return timedelta(seconds=0) if value.strip() in ("0", "0s") else timedelta(
            seconds=parse_duration(value))
    return timedelta(seconds=float(value))
