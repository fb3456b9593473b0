"""The ``[discovery]`` table: validated into a frozen ``DiscoveryConfig`` plus every problem.

Imports nothing from ``labsync.config`` (which imports this), so it carries its own small
duration parser with the same syntax as ``sync.interval``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from labsync.discovery.matching import MATCH_MODES

_KNOWN_KEYS = frozenset({"enabled", "default_region", "match", "lookback_days", "per_pass",
                         "eligible_days", "recheck", "interval"})
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MISSING_PACKAGE = "discovery: the phonenumbers package is not installed (pip install phonenumbers)"


@dataclass(frozen=True)
class DiscoveryConfig:
    """Off unless ``enabled``. Durations are seconds; see docs/discovery.md for the load."""

    enabled: bool = False
    default_region: str = "RU"  # for numbers written without a country code
    match: str = "auto"  # auto | birth_date | last_name | both
    lookback_days: int = 30  # ask the LIS for orders placed this many days back
    per_pass: int = 500  # at most this many LIS lookups per run
    eligible_days: int = 30  # logged in, or had an order, within this many days
    recheck: float = 6 * 3600.0  # never ask about one user more often than this
    interval: float = 15 * 60.0  # how often the daemon runs the job

    @property
    def max_lookups_per_hour(self) -> float:
        """The most LIS lookups discovery can make in an hour, whatever the number of users."""
        return self.per_pass * 3600.0 / self.interval


def discovery_config_from(raw: Any) -> tuple[DiscoveryConfig, list[str]]:
    """Validate a ``[discovery]`` table; with problems, the (disabled) default config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return DiscoveryConfig(), ["discovery: must be a table ([discovery])"]
    problems = [f"discovery.{name}: unknown key" for name in raw if name not in _KNOWN_KEYS]
    values: dict[str, Any] = {}

    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        problems.append("discovery.enabled: must be true or false")
    values["enabled"] = enabled is True

    region = raw.get("default_region", "RU")
    if not isinstance(region, str) or not region.strip():
        problems.append("discovery.default_region: must be a two-letter region code like \"RU\"")
    else:
        values["default_region"] = region.strip().upper()
        try:
            from labsync.discovery.phones import is_known_region
        except ImportError:
            problems.append(MISSING_PACKAGE)
        else:
            if not is_known_region(values["default_region"]):
                problems.append(f"discovery.default_region: unknown region code {region!r} "
                                "(ISO 3166 two letters, like \"RU\" or \"KZ\")")

    match = raw.get("match", "auto")
    if match not in MATCH_MODES:
        problems.append(f"discovery.match: must be one of {', '.join(MATCH_MODES)}")
    else:
        values["match"] = match

    for name, low, high in (("lookback_days", 1, 365), ("per_pass", 1, 100_000),
                            ("eligible_days", 1, 3650)):
        if name not in raw:
            continue
        value = raw[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append(f"discovery.{name}: must be an integer from {low} to {high}")
        else:
            values[name] = value

    for name in ("recheck", "interval"):
        if name not in raw:
            continue
        seconds = _duration(raw[name])
        if seconds is None:
            problems.append(f"discovery.{name}: {raw[name]!r} is not a duration like "
                            "'30m', '6h' or '1d'")
        else:
            values[name] = seconds

    if problems:
        return DiscoveryConfig(), problems
    return DiscoveryConfig(**values), []


def _duration(text: Any) -> float | None:
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        return None
    return float(int(match.group(1)) * _UNITS[match.group(2)])
