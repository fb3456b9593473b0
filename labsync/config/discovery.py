"""The ``[discovery]`` section: validated into a frozen ``DiscoveryConfig`` plus every problem."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from labsync.config.readers import Invalid
from labsync.config.schema import Context, Key, Kind, Section, read_section

# How a found order is tied to a user besides the phone (labsync.discovery.matching).
MATCH_MODES = ("auto", "birth_date", "last_name", "both")


def _region(text: str) -> str:
    region = text.upper()
    try:
        import phonenumbers  # a dependency of labsync; loaded only when the key is given
    except ImportError:
        raise Invalid("the phonenumbers package is not installed (pip install phonenumbers)"
                      ) from None
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise Invalid(f"unknown region code {text!r} (ISO 3166 two letters, like \"RU\" or "
                      "\"KZ\")")
    return region


DISCOVERY = Section("discovery", (
    Key("enabled", Kind.BOOL, default=False),
    Key("default_region", default="RU", strip=True, nonempty=True, check=_region,
        message="must be a two-letter region code like \"RU\""),
    Key("match", default="auto", choices=MATCH_MODES),
    Key("lookback_days", Kind.INT, default=30, low=1, high=365),
    Key("per_pass", Kind.INT, default=500, low=1, high=100_000),
    Key("eligible_days", Kind.INT, default=30, low=1, high=3650),
    Key("recheck", Kind.DURATION, default=6 * 3600.0),
    Key("interval", Kind.DURATION, default=15 * 60.0),
))


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


def discovery_from(raw: Any, ctx: Context) -> DiscoveryConfig:
    """``[discovery]`` read into ``ctx``; with a problem, the (disabled) default config."""
    found = len(ctx.problems)
    values = read_section(DISCOVERY, raw, ctx)
    return DiscoveryConfig() if len(ctx.problems) > found else DiscoveryConfig(**values)


def discovery_config_from(raw: Any, env: Mapping[str, str] | None = None
                          ) -> tuple[DiscoveryConfig, list[str]]:
    """Validate a ``[discovery]`` table; with problems, the (disabled) default config."""
    ctx = Context(os.environ if env is None else env)
    config = discovery_from(raw, ctx)
    return config, ctx.problems
