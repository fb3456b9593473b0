"""Original-mode HL7 acknowledgements (``ACK``): ``MSA-1`` AA, AE or AR, ``MSA-2`` the
message's MSH-10, and for an error its reason in ``MSA-3`` and an ``ERR`` segment.

Built here rather than with python-hl7's ``Message.create_ack``: that one needs a parsed
message (an unparseable frame must be answered too), writes no ``MSA-3``/``ERR``, and stamps
``MSH-7`` from ``datetime.utcnow()`` without an offset.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime

from labsync.lis.hl7.parse import Header
from labsync.lis.hl7.text import Delimiters

# HL7 table 0357, the codes labsync uses
ERROR_TEXT = {"100": "Segment sequence error", "101": "Required field missing",
              "102": "Data type error", "103": "Table value not found",
              "200": "Unsupported message type", "201": "Unsupported event code",
              "207": "Application internal error"}
_ids = itertools.count(1)
_PREFIX = f"LS{os.getpid() % 100000:05d}"


def build_ack(code: str, header: Header | None, *, reason: str = "", error_code: str = "207",
              where: str = "", now: datetime | None = None) -> bytes:
    """The ACK for a message (``header`` None: one that could not be read at all), encoded
    in the message's charset."""
    d = header.delims if header is not None else Delimiters()
    codec = header.codec if header is not None else "ascii"
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S%z")

    def h(attr: str) -> str:
        return getattr(header, attr) if header is not None else ""

    version = h("version") or "2.5.1"
    event = header.kind[1] if header is not None else ""
    msh = d.field.join([
        "MSH", f"{d.component}{d.repetition}{d.escape}{d.subcomponent}{d.truncation}",
        h("receiving_app") or "labsync", h("receiving_facility"), h("sending_app"),
        h("sending_facility"), stamp, "",
        d.component.join(["ACK", event, "ACK"]) if event else "ACK",
        f"{_PREFIX}{next(_ids):010d}", h("processing_id") or "P", version])
    msa = ["MSA", code, h("control_id")]
    segments = [msh]
    if code != "AA":
        text = d.escaped(reason)[:200] if reason else ""
        msa.append(text)
        segments.append(d.field.join(msa))
        location = d.component.join(where.split("^")) if where else ""
        error = d.component.join([error_code, ERROR_TEXT.get(error_code, ""), "HL70357"])
        segments.append(d.field.join(["ERR", "", location, error, "E", "", "", "",
                                      d.escaped(reason)[:1000]]))
    else:
        segments.append(d.field.join(msa))
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


def read_ack(data: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3) of an ACK, for tests and the bench."""
    for segment in data.replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSA"):
            sep = segment[3:4].decode("latin-1") or "|"
            fields = [*segment.decode("utf-8", errors="replace").split(sep), "", "", ""]
            return fields[1], fields[2], fields[3]
    return "", "", ""
