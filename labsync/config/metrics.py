"""The ``[metrics]`` section: where Prometheus metrics go (``labsync.metrics`` serves them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labsync.config.readers import Invalid
from labsync.config.schema import Context, Key, Kind, Section, read_section


def _textfile(path: Path) -> Path:
    if not path.name.endswith(".prom"):
        raise Invalid("must end in .prom (node_exporter's textfile collector reads only *.prom)")
    if not path.parent.is_dir():
        raise Invalid(f"directory {path.parent} does not exist")
    return path


METRICS = Section("metrics", (
    Key("port", Kind.INT, low=1, high=65535),
    Key("textfile", Kind.PATH, absolute=True, check=_textfile),
    Key("host", default="127.0.0.1", strip=True, nonempty=True,
        message="must be a non-empty string"),
))


@dataclass(frozen=True)
class MetricsConfig:
    """Where to expose metrics: ``port`` (HTTP on ``host``), ``textfile``, or both."""

    port: int | None = None
    textfile: Path | None = None
    host: str = "127.0.0.1"


def metrics_from(raw: Any, ctx: Context) -> MetricsConfig | None:
    """``[metrics]`` read into ``ctx``: the config, or None (disabled, or a problem)."""
    found = len(ctx.problems)
    values = read_section(METRICS, raw, ctx)
    if values.ok("host") and "port" not in values.given:
        ctx.problem("metrics.host", "has no effect without metrics.port")
    if len(ctx.problems) > found or (values["port"] is None and values["textfile"] is None):
        return None
    return MetricsConfig(**values)


def metrics_config_from(raw: Any, env: Mapping[str, str] | None = None
                        ) -> tuple[MetricsConfig | None, list[str]]:
    """Validate a ``[metrics]`` table: the config (``None``: disabled) and every problem."""
    ctx = Context(os.environ if env is None else env)
    config = metrics_from(raw, ctx)
    return config, ctx.problems
