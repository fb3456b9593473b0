"""``[lis.hl7]``: HL7 v2 results pushed into a drop folder or over MLLP (issue 14).

The adapter (``labsync.lis.hl7``) is handed these values as ``LisConfig.options``; it needs
no ``lis.base_url`` and no credential. ``docs/hl7.md`` describes each key.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from labsync.config.adapters import AdapterSchema
from labsync.config.readers import Invalid
from labsync.config.schema import Key, Kind

DEFAULT_ALLOW = ("127.0.0.1", "::1")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s\[\]]+)):(?P<port>\d+)$")


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:2575"`` or ``"[::1]:2575"`` → (host, port); ``Invalid`` if not. Port 0
    (any free one) passes here and is refused by the config."""
    match = _HOST_PORT.match(text.strip())
    if match is None:
        raise Invalid(f"{text!r} is not host:port (e.g. \"127.0.0.1:2575\", \"[::1]:2575\")")
    port = int(match.group("port"))
    if port > 65535:
        raise Invalid(f"port {port} is not between 1 and 65535")
    return match.group("v6") or match.group("host"), port


def parse_allow(value: Any) -> tuple[str, ...]:
    """Addresses and networks (CIDR), as a list or as one comma-separated string →
    normalised networks (``"10.0.0.0/8"``); ``Invalid`` for anything else."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise Invalid("must be a list of addresses or networks, e.g. [\"127.0.0.1\", "
                      "\"10.1.2.0/24\"]")
    found = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise Invalid(f"{item!r} is not an IP address or network") from None
    if not found:
        raise Invalid("lists no address: no sender could connect")
    return tuple(found)


def _listen(text: str) -> str:
    if parse_listen(text)[1] == 0:  # "any free port": only tests ask the adapter for that
        raise Invalid("port 0 is not between 1 and 65535")
    return text.strip()


def _codec(name: str) -> str:
    import codecs

    try:
        return codecs.lookup(name).name
    except LookupError:
        raise Invalid(f"{name!r} is not a character set Python knows (e.g. utf-8, "
                      "cp1251, iso8859-5)") from None


HL7 = AdapterSchema(
    "hl7",
    keys=(
        Key("drop_dir", Kind.PATH, required=True, absolute=True),
        Key("listen", strip=True, nonempty=True, check=_listen),
        Key("allow", Kind.STRINGS, default=parse_allow(list(DEFAULT_ALLOW)), check=parse_allow),
        Key("order_id", default="placer", choices=("placer", "filler")),
        Key("encoding", default="utf-8", strip=True, nonempty=True, check=_codec),
        Key("hold_unknown", Kind.DURATION, default=7 * 86400.0),
        Key("keep_done", Kind.DURATION, default=30 * 86400.0),
    ),
    needs_base_url=False,
    needs_credentials=False,
)
