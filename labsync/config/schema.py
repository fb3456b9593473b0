"""A section's schema, declared once: its keys, their kinds, defaults, ranges, secrets.

``read_section`` reads one TOML table against its ``Section``: an unknown key, a value of
the wrong kind, out of range or not among the choices is one problem each, naming the key
(``lis.max_concurrency: must be more than zero``); every problem of the table is reported,
unknown keys first, then in the order the keys are declared. What is left to a section's
builder is what involves several keys (``smtp.ssl`` with ``smtp.starttls``).

A ``Key`` with ``kind=SECRET`` is read from ``name`` or from the file ``name_file`` names
(a systemd credential), never both, into a ``Secret``; ``Config.secrets()`` and the log
redaction find secrets through these declarations, not through a list kept by hand.

A ``Key`` with ``kind=TABLE`` is a table inside the section (``[lis.mapped.results]``, or
an inline ``{ … }``): with ``keys`` it is read like a section of its own, its problems
named ``lis.mapped.results.value``; with ``each`` every entry, whatever its name, is read as
that key (``[lis.mapped.status_map]``); with neither it is handed to ``check`` as it is.
``STRINGS`` is a TOML array of strings. A ``Section``'s ``check(values, ctx)`` reports
what involves several of its keys, once they are read (nested tables hold no secrets).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from labsync.config.readers import (
    Invalid,
    Secret,
    as_bool,
    as_number,
    as_path,
    describe_range,
    duration_problem,
    expand_env,
    in_range,
    parse_duration,
    read_secret_file,
)


class Kind(enum.Enum):
    """What a key holds, and what it is read into."""

    STR = "str"
    INT = "int"
    FLOAT = "float"  # an integer is accepted and becomes a float
    BOOL = "bool"
    DURATION = "duration"  # "30s", "15m", "1h", "30d" → seconds (float)
    PATH = "path"  # → pathlib.Path
    SECRET = "secret"  # noqa: S105 - a kind. → Secret, from ``name`` or ``name_file``
    STRINGS = "strings"  # a TOML array of strings → tuple[str, ...]
    TABLE = "table"  # a table: ``keys`` read like a section's, or every entry as ``each``

    @property
    def noun(self) -> str:
        """What its problems say a value must be: "must be an integer"."""
        return _NOUNS.get(self, "a string")


_NOUNS = {Kind.INT: "an integer", Kind.FLOAT: "a number", Kind.BOOL: "true or false",
          Kind.STRINGS: "an array of strings", Kind.TABLE: "a table"}
_TEXT_KINDS = (Kind.STR, Kind.PATH, Kind.DURATION)


@dataclass(frozen=True)
class Key:
    """One key of a section. Problems use the generated words unless ``message`` is given.

    ``message`` replaces the words for a value of the wrong kind, out of range, not among
    ``choices`` or empty (``{value!r}`` in it is the value as written; never use it for a
    secret). ``check(value)`` converts or refuses a value that passed those tests, raising
    ``Invalid("…")``. Strings have ``${NAME}`` expanded first (``url``: percent-encoded in
    the URL's ``user:password`` part).
    """

    name: str
    kind: Kind = Kind.STR
    default: Any = None
    required: bool = False
    secret: bool = False  # a SECRET always is; set it on a key whose value holds one
    low: float | None = None  # numbers: value >= low
    high: float | None = None  # numbers: value <= high
    above: float | None = None  # numbers: value > above
    choices: tuple[Any, ...] | None = None
    message: str | None = None
    check: Callable[[Any], Any] | None = None
    strip: bool = False  # strings: surrounding blanks dropped
    nonempty: bool = False  # strings and secrets: "" is a problem (required implies it)
    url: bool = False
    zero_ok: bool = False  # durations: "0s" allowed (an off switch, e.g. pdf.wait)
    inline: bool = True  # SECRET: ``name = "…"`` accepted
    file: bool = True  # SECRET: ``name_file = "/path"`` accepted
    absolute: bool = False  # PATH: must be absolute
    exists: str | None = None  # PATH: "file" or "dir" must exist
    keys: tuple[Key, ...] = ()  # TABLE: its keys, read like a section's
    each: Key | None = None  # TABLE: the key every entry is read as (any entry name)

    def __post_init__(self) -> None:
        if self.kind is Kind.SECRET:
            object.__setattr__(self, "secret", True)

    @property
    def file_name(self) -> str:
        return f"{self.name}_file"

    @property
    def names(self) -> tuple[str, ...]:
        """The names this key may be written as in its table."""
        if self.kind is not Kind.SECRET:
            return (self.name,)
        return ((self.name,) if self.inline else ()) + ((self.file_name,) if self.file else ())


@dataclass(frozen=True)
class Section:
    """A table of the config file (``name`` as written in problems: ``lis``, ``lis.qlab``)."""

    name: str
    keys: tuple[Key, ...] = ()
    # What involves several keys: ``check(values, ctx)`` once every key is read, reporting
    # into ``ctx`` (a key that failed is in ``values.failed``: say nothing more about it).
    check: Callable[[Values, Context], None] | None = field(default=None, compare=False)
    _by_name: dict[str, Key] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {k.name: k for k in self.keys})

    @property
    def known(self) -> frozenset[str]:
        """Every name a key of this section may be written as."""
        return frozenset(name for key in self.keys for name in key.names)

    @property
    def secret_keys(self) -> tuple[Key, ...]:
        return tuple(key for key in self.keys if key.secret)

    def key(self, name: str) -> Key:
        return self._by_name[name]


class Values(dict[str, Any]):
    """A section's values by key name (defaults for absent or refused keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.given: set[str] = set()  # written in the table (as ``name`` or ``name_file``)
        self.failed: set[str] = set()  # written, but refused: a problem was reported

    def ok(self, name: str) -> bool:
        """Given and accepted."""
        return name in self.given and name not in self.failed


class Context:
    """What reading needs besides the tables: the environment, and the problems found."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def once(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def expand(self, key: str, text: str, *, url: bool = False) -> str | None:
        """``text`` with ``${NAME}`` expanded, or None with the problem reported."""
        try:
            return expand_env(text, self.env, url=url)
        except Invalid as exc:
            self.problem(key, str(exc))
            return None


_BAD = object()


def table_of(section: str, raw: Any, ctx: Context) -> Mapping[str, Any] | None:
    """``raw`` if it is a table (absent: empty); else None, the problem said once."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        ctx.once(f"{section}: must be a table ([{section}])")
        return None
    return raw


def read_section(section: Section, raw: Any, ctx: Context, *,
                 tables: Collection[str] = ()) -> Values:
    """Every key of ``section`` from the TOML table ``raw``, every problem into ``ctx``.

    ``tables``: names in ``raw`` the caller reads itself (an adapter's ``[lis.<name>]``).
    A ``raw`` that is not a table is one problem and gives the defaults.
    """
    values = Values()
    for key in section.keys:
        values[key.name] = key.default
    table = table_of(section.name, raw, ctx)
    if table is None:
        return values
    known = section.known
    for name in table:
        if name not in known and name not in tables:
            ctx.problem(f"{section.name}.{name}", "unknown key")
    for key in section.keys:
        if key.kind is Kind.SECRET:
            value = _read_secret(key, table, ctx, section.name)
        elif key.name in table:
            value = _read_value(key, table[key.name], ctx, f"{section.name}.{key.name}")
        else:
            if key.required:
                ctx.problem(f"{section.name}.{key.name}", "required")
            continue
        if any(name in table for name in key.names):
            values.given.add(key.name)
        if value is _BAD:
            values.failed.add(key.name)
        elif value is not None:
            values[key.name] = value
    if section.check is not None:
        section.check(values, ctx)
    return values


def _refuse(key: Key, full: str, ctx: Context, words: str, value: Any) -> object:
    if key.message is not None:
        ctx.problem(full, key.message.format(value=value))
    else:
        ctx.problem(full, words)
    return _BAD


def _read_value(key: Key, value: Any, ctx: Context, full: str) -> Any:
    if key.kind is Kind.TABLE:
        return _read_table(key, value, ctx, full)
    if key.kind is Kind.STRINGS:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return _refuse(key, full, ctx, f"must be {key.kind.noun}", value)
        items = [ctx.expand(full, item) for item in value]
        if any(item is None for item in items):
            return _BAD
        value = tuple(items)
    elif key.kind in _TEXT_KINDS:
        if not isinstance(value, str):
            if key.kind is Kind.DURATION:
                return _refuse(key, full, ctx, duration_problem(value), value)
            if key.choices is not None:
                return _refuse(key, full, ctx, _choices_words(key), value)
            return _refuse(key, full, ctx, f"must be {key.kind.noun}", value)
        text = ctx.expand(full, value, url=key.url)
        if text is None:
            return _BAD
        value = text.strip() if key.strip else text
        if key.nonempty and not value:
            return _refuse(key, full, ctx, "must not be empty", value)
        if key.kind is Kind.PATH and not value and not (key.required or key.absolute
                                                        or key.exists):
            return None  # an optional path left empty ("${DOCROOT}" of an empty variable)
        try:
            if key.kind is Kind.DURATION:
                value = _duration(value, zero_ok=key.zero_ok)
            elif key.kind is Kind.PATH:
                value = as_path(value, absolute=key.absolute, exists=key.exists)
        except Invalid as exc:
            ctx.problem(full, str(exc))
            return _BAD
    elif key.kind in (Kind.INT, Kind.FLOAT):
        ranged = any(bound is not None for bound in (key.low, key.high, key.above))
        closed = key.low is not None and key.high is not None
        words = f"must be {key.kind.noun}" + (
            f" {describe_range(key.low, key.high, key.above)}" if closed else "")
        try:
            value = as_number(value, integer=key.kind is Kind.INT)
        except Invalid:
            return _refuse(key, full, ctx, words, value)
        if ranged and not in_range(value, low=key.low, high=key.high, above=key.above):
            return _refuse(key, full, ctx, words if closed else
                           f"must be {describe_range(key.low, key.high, key.above)}", value)
    elif key.kind is Kind.BOOL:
        try:
            value = as_bool(value)
        except Invalid as exc:
            return _refuse(key, full, ctx, str(exc), value)
    if key.choices is not None and value not in key.choices:
        return _refuse(key, full, ctx, _choices_words(key), value)
    if key.check is not None:
        try:
            value = key.check(value)
        except Invalid as exc:
            ctx.problem(full, str(exc))
            return _BAD
    return value


def _read_table(key: Key, value: Any, ctx: Context, full: str) -> Any:
    """A table inside a section: its ``keys``, or every entry as ``each``, or as it is."""
    if not isinstance(value, Mapping):
        return _refuse(key, full, ctx, f"must be a table ([{full}] or {{ … }})", value)
    found = len(ctx.problems)
    read: Any
    if key.keys:
        read = read_section(Section(full, key.keys), value, ctx)
    elif key.each is not None:
        read = {}
        for name, item in value.items():
            got = _read_value(key.each, item, ctx, f"{full}.{name}")
            if got is not _BAD:
                read[name] = got
    else:
        read = dict(value)
    if len(ctx.problems) > found:
        return _BAD
    if key.check is not None:
        try:
            read = key.check(read)
        except Invalid as exc:
            ctx.problem(full, str(exc))
            return _BAD
    return read


def _read_secret(key: Key, table: Mapping[str, Any], ctx: Context, section: str) -> Any:
    """``name`` or ``name_file``, never both; absent: the default (None unless declared)."""
    full, file_full = f"{section}.{key.name}", f"{section}.{key.file_name}"
    inline = key.inline and key.name in table
    in_file = key.file and key.file_name in table
    must_hold = key.required or key.nonempty
    if inline and in_file:
        ctx.problem(full, f"give {full} or {file_full}, not both")
        return _BAD
    if in_file:
        file_name = _secret_text(table[key.file_name], ctx, file_full)
        if file_name is None:
            return _BAD
        try:
            text = read_secret_file(file_name)
        except Invalid as exc:
            ctx.problem(file_full, str(exc))
            return _BAD
        if must_hold and not text:
            ctx.problem(file_full, f"{file_name} is empty")
            return _BAD
        return Secret(text)
    if inline:
        # An unset ${VAR} is reported here, and the key counts as given: no "required" too.
        given = _secret_text(table[key.name], ctx, full)
        if given is None:
            return _BAD
        if must_hold and not given:
            ctx.problem(full, "is empty")
            return _BAD
        return Secret(given)
    if key.required:
        if key.inline and key.file:
            ctx.problem(full, f"required (or {file_full})")
        else:
            ctx.problem(full if key.inline else file_full, "required")
    return None


def _secret_text(value: Any, ctx: Context, full: str) -> str | None:
    if not isinstance(value, str):
        ctx.problem(full, "must be a string")  # never the value: it may be the secret
        return None
    return ctx.expand(full, value)


def _duration(text: str, *, zero_ok: bool = False) -> float:
    if zero_ok and text.strip() in ("0", "0s", "0m", "0h", "0d"):
        return 0.0
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _choices_words(key: Key) -> str:
    assert key.choices is not None
    return f"must be one of {', '.join(str(c) for c in key.choices)}"
