"""PHP ``serialize()`` of a flat array of strings, as ``CEvent::Send`` stores ``C_FIELDS``.

Hand-written rather than a dependency: the one shape Bitrix needs is a few lines, and the
PyPI ``phpserialize`` package is unmaintained since 2012. String lengths are UTF-8 bytes,
as PHP counts them; ``tests/test_phpserial.py`` feeds the output to PHP's own
``unserialize()``.
"""

from __future__ import annotations

from collections.abc import Mapping


def _string(value: str) -> str:
    return f's:{len(value.encode("utf-8"))}:"{value}";'


def serialize_strings(fields: Mapping[str, str]) -> str:
    """``{"EMAIL": "a@b"}`` → ``a:1:{s:5:"EMAIL";s:3:"a@b";}``."""
    for key, value in fields.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"C_FIELDS takes strings only, got {key!r}: {type(value).__name__}")
        if key.isdigit():
            # PHP would turn a decimal string key into an integer key; Bitrix never uses one.
            raise ValueError(f"C_FIELDS key {key!r} would become an integer key in PHP")
    body = "".join(_string(k) + _string(v) for k, v in fields.items())
    return f"a:{len(fields)}:{{{body}}}"
