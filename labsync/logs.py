"""Logging: structlog for labsync, the same renderer for the libraries' stdlib loggers.

JSON lines on stdout when it is not a terminal (journald keeps them), readable lines on a
terminal. A redaction processor replaces every configured secret, and anything shaped like
a password in a URL or the value of a secret header (``X-Api-Key``, ``Authorization``, and
whichever header ``lis.auth`` sends the credential in), wherever it appears in a line,
tracebacks included.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+(?=@)", re.I)
# Headers whose value is always a credential; the configured ones are added (``add_headers``).
SECRET_HEADERS = ("x-api-key", "authorization", "proxy-authorization")
# After the name: a quote, ":" or "=", a quote, an auth scheme ("Bearer "), then the value.
_HEADER_VALUE = r"['\"]?\s*[:=]\s*['\"]?(?:(?:bearer|basic|digest|token|negotiate)\s+)?"
MASK = "***"
# structlog's own bookkeeping (the stdlib LogRecord); removed before rendering, kept intact.
_META_KEYS = frozenset({"_record", "_from_structlog"})
# apscheduler's INFO is chatter ("Adding job tentatively", "Added job", "Scheduler started",
# "Running job" every run): labsync's own daemon.* and job lines say more. Its WARNING and
# above stay: a missed run, a run skipped because the last one is still going, a job's error.
LIBRARY_LOGGERS = {"apscheduler": logging.WARNING, "urllib3": logging.WARNING,
                   "sqlalchemy": logging.WARNING, "labsync.fake_qlab": logging.WARNING}


class Redactor:
    """A structlog processor that masks secrets in every string of an event, nested ones too."""

    def __init__(self, secrets: Iterable[str] = (), headers: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self.headers: list[str] = list(SECRET_HEADERS)  # lower case
        self._pattern: tuple[tuple[str, ...], re.Pattern[str]] | None = None
        self.add(secrets)
        self.add_headers(headers)

    def add(self, secrets: Iterable[str]) -> None:
        for secret in secrets:
            # Very short values would mask ordinary words; config keys are longer than this.
            if secret and len(secret) >= 4 and secret not in self.secrets:
                self.secrets.append(secret)
        self.secrets.sort(key=len, reverse=True)

    def add_headers(self, names: Iterable[str]) -> None:
        """Mask the value of these headers too, wherever a line shows one."""
        for name in names:
            if name and name.lower() not in self.headers:
                self.headers.append(name.lower())

    def _header_pattern(self) -> re.Pattern[str]:
        names = tuple(self.headers)
        if self._pattern is None or self._pattern[0] != names:
            alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
            self._pattern = names, re.compile(
                "(?P<head>(?:" + alternatives + ")" + _HEADER_VALUE + r")[^\s'\",}]+", re.I)
        return self._pattern[1]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
        return self._header_pattern().sub(lambda m: m.group("head") + MASK, text)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):  # header dicts are Mappings, not dicts
            return {k: MASK if isinstance(k, str) and k.lower() in self.headers
                    and isinstance(v, str | bytes) else self._walk(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v) for v in value]
        if isinstance(value, tuple):  # a plain tuple: a namedtuple cannot be rebuilt this way
            return tuple(self._walk(v) for v in value)
        if isinstance(value, BaseException):
            return self.redact(f"{type(value).__name__}: {value}")
        if value is None or isinstance(value, bool | int | float):
            return value
        # The renderers show anything else (bytes, sets, objects) by its repr().
        text = repr(value)
        masked = self.redact(text)
        return masked if masked != text else value

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in list(event.items()):
            if key not in _META_KEYS:
                event[key] = self._walk(value)
        return event


REDACTOR = Redactor()


class PoolResetFilter(logging.Filter):
    """One warning line, not an error with a traceback, for a pooled connection that could
    not be reset because the server dropped it.

    SQLAlchemy's pool logs that ("Exception during reset or similar") at ERROR with the
    whole traceback when a connection goes back to the pool after the server went away.
    The pool discards the connection and the next use reconnects. Whatever the outage
    broke is reported by labsync's own lines, once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sqlalchemy.pool") and record.exc_info:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _Holder(logging.Filter):
    """Keeps every line of one logger out of the output and hands it to ``held``'s caller."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        # A structlog line reaches the stdlib logger as its event dict (wrap_for_formatter).
        if isinstance(record.msg, Mapping):
            event = {k: v for k, v in record.msg.items() if k not in _META_KEYS}
        else:
            event = {"event": record.getMessage()}
        event.setdefault("level", record.levelname.lower())
        self.events.append(event)
        return False


@contextmanager
def held(logger_name: str) -> Iterator[list[dict[str, Any]]]:
    """Hold back the lines of ``logger_name`` (exactly that logger) while the block runs.

    For ``labsync check``: what the LIS probe logs (``lis.retry``) would land in the middle
    of the report; the check reads the held events and says what they mean in its own line.
    Only lines that pass the logger's level are held, and only through ``setup``'s stdlib
    bridge (structlog's default configuration prints without the stdlib loggers).
    """
    holder = _Holder()
    logger = logging.getLogger(logger_name)
    logger.addFilter(holder)
    try:
        yield holder.events
    finally:
        logger.removeFilter(holder)


def setup(level: str = "info", fmt: str = "auto", secrets: Iterable[str] = (),
          stream: TextIO | None = None, *, headers: Iterable[str] = ()) -> None:
    """Configure structlog and the stdlib root logger. Safe to call again (tests, the demo).

    ``secrets`` (``Config.secrets()``) are masked wherever they appear; so is the value of
    every header in ``headers`` (``Config.secret_headers()``) and in ``SECRET_HEADERS``.
    """
    stream = stream or sys.stdout
    REDACTOR.add(secrets)
    REDACTOR.add_headers(headers)
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    renderer: Any = (structlog.processors.JSONRenderer(ensure_ascii=False) if use_json
                     else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(PoolResetFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_labsync", False):
            root.removeHandler(old)
    handler._labsync = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name, lib_level in LIBRARY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(lib_level, root.level))
