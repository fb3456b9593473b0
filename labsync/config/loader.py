"""The whole config: read the file once, validate every section, freeze the result."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labsync.config.discovery import DISCOVERY, DiscoveryConfig, discovery_from
from labsync.config.lis import LIS, LisConfig, lis_config_from, secret_strings
from labsync.config.metrics import METRICS, MetricsConfig, metrics_from
from labsync.config.schema import Context, Section
from labsync.config.sections import (
    DATABASE,
    LOG,
    NOTIFY,
    PDF,
    SITE,
    SYNC,
    DatabaseConfig,
    LogConfig,
    NotifyConfig,
    PdfConfig,
    SiteConfig,
    SyncConfig,
    database_from,
    log_from,
    notify_from,
    pdf_from,
    site_from,
    sync_from,
)
from labsync.config.smtp import SMTP, SmtpConfig, smtp_from
from labsync.errors import ConfigError

DEFAULT_PATH = "/etc/labsync/labsync.toml"

# Every top-level table the file may have, in the order they are validated: its schema and
# its reader. ``Config`` has one attribute of the same name each.
SECTIONS: dict[str, tuple[Section, Callable[..., Any]]] = {
    "database": (DATABASE, database_from),
    "site": (SITE, site_from),
    "lis": (LIS, lis_config_from),
    "pdf": (PDF, pdf_from),
    "notify": (NOTIFY, notify_from),
    "sync": (SYNC, sync_from),
    "log": (LOG, log_from),
    "metrics": (METRICS, metrics_from),
    "discovery": (DISCOVERY, discovery_from),
    "smtp": (SMTP, smtp_from),
}


@dataclass(frozen=True)
class Config:
    """The whole, validated, frozen configuration. Pass it in; there is no global one."""

    database: DatabaseConfig
    site: SiteConfig
    lis: LisConfig
    pdf: PdfConfig
    notify: NotifyConfig
    sync: SyncConfig
    log: LogConfig
    metrics: MetricsConfig | None = None
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    smtp: SmtpConfig | None = None  # with notify.backend = "smtp"
    source: str = "<memory>"

    def secrets(self) -> list[str]:
        """Every secret string in this config, for the log redaction processor.

        Found through the schemas: each section's keys declared secret, and what the LIS
        credential puts into its headers.
        """
        found: list[str] = []
        for name, (section, _read) in SECTIONS.items():
            part = getattr(self, name)
            if part is None:
                continue
            values = getattr(part, "secret_values", None)
            found += values() if values else secret_strings(section, part)
        return list(dict.fromkeys(found))

    def secret_headers(self) -> list[str]:
        """The names of the HTTP headers whose values are secret (``X-Api-Key``, say)."""
        return self.lis.secret_header_names()


def config_path(explicit: str | None) -> Path:
    """The config file to read: ``--config``, then ``$LABSYNC_CONFIG``, then the default."""
    return Path(explicit or os.environ.get("LABSYNC_CONFIG") or DEFAULT_PATH)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the TOML file at ``path``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return from_mapping(raw, env=env, source=str(path))


def from_mapping(
    raw: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "<memory>"
) -> Config:
    """Validate an already-parsed TOML document (used by ``load``, the demo and tests)."""
    ctx = Context(os.environ if env is None else env)
    for name in raw:
        if name not in SECTIONS:
            ctx.problem(name, "unknown section")
    built: dict[str, Any] = {}
    for name, (_section, read) in SECTIONS.items():
        if name == "smtp":
            notify = built.get("notify")
            built[name] = read(raw.get(name), ctx,
                               required=notify is not None and notify.backend == "smtp")
        else:
            built[name] = read(raw.get(name), ctx)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return Config(source=source, **built)
