"""Load the TOML configuration once, expand it, validate all of it, and freeze it.

Every problem is collected and reported together, one line each, naming its key
(``lis.base_url: must start with http:// or https://``). Secrets are wrapped in ``Secret``
so that printing a config, or an exception that carries one, never shows them.

The package, bottom to top:

- ``readers``: what every section shares: ``${NAME}``, durations, secret files, numbers;
- ``schema``: ``Key`` and ``Section``, a section's keys declared once, and ``read_section``;
- ``adapters``: the LIS adapters' names and the schemas of their ``[lis.<name>]`` sections;
- ``sections`` (database, site, pdf, notify, sync, log), ``lis``, ``smtp``, ``discovery``,
  ``metrics``: one schema, one frozen dataclass and one builder per section;
- ``loader``: ``Config``, ``load`` and ``from_mapping``.

Importing it loads neither the mail package (jinja2), nor the database tables, nor the LIS
adapters: those sit above it.
"""

from labsync.config.adapters import AdapterSchema, adapter_names, register_adapter
from labsync.config.discovery import DiscoveryConfig
from labsync.config.lis import AUTH_MODES, LisConfig
from labsync.config.loader import DEFAULT_PATH, Config, config_path, from_mapping, load
from labsync.config.metrics import MetricsConfig
from labsync.config.readers import Secret, parse_duration
from labsync.config.schema import Key, Kind, Section
from labsync.config.sections import (
    DatabaseConfig,
    LogConfig,
    NotifyConfig,
    PdfConfig,
    SiteConfig,
    SyncConfig,
)
from labsync.config.smtp import SmtpConfig

__all__ = [
    "AUTH_MODES", "DEFAULT_PATH", "AdapterSchema", "Config", "DatabaseConfig",
    "DiscoveryConfig", "Key", "Kind", "LisConfig", "LogConfig", "MetricsConfig",
    "NotifyConfig", "PdfConfig", "Secret", "Section", "SiteConfig", "SmtpConfig",
    "SyncConfig", "adapter_names", "config_path", "from_mapping", "load", "parse_duration",
    "register_adapter",
]
