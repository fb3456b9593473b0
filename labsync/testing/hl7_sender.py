"""The sending side of HL7 v2, for tests and the bench: ORU^R01 messages built from
``labsync.model`` orders, dropped into a folder the way a LIS should (written elsewhere,
then renamed in), or sent over MLLP by a small client that reads each ACK whole.

The client is here because python-hl7's ``MLLPClient.send`` reads the answer with one
``recv`` and may return half an ACK (python-hl7 issue #44); the tests use the library's
``mllp_send`` too, for small messages, as the "real sender".
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from labsync.model import LisOrder, OrderStatus, PdfKind, TestResult

SEP = "|"
_ESC = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\", "\r": "\\.br\\",
        "\n": "\\.br\\"}
_OBR25 = {OrderStatus.COMPLETED: "F", OrderStatus.PROCESSING: "P",
          OrderStatus.RECEIVED: "O", OrderStatus.CANCELLED: "X"}
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def escape(text: str | None) -> str:
    return "".join(_ESC.get(c, c) for c in text) if text else ""


def dtm(moment: datetime | None) -> str:
    if moment is None:
        return ""
    text = moment.strftime("%Y%m%d%H%M%S")
    return text + moment.strftime("%z") if moment.tzinfo is not None else text


def oru(control_id: str, orders: Sequence[LisOrder], *, sent_at: datetime,
        sending_app: str = "", sending_facility: str = "", charset: str = "UNICODE UTF-8",
        order_id: str = "placer", codec: str = "utf-8", segment_end: str = "\r") -> bytes:
    """One ORU^R01 message with an OBR per order (its id in OBR-2 or OBR-3) and an OBX per
    result; an inline PDF as an ``ED`` OBX (``^AP^PDF^Base64^…``)."""
    segments = [SEP.join(["MSH", "^~\\&", sending_app, sending_facility, "labsync", "site",
                          dtm(sent_at), "", "ORU^R01^ORU_R01", control_id, "P", "2.5.1",
                          "", "", "", "", "", charset]),
                "PID|1||PAT-1^^^LAB^MR||Doe^Jane"]
    for n, order in enumerate(orders, start=1):
        placer, filler = (order.external_id, "") if order_id == "placer" \
            else ("", order.external_id)
        segments.append(f"ORC|RE|{escape(placer)}|{escape(filler)}")
        obr = ["OBR", str(n), escape(placer), escape(filler), "PANEL^Panel^L"] + [""] * 21
        obr[25] = _OBR25[order.status]
        segments.append(SEP.join(obr))
        segments += [obx(i, r, order.status) for i, r in enumerate(order.results, start=1)]
        if order.pdf is not None and order.pdf.kind is PdfKind.INLINE:
            data = base64.b64encode(order.pdf.data or b"").decode("ascii")
            segments.append(f"OBX|{len(order.results) + 1}|ED|PDF^Report^L||"
                            f"^AP^PDF^Base64^{data}||||||F")
    return (segment_end.join(segments) + segment_end).encode(codec)


def obx(n: int, result: TestResult, status: OrderStatus) -> str:
    ident = escape(result.code) + ("^" + escape(result.name) if result.name else "")
    if result.ref_min is not None and result.ref_max is not None:
        ref = f"{escape(result.ref_min)}-{escape(result.ref_max)}"
    else:
        ref = escape(result.ref_min or result.ref_max)
    final = "F" if status is OrderStatus.COMPLETED else "P"
    return SEP.join(["OBX", str(n), "ST", ident, "", escape(result.value), escape(result.unit),
                     ref, "H" if result.abnormal else "", "", "", final, "", "",
                     dtm(result.result_date)])


def drop(folder: Path, name: str, data: bytes) -> Path:
    """``data`` into ``folder/name`` as a LIS should write it: a hidden file, then a rename."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    final = folder / name
    os.replace(tmp, final)
    return final


def frame(message: bytes) -> bytes:
    return VT + message + FS + CR


class MllpSender:
    """One MLLP connection: ``send`` a message, get its ACK (read to ``<FS><CR>``)."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""

    def send(self, message: bytes) -> bytes:
        self.sock.sendall(frame(message))
        return self.read_ack()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_ack(self) -> bytes:
        """The next ACK's payload; ``ConnectionError`` if the server closed first."""
        while FS + CR not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection before an ACK")
            self._buffer += chunk
        ack, _, self._buffer = self._buffer.partition(FS + CR)
        return ack[ack.find(VT) + 1:]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MllpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_all(host: str, port: int, messages: Iterable[bytes]) -> list[bytes]:
    """Send ``messages`` over one connection, one after the other; their ACKs."""
    with MllpSender(host, port) as sender:
        return [sender.send(m) for m in messages]
