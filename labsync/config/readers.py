"""The readers every section shares: ``${NAME}``, durations, secret files, numbers, booleans.

Each reader takes a raw TOML value and returns the value labsync uses, or raises
``Invalid`` with the text of the problem (without the key: ``schema`` puts the key in front).
Nothing here knows a section; ``schema.read_section`` applies them key by key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Invalid(Exception):
    """A value that cannot be used; ``str()`` is the problem, without the key."""


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


NO_SECRET = Secret("")


def parse_duration(text: str) -> float:
    """``"15m"`` → 900.0. Units: s, m, h, d. Raises ``ValueError`` on anything else."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise ValueError(duration_problem(text))
    return float(int(match.group(1)) * _UNITS[match.group(2)])


def duration_problem(value: Any) -> str:
    """What is wrong with ``value`` as a duration."""
    return f"{value!r} is not a duration like '30s', '15m', '1h' or '30d'"


def expand_env(text: str, env: Mapping[str, str], *, url: bool = False) -> str:
    """``${NAME}`` replaced by ``env[NAME]``; an unset NAME is ``Invalid`` naming it.

    ``url``: the text is a URL, and values in its ``user:password@`` part are
    percent-encoded, so a password holding ``@``, ``/`` or ``:`` cannot change the host.
    """
    missing = sorted({m for m in _ENV_REF.findall(text) if m not in env})
    if missing:
        raise Invalid(f"environment variable {', '.join(missing)} is not set")
    if url:
        return _expand_url(text, env)
    return _ENV_REF.sub(lambda m: env[m.group(1)], text)


def read_secret_file(file_name: str) -> str:
    """The secret in ``file_name`` (a systemd credential, say), without surrounding blanks."""
    try:
        return Path(file_name).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise Invalid(f"cannot read {file_name} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise Invalid(f"{file_name} is not UTF-8 text") from None


def is_integer(value: Any) -> bool:
    """An integer, and not a boolean (TOML ``true`` is an ``int`` to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_number(value: Any, *, integer: bool) -> int | float:
    """``value`` as an int (``integer``) or a float (an int is accepted); ``Invalid`` else."""
    if is_integer(value):
        return value if integer else float(value)
    if not integer and isinstance(value, float):
        return value
    raise Invalid("must be an integer" if integer else "must be a number")


def in_range(value: float, *, low: float | None = None, high: float | None = None,
             above: float | None = None) -> bool:
    """Whether ``low <= value <= high`` and ``value > above`` (each bound optional)."""
    return not ((low is not None and value < low) or (high is not None and value > high)
                or (above is not None and value <= above))


def describe_range(low: float | None, high: float | None, above: float | None) -> str:
    """The words after "must be" for a range: ``from 1 to 65535``, ``more than zero``."""
    if low is not None and high is not None:
        return f"from {_number(low)} to {_number(high)}"
    parts = []
    if above is not None:
        parts.append("more than zero" if above == 0 else f"more than {_number(above)}")
    if low is not None:
        parts.append("zero or more" if low == 0 else f"at least {_number(low)}")
    if high is not None:
        parts.append(f"at most {_number(high)}")
    return " and ".join(parts)


def as_bool(value: Any) -> bool:
    """TOML ``true``/``false`` only: ``"yes"`` and ``1`` are problems, not guesses."""
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def as_path(text: str, *, absolute: bool = False, exists: str | None = None) -> Path:
    """``text`` as a path; ``absolute`` refuses a relative one, ``exists`` is "file" or "dir"."""
    path = Path(text)
    if absolute and not path.is_absolute():
        raise Invalid("must be an absolute path")
    if exists == "file" and not path.is_file():
        raise Invalid(f"{text} is not a file")
    if exists == "dir" and not path.is_dir():
        raise Invalid(f"{text} is not a directory")
    return path


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _expand_url(template: str, env: Mapping[str, str]) -> str:
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
