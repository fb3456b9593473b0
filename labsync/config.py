"""Load the TOML configuration once, expand it, validate all of it, and freeze it.

Every problem is collected and reported together, one line each, naming its key
(``lis.base_url: must start with http:// or https://``). Secrets are wrapped in ``Secret``
so that printing a config, or an exception that carries one, never shows them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import URL, make_url

from labsync.discovery.config import DiscoveryConfig, discovery_config_from
from labsync.errors import ConfigError
from labsync.mail.smtp_config import SmtpConfig, smtp_config_from
from labsync.metrics import MetricsConfig, metrics_config_from

DEFAULT_PATH = "/etc/labsync/labsync.toml"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Secret:
    """A secret value: its ``repr`` and ``str`` never show it; ``reveal()`` does."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class DatabaseConfig:
    url: URL  # password inside; render with hide_password (the default of str(URL))
    pool_size: int = 5

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"


@dataclass(frozen=True)
class SiteConfig:
    timezone: ZoneInfo
    document_root: Path | None = None


@dataclass(frozen=True)
class LisConfig:
    adapter: str
    base_url: str
    api_key: Secret
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_concurrency: int = 8
    max_rps: float = 0.0  # 0: no cap
    retry_attempts: int = 4  # tries per request, the first included
    retry_max_seconds: float = 60.0  # total time budget for one request's retries
    ca_file: Path | None = None  # extra CA bundle for a self-signed LIS; TLS is always verified
    download_timeout: float = 300.0  # a whole PDF download, however slowly the bytes come


@dataclass(frozen=True)
class PdfConfig:
    dir: Path
    max_bytes: int = 50 * 1024 * 1024


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
        """Every secret string in this config, for the log redaction processor."""
        found = [self.lis.api_key.reveal()]
        if self.database.url.password:
            found.append(str(self.database.url.password))
        if self.smtp is not None and self.smtp.password:
            found.append(self.smtp.password.reveal())
        return [s for s in found if s]


def parse_duration(text: str) -> float:
    """``"15m"`` → 900.0. Units: s, m, h, d. Raises ``ValueError`` on anything else."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration like '30s', '15m', '1h' or '30d'")
    return float(int(match.group(1)) * _UNITS[match.group(2)])


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
    reader = _Reader(raw, os.environ if env is None else env)
    config = reader.build(source)
    if reader.problems:
        raise ConfigError(reader.problems)
    assert config is not None
    return config


class _Reader:
    """Reads keys one by one, collecting every problem instead of stopping at the first."""

    _KNOWN: ClassVar[dict[str, set[str]]] = {
        "database": {"url", "password_file", "pool_size"},
        "site": {"timezone", "document_root"},
        "lis": {
            "adapter", "base_url", "api_key", "api_key_file", "connect_timeout",
            "read_timeout", "max_concurrency", "max_rps", "retry_attempts",
            "retry_max_seconds", "ca_file", "download_timeout",
        },
        "pdf": {"dir", "max_bytes"},
        "notify": {
            "backend", "site_id", "event_name", "updated_event_name", "result_url",
            "duplicate",
        },
        "sync": {"interval", "page_size", "stale_after", "recheck_days", "lease",
                 "stop_timeout"},
        "log": {"level", "format"},
    }

    def __init__(self, raw: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.raw = raw
        self.env = env
        self.problems: list[str] = []

    # -- primitives ---------------------------------------------------------------------

    def _section(self, name: str) -> Mapping[str, Any]:
        value = self.raw.get(name, {})
        if not isinstance(value, Mapping):
            problem = f"{name}: must be a table ([{name}])"
            if problem not in self.problems:  # every key of the section asks; say it once
                self.problems.append(problem)
            return {}
        return value

    def _expand(self, key: str, value: str) -> str | None:
        missing = [m for m in _ENV_REF.findall(value) if m not in self.env]
        if missing:
            names = ", ".join(sorted(set(missing)))
            self.problems.append(f"{key}: environment variable {names} is not set")
            return None
        if key == "database.url":
            return _expand_url(value, self.env)
        return _ENV_REF.sub(lambda m: self.env[m.group(1)], value)

    def get(self, section: str, name: str, kind: type, default: Any = None,
            required: bool = False) -> Any:
        key = f"{section}.{name}"
        table = self._section(section)
        if name not in table:
            if required:
                self.problems.append(f"{key}: required")
            return default
        value = table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.append(f"{key}: must be {_KIND_NAMES.get(kind, kind.__name__)}")
            return default
        if isinstance(value, str):
            return self._expand(key, value)
        return value

    def check(self, key: str, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(f"{key}: {message}")

    def secret(self, section: str, name: str, required: bool) -> Secret:
        """``name`` or ``name_file`` (e.g. a systemd credential), never both."""
        key, file_key = f"{section}.{name}", f"{section}.{name}_file"
        inline = self.get(section, name, str)
        file_name = self.get(section, f"{name}_file", str)
        if inline is not None and file_name is not None:
            self.problems.append(f"{key}: give {key} or {file_key}, not both")
            return Secret("")
        if file_name is not None:
            try:
                value = Path(file_name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.problems.append(f"{file_key}: cannot read {file_name} ({exc.strerror})")
                return Secret("")
            except UnicodeDecodeError:
                self.problems.append(f"{file_key}: {file_name} is not UTF-8 text")
                return Secret("")
            if required and not value:
                self.problems.append(f"{file_key}: {file_name} is empty")
            return Secret(value)
        if inline is None:
            # Present but not expanded (an unset ${VAR}) was reported already by get().
            table = self._section(section)
            if required and name not in table and f"{name}_file" not in table:
                self.problems.append(f"{key}: required (or {file_key})")
            return Secret("")
        if required and not inline:
            self.problems.append(f"{key}: is empty")
        return Secret(inline)

    def duration(self, section: str, name: str, default: float) -> float:
        text = self.get(section, name, str)
        if text is None:
            return default
        try:
            return parse_duration(text)
        except ValueError as exc:
            self.problems.append(f"{section}.{name}: {exc}")
            return default

    def positive(self, section: str, name: str, kind: type, default: Any,
                 allow_zero: bool = False) -> Any:
        value = self.get(section, name, kind, default)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            self.problems.append(
                f"{section}.{name}: must be {'zero or more' if allow_zero else 'more than zero'}"
            )
            return default
        return value

    # -- sections -----------------------------------------------------------------------

    def build(self, source: str) -> Config | None:
        for section, value in self.raw.items():
            if section in ("metrics", "discovery", "smtp"):
                continue  # their own readers check their keys
            if section not in self._KNOWN:
                self.problems.append(f"{section}: unknown section")
            elif isinstance(value, Mapping):
                for name in value:
                    if name not in self._KNOWN[section]:
                        self.problems.append(f"{section}.{name}: unknown key")
        parts: dict[str, Callable[[], Any]] = {
            "database": self._database, "site": self._site, "lis": self._lis,
            "pdf": self._pdf, "notify": self._notify, "sync": self._sync, "log": self._log,
        }
        built = {name: make() for name, make in parts.items()}
        built["metrics"], problems = metrics_config_from(self.raw.get("metrics", {}))
        self.problems.extend(problems)
        built["discovery"], problems = discovery_config_from(self.raw.get("discovery", {}))
        self.problems.extend(problems)
        notify = built.get("notify")
        built["smtp"], problems = smtp_config_from(
            self.raw.get("smtp", {}), self.env,
            required=notify is not None and notify.backend == "smtp")
        self.problems.extend(problems)
        if self.problems:
            return None
        return Config(source=source, **built)

    def _database(self) -> DatabaseConfig | None:
        text = self.get("database", "url", str, required=True)
        password = self.secret("database", "password", required=False)
        pool_size = self.positive("database", "pool_size", int, 5)
        if text is None:
            return None
        try:
            url = make_url(text)
        except Exception:  # noqa: BLE001 - SQLAlchemy raises several types for a bad URL
            self.problems.append("database.url: not a valid SQLAlchemy URL")
            return None
        backend = url.get_backend_name()
        self.check("database.url", backend in ("mysql", "mariadb", "sqlite"),
                   f"unsupported database {backend!r} (use mysql+pymysql:// or sqlite:///)")
        if password:
            if url.password:
                self.problems.append("database.password_file: the URL already has a password")
            url = url.set(password=password.reveal())
        if backend in ("mysql", "mariadb") and url.drivername in ("mysql", "mariadb"):
            url = url.set(drivername=f"{backend}+pymysql")
        return DatabaseConfig(url=url, pool_size=pool_size)

    def _site(self) -> SiteConfig | None:
        name = self.get("site", "timezone", str, "Europe/Moscow")
        root = self.get("site", "document_root", str)
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            self.problems.append(f"site.timezone: unknown time zone {name!r}")
            return None
        return SiteConfig(timezone=zone, document_root=Path(root) if root else None)

    def _lis(self) -> LisConfig | None:
        adapter = self.get("lis", "adapter", str, "qlab")
        base_url = self.get("lis", "base_url", str, required=True)
        api_key = self.secret("lis", "api_key", required=True)
        if base_url is not None:
            self.check("lis.base_url", base_url.startswith(("http://", "https://")),
                       "must start with http:// or https://")
        ca_file = self.get("lis", "ca_file", str)
        if ca_file is not None:
            self.check("lis.ca_file", Path(ca_file).is_file(), f"{ca_file} is not a file")
        from labsync.lis.registry import adapter_names

        self.check("lis.adapter", adapter in adapter_names(),
                   f"unknown adapter {adapter!r} (known: {', '.join(adapter_names())})")
        return LisConfig(
            adapter=adapter,
            base_url=(base_url or "").rstrip("/"),
            api_key=api_key,
            connect_timeout=self.positive("lis", "connect_timeout", float, 5.0),
            read_timeout=self.positive("lis", "read_timeout", float, 30.0),
            max_concurrency=self.positive("lis", "max_concurrency", int, 8),
            max_rps=self.positive("lis", "max_rps", float, 0.0, allow_zero=True),
            retry_attempts=self.positive("lis", "retry_attempts", int, 4),
            retry_max_seconds=self.positive("lis", "retry_max_seconds", float, 60.0,
                                            allow_zero=True),
            ca_file=Path(ca_file) if ca_file else None,
            download_timeout=self.positive("lis", "download_timeout", float, 300.0),
        )

    def _pdf(self) -> PdfConfig | None:
        directory = self.get("pdf", "dir", str, required=True)
        max_bytes = self.positive("pdf", "max_bytes", int, 50 * 1024 * 1024)
        if directory is None:
            return None
        self.check("pdf.dir", Path(directory).is_absolute(), "must be an absolute path")
        return PdfConfig(dir=Path(directory), max_bytes=max_bytes)

    def _notify(self) -> NotifyConfig:
        backend = self.get("notify", "backend", str, "bitrix")
        self.check("notify.backend", backend in ("bitrix", "smtp"),
                   f"unknown backend {backend!r} (known: bitrix, smtp)")
        duplicate = self.get("notify", "duplicate", str, "N")
        self.check("notify.duplicate", duplicate in ("Y", "N"), "must be 'Y' or 'N'")
        site_id = self.get("notify", "site_id", str, "s1")
        self.check("notify.site_id", bool(site_id) and len(site_id) <= 2,
                   "must be a Bitrix site id of one or two characters, like 's1'")
        result_url = self.get("notify", "result_url", str, "/personal/lab-results/{order_id}/")
        if result_url is not None:
            try:
                result_url.format(order_id=1)
            except (KeyError, IndexError, ValueError):
                self.problems.append(
                    "notify.result_url: may use only the placeholder {order_id}")
        event_name = self.get("notify", "event_name", str, "LAB_RESULTS_READY")
        updated = self.get("notify", "updated_event_name", str, "LAB_RESULTS_UPDATED")
        for key, value in (("event_name", event_name), ("updated_event_name", updated)):
            self.check(f"notify.{key}", bool(value) and len(value) <= 255,
                       "must be a non-empty event type name")
        return NotifyConfig(backend=backend, site_id=site_id, event_name=event_name,
                            updated_event_name=updated, result_url=result_url,
                            duplicate=duplicate)

    def _sync(self) -> SyncConfig:
        return SyncConfig(
            interval=self.duration("sync", "interval", 15 * 60.0),
            page_size=self.positive("sync", "page_size", int, 500),
            stale_after=self.duration("sync", "stale_after", 30 * 86400.0),
            recheck_days=self.positive("sync", "recheck_days", int, 7, allow_zero=True),
            lease=self.duration("sync", "lease", 15 * 60.0),
            stop_timeout=self.duration("sync", "stop_timeout", 20.0),
        )

    def _log(self) -> LogConfig:
        level = self.get("log", "level", str, "info")
        fmt = self.get("log", "format", str, "auto")
        self.check("log.level", level in ("debug", "info", "warning", "error"),
                   "must be one of debug, info, warning, error")
        self.check("log.format", fmt in ("auto", "json", "console"),
                   "must be one of auto, json, console")
        return LogConfig(level=level, format=fmt)


def _expand_url(template: str, env: Mapping[str, str]) -> str:
    """Expand ``${NAME}`` in a URL; in the user:password part, values are percent-encoded.

    A password holding ``@``, ``/`` or ``:`` must not change the host or the database the
    URL names: ``mysql+pymysql://labsync:${DB_PASSWORD}@host/db`` keeps meaning that host.
    """
    scheme_end = template.find("://")
    at = template.rfind("@", 0, _authority_end(template, scheme_end))
    if scheme_end < 0 or at < 0:
        return _ENV_REF.sub(lambda m: env[m.group(1)], template)
    head, userinfo, rest = template[: scheme_end + 3], template[scheme_end + 3 : at], template[at:]
    userinfo = _ENV_REF.sub(lambda m: quote(env[m.group(1)], safe=""), userinfo)
    return _ENV_REF.sub(lambda m: env[m.group(1)], head) + userinfo + _ENV_REF.sub(
        lambda m: env[m.group(1)], rest)


def _authority_end(template: str, scheme_end: int) -> int:
    """Where the host part ends: the first ``/``, ``?`` or ``#`` outside a ``${...}``."""
    if scheme_end < 0:
        return 0
    masked = _ENV_REF.sub(lambda m: "x" * len(m.group(0)), template)
    for index in range(scheme_end + 3, len(masked)):
        if masked[index] in "/?#":
            return index
    return len(masked)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
