"""The sections every config has: ``[database]``, ``[site]``, ``[pdf]``, ``[notify]``,
``[sync]``, ``[log]``. Each is a schema (``Section``), a frozen dataclass, and a builder
for what its keys decide together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import URL, make_url

from labsync.config.readers import Invalid, Secret
from labsync.config.schema import Context, Key, Kind, Section, read_section

DEFAULT_TIMEZONE = "Europe/Moscow"


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise Invalid(f"unknown time zone {name!r}") from None


def _site_id(site_id: str) -> str:
    if not site_id or len(site_id) > 2:
        raise Invalid("must be a Bitrix site id of one or two characters, like 's1'")
    return site_id


def _result_url(template: str) -> str:
    try:
        template.format(order_id=1)
    except (KeyError, IndexError, ValueError):
        raise Invalid("may use only the placeholder {order_id}") from None
    return template


def _event_name(name: str) -> str:
    if not name or len(name) > 255:
        raise Invalid("must be a non-empty event type name")
    return name


DATABASE = Section("database", (
    Key("url", required=True, url=True),
    Key("password", Kind.SECRET, inline=False),  # password_file: the URL's password
    Key("pool_size", Kind.INT, default=5, above=0),
))
SITE = Section("site", (
    Key("timezone", default=DEFAULT_TIMEZONE, check=_zone),
    Key("document_root", Kind.PATH),
))
PDF = Section("pdf", (
    Key("dir", Kind.PATH, required=True, absolute=True),
    Key("max_bytes", Kind.INT, default=50 * 1024 * 1024, above=0),
    Key("required", Kind.BOOL, default=True),
    Key("wait", Kind.DURATION, default=0.0, zero_ok=True),
))
NOTIFY = Section("notify", (
    Key("backend", default="bitrix", choices=("bitrix", "smtp"),
        message="unknown backend {value!r} (known: bitrix, smtp)"),
    Key("site_id", default="s1", check=_site_id),
    Key("event_name", default="LAB_RESULTS_READY", check=_event_name),
    Key("updated_event_name", default="LAB_RESULTS_UPDATED", check=_event_name),
    Key("result_url", default="/personal/lab-results/{order_id}/", check=_result_url),
    Key("duplicate", default="N", choices=("Y", "N"), message="must be 'Y' or 'N'"),
))
SYNC = Section("sync", (
    Key("interval", Kind.DURATION, default=15 * 60.0),
    Key("page_size", Kind.INT, default=500, above=0),
    Key("stale_after", Kind.DURATION, default=30 * 86400.0),
    Key("recheck_days", Kind.INT, default=7, low=0),
    Key("lease", Kind.DURATION, default=15 * 60.0),
    Key("stop_timeout", Kind.DURATION, default=20.0),
))
LOG = Section("log", (
    Key("level", default="info", choices=("debug", "info", "warning", "error")),
    Key("format", default="auto", choices=("auto", "json", "console")),
))


@dataclass(frozen=True)
class DatabaseConfig:
    url: URL  # password inside; render with hide_password (the default of str(URL))
    pool_size: int = 5

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def password(self) -> Secret:
        """The password, from the URL or ``database.password_file`` (the schema's secret)."""
        return Secret(str(self.url.password or ""))


@dataclass(frozen=True)
class SiteConfig:
    timezone: ZoneInfo
    document_root: Path | None = None


@dataclass(frozen=True)
class PdfConfig:
    dir: Path
    max_bytes: int = 50 * 1024 * 1024
    required: bool = True  # never completed without a valid PDF
    wait: float = 0.0  # seconds; with required = false, how long a completed order waits


@dataclass(frozen=True)
class NotifyConfig:
    backend: str = "bitrix"
    site_id: str = "s1"
    event_name: str = "LAB_RESULTS_READY"
    updated_event_name: str = "LAB_RESULTS_UPDATED"
    result_url: str = "/personal/lab-results/{order_id}/"
    duplicate: str = "N"


@dataclass(frozen=True)
class SyncConfig:
    interval: float = 15 * 60.0  # seconds
    page_size: int = 500
    stale_after: float = 30 * 86400.0
    recheck_days: int = 7
    lease: float = 15 * 60.0  # how long a claim on an order lasts (seconds)
    stop_timeout: float = 20.0  # seconds a stopping daemon waits for the order in hand


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: JSON when stdout is not a terminal, console lines when it is


def database_from(raw: Any, ctx: Context) -> DatabaseConfig | None:
    values = read_section(DATABASE, raw, ctx)
    if not values.ok("url"):
        return None
    try:
        url = make_url(values["url"])
    except Exception:  # noqa: BLE001 - SQLAlchemy raises several types for a bad URL
        ctx.problem("database.url", "not a valid SQLAlchemy URL")  # never the URL: a password
        return None
    backend = url.get_backend_name()
    if backend not in ("mysql", "mariadb", "sqlite"):
        ctx.problem("database.url",
                    f"unsupported database {backend!r} (use mysql+pymysql:// or sqlite:///)")
    password: Secret | None = values["password"]
    if password:
        if url.password:
            ctx.problem("database.password_file", "the URL already has a password")
        url = url.set(password=password.reveal())
    if backend in ("mysql", "mariadb") and url.drivername in ("mysql", "mariadb"):
        url = url.set(drivername=f"{backend}+pymysql")
    return DatabaseConfig(url=url, pool_size=values["pool_size"])


def site_from(raw: Any, ctx: Context) -> SiteConfig | None:
    values = read_section(SITE, raw, ctx)
    if "timezone" in values.failed:
        return None
    zone = values["timezone"]
    return SiteConfig(timezone=zone if isinstance(zone, ZoneInfo) else _zone(zone),
                      document_root=values["document_root"])


def pdf_from(raw: Any, ctx: Context) -> PdfConfig | None:
    values = read_section(PDF, raw, ctx)
    if values["required"] and values["wait"]:
        ctx.problem("pdf.wait", "only applies with pdf.required = false (a completed order "
                                "waits this long for its PDF, then is published without it)")
    if not values.ok("dir"):
        return None
    return PdfConfig(**values)


def notify_from(raw: Any, ctx: Context) -> NotifyConfig:
    return NotifyConfig(**read_section(NOTIFY, raw, ctx))


def sync_from(raw: Any, ctx: Context) -> SyncConfig:
    return SyncConfig(**read_section(SYNC, raw, ctx))


def log_from(raw: Any, ctx: Context) -> LogConfig:
    return LogConfig(**read_section(LOG, raw, ctx))
