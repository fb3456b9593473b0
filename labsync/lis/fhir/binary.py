"""A ``Binary`` download: the PDF's bytes as the server sent them, or a JSON ``Binary``.

Asked with ``Accept: application/pdf``, a FHIR server answers with the raw bytes; some
answer with the resource instead, ``{"resourceType": "Binary", "contentType":
"application/pdf", "data": "<base64>"}``. ``BinarySink`` tells the two apart by the first
byte that is not a blank (a PDF starts with ``%``, JSON with ``{``) while the body streams
in: raw bytes go straight into the caller's sink, under its ``max_bytes``; JSON is held in
memory (its base64 is a third larger than the PDF) and decoded into the sink at the end.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, BinaryIO

from labsync.errors import BadLisData
from labsync.lis.body import decode_json
from labsync.lis.fhir.elements import kind, obj, string

_BLANKS = b" \t\r\n"


def json_allowance(max_bytes: int) -> int:
    """How large a JSON ``Binary`` holding ``max_bytes`` of PDF may be: base64 and a margin."""
    return max_bytes * 4 // 3 + 64 * 1024


class BinarySink:
    """The sink ``HttpTransport.stream_to`` writes into, in front of the caller's ``sink``.

    ``stream_to`` rewinds and truncates it before every attempt; so does this, and the
    caller's sink with it. Only ``write``, ``seek``, ``truncate`` and ``flush`` are used.
    """

    def __init__(self, sink: BinaryIO, max_bytes: int, what: str) -> None:
        self._sink, self._max, self._what = sink, max_bytes, what
        self._mode: str | None = None  # None until the first byte that is not a blank
        self._held = bytearray()  # blanks before the first byte, then the JSON
        self.size = 0  # bytes written into the caller's sink

    def write(self, data: bytes | bytearray | memoryview) -> int:
        chunk = bytes(data)
        if self._mode is None:
            start = len(chunk) - len(chunk.lstrip(_BLANKS))
            self._held += chunk[:start]
            rest = chunk[start:]
            if not rest:
                return len(chunk)
            self._mode = "json" if rest[:1] == b"{" else "raw"
            if self._mode == "raw":
                held, self._held = bytes(self._held), bytearray()
                self._raw(held)
            chunk = rest
        if self._mode == "json":
            self._held += chunk
            if len(self._held) > json_allowance(self._max):
                raise BadLisData(f"{self._what}: the Binary is larger than {self._max} bytes")
        else:
            self._raw(chunk)
        return len(data)

    def _raw(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self._max:
            raise BadLisData(f"{self._what}: the body is larger than {self._max} bytes")
        if chunk:
            self._sink.write(chunk)
            self.size += len(chunk)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._mode, self._held, self.size = None, bytearray(), 0
        return self._sink.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self._sink.truncate(size)

    def flush(self) -> None:
        self._sink.flush()

    def finish(self) -> int:
        """After the download: a JSON ``Binary`` decoded into the sink; the bytes written."""
        if self._mode != "json":
            if self.size == 0 and self._held:  # blanks only: hand them on, pdfs refuses them
                self._raw(bytes(self._held))
            return self.size
        data = pdf_of_binary(decode_json(bytes(self._held), what=self._what), self._what)
        self._held = bytearray()
        if len(data) > self._max:
            raise BadLisData(f"{self._what}: the PDF is larger than {self._max} bytes")
        self._raw(data)
        self._sink.flush()
        return self.size


def pdf_of_binary(data: Any, what: str) -> bytes:
    """The bytes of a JSON ``Binary`` resource whose content type is PDF."""
    binary = obj(data, what)
    if binary.get("resourceType") != "Binary":
        raise BadLisData(f"{what}: a JSON answer that is not a Binary "
                         f"({kind(binary.get('resourceType'))} resourceType)")
    content_type = (string(binary.get("contentType"), f"{what}: contentType") or "")
    if content_type.split(";", 1)[0].strip().lower() != "application/pdf":
        raise BadLisData(f"{what}: the Binary is not a PDF (contentType "
                         f"{content_type[:60]!r})")
    encoded = string(binary.get("data"), f"{what}: data")
    if not encoded:
        raise BadLisData(f"{what}: the Binary has no data")
    try:
        return base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadLisData(f"{what}: the Binary's data is not base64") from None
