"""Reading an LIS response's body: bounded in size and time, JSON decoded exactly.

``HttpTransport`` (``http.py``) sends and retries; what comes back is read here: in chunks
as they arrive, refused past a size cap or a deadline, checked against its Content-Length,
and, for JSON, checked to be JSON and parsed with every number kept as the text the LIS
sent (``JsonNumber``). Failures are ``labsync.errors`` from the start: a transport error
mid-body goes through ``labsync.lis.classify`` like any other.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NoReturn

import requests

from labsync.errors import BadLisData, TransientLisError
from labsync.lis.classify import TRANSPORT_ERRORS, classify_exception, excerpt

CHUNK_BYTES = 64 * 1024
JSON_MAX_BYTES = 10 * 1024 * 1024
EDGE_BYTES = 1024  # how much of a download's start and end ``copy_body`` keeps for a check

_MEDIA_TYPE = re.compile(r"^[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}$")

Clock = Callable[[], float]


class JsonNumber(str):
    """A JSON number as its literal text, exactly as sent: ``5.40`` stays ``"5.40"``.

    Lab values are shown as the lab wrote them; a float would turn ``5.40`` into ``5.4``
    and ``1e308`` into ``1e+308``.
    """

    __slots__ = ()


def json_kind(value: Any) -> str:
    """A JSON type name for messages; the value itself may be large or hostile."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, JsonNumber):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_body(response: requests.Response, what: str, max_bytes: int, *,
              deadline: float | None = None, clock: Clock = time.monotonic) -> Iterator[bytes]:
    """The body in chunks of up to 64 KiB, refused past ``max_bytes`` without reading on.

    A reset mid-body, fewer bytes than Content-Length promised, or a body still coming in at
    ``deadline`` (a ``clock`` value) is a ``TransientLisError``. Reads return whatever has
    arrived (``read1``), so a server dripping bytes meets the deadline too, not just one
    that stops: ``read_timeout`` bounds each read, the deadline the whole body.
    """
    # Content-Length counts the bytes on the wire; with compression we count decoded bytes.
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    length = response.headers.get("Content-Length", "")
    declared = int(length) if encoding == "identity" and length.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise BadLisData(f"{what}: the body is larger than {max_bytes} bytes")
    received = 0
    try:
        for chunk in _reads(response):
            if deadline is not None and clock() > deadline:
                raise TransientLisError(f"{what}: the body was still coming in after the "
                                        "download time limit (lis.download_timeout)")
            received += len(chunk)
            if received > max_bytes:
                raise BadLisData(f"{what}: the body is larger than {max_bytes} bytes")
            yield chunk
    except TRANSPORT_ERRORS as exc:
        raise classify_exception(exc, what) from None
    # urllib3 notices a short body on real sockets; this also covers transports that do not.
    if declared is not None and received < declared:
        raise TransientLisError(f"{what}: the body was cut short ({received} of {declared} bytes)")


def _reads(response: requests.Response) -> Iterator[bytes]:
    """Chunks of the body as they arrive (decoded), at most ``CHUNK_BYTES`` each."""
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # a transport without urllib3 underneath
        yield from response.iter_content(CHUNK_BYTES)
        return
    while chunk := read1(CHUNK_BYTES, decode_content=True):
        yield chunk


def copy_body(response: requests.Response, sink: BinaryIO, what: str, max_bytes: int, *,
              deadline: float, clock: Clock) -> tuple[bytes, bytes, int]:
    """Write the body into ``sink`` as ``read_body`` reads it: (its first ``EDGE_BYTES``,
    its last ``EDGE_BYTES``, the bytes written). Errors writing to ``sink`` pass through."""
    head, tail, total = b"", b"", 0
    for chunk in read_body(response, what, max_bytes, deadline=deadline, clock=clock):
        total += len(chunk)
        if len(head) < EDGE_BYTES:
            head += chunk[: EDGE_BYTES - len(head)]
        tail = (tail + chunk[-EDGE_BYTES:])[-EDGE_BYTES:]
        sink.write(chunk)
    return head, tail, total


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number")


def decode_json(body: bytes, *, what: str) -> Any:
    """Parse ``body``, numbers as ``JsonNumber``; NaN, Infinity and bad JSON are ``BadLisData``."""
    try:
        return json.loads(
            body, parse_float=JsonNumber, parse_int=JsonNumber, parse_constant=_reject_constant
        )
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadLisData(f"{what}: not valid JSON ({excerpt(str(exc))})") from None
    except RecursionError:
        raise BadLisData(f"{what}: JSON nested too deeply") from None


def check_json_type(response: requests.Response, what: str) -> None:
    """A 200 HTML error page from a proxy must not reach the JSON parser as data."""
    content_type = response.headers.get("Content-Type")
    if content_type is None:
        return  # some servers omit it; the parser still refuses anything that is not JSON
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        shown = media if _MEDIA_TYPE.match(media) else "an unreadable media type"
        raise BadLisData(f"{what}: expected JSON, got {shown}")
