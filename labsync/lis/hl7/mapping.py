"""An ORU^R01 message as labsync orders: one ``LisOrder`` per OBR (OBRs with the same order
id in one message are one order), its OBX rows as ``TestResult``s, an ``ED`` PDF as the
order's inline PDF. Pure: no I/O, no clock; ``docs/hl7.md`` has the table.

- ``EXTERNAL_ORDER_ID``: OBR-2 (``placer``) or OBR-3 (``filler``), else the governing
  ORC-2/ORC-3; the first component of an identifier with components.
- Status: OBR-25 ``F``/``C`` completed, ``P A R I`` processing, ``O S`` received (processing
  once it has results), ``X`` cancelled; empty: the OBX-11s decide. A final OBR with an OBX
  row that is not final yet (``P S``, or ``I R`` hidden) is processing: a patient is never
  told "ready" about preliminary values.
- OBX-11 ``I R`` (not verified) are not shown, ``N D X W O`` drop the row.
- Rows with the same OBX-3 and OBX-4 are one result, values joined by line breaks (FT
  continuation); the row's code carries the sub-id (``GLU.1``) when OBX-4 has one.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from labsync.lis.hl7.dates import BadDate, aware, parse_dtm, with_offset_of
from labsync.lis.hl7.parse import Field, Message, MessageProblem, Segment
from labsync.model import LisOrder, OrderStatus, PdfRef, TestResult

ABNORMAL_FLAGS = frozenset({"H", "HH", "L", "LL", "A", "AA", ">", "<"})
_DROPPED = frozenset({"N", "D", "X", "W", "O"})  # OBX-11: no result to show, ever
_HIDDEN = frozenset({"I", "R"})  # OBX-11: not verified yet; not shown, order not final
_NOT_FINAL = frozenset({"P", "S"}) | _HIDDEN
_OBR_STATUS = {"F": OrderStatus.COMPLETED, "C": OrderStatus.COMPLETED,
               "P": OrderStatus.PROCESSING, "A": OrderStatus.PROCESSING,
               "R": OrderStatus.PROCESSING, "I": OrderStatus.PROCESSING,
               "O": OrderStatus.RECEIVED, "S": OrderStatus.RECEIVED,
               "X": OrderStatus.CANCELLED}
_CODED = frozenset({"CE", "CWE", "CNE", "CF"})
_RANGE = re.compile(r"^\s*(\d+(?:[.,]\d+)?)\s*-\s*(\d+(?:[.,]\d+)?)\s*$")
_PDF_B64_HEAD = "JVBER"  # base64 of "%PDF"
_ENCODINGS = {"BASE64": "base64", "B64": "base64", "HEX": "hex", "A": "text"}


@dataclass(frozen=True, slots=True)
class Mapped:
    """A message's orders, and what was left out of them on the way, for the log."""

    orders: tuple[LisOrder, ...]
    notes: tuple[str, ...] = ()


@dataclass
class _Row:
    code: str | None
    name: str | None
    values: list[str] = field(default_factory=list)
    unit: str | None = None
    ref_min: str | None = None
    ref_max: str | None = None
    abnormal: bool = False
    result_date: datetime | None = None


@dataclass
class _Order:
    external_id: str
    rows: dict[tuple[str | None, str | None, str], _Row] = field(default_factory=dict)
    pdf: bytes | None = None
    # the OBR group being read: its rows' statuses, whether it had any OBX, its ED pieces
    row_statuses: list[OrderStatus] = field(default_factory=list)
    had_obx: bool = False
    pdf_parts: dict[tuple[str, str], list[Field]] = field(default_factory=dict)
    obr_statuses: list[OrderStatus] = field(default_factory=list)  # one per OBR of the order


def map_oru(message: Message, *, order_id: str, zone: tzinfo) -> Mapped:
    """The orders of an ORU^R01 message. ``order_id``: ``placer`` or ``filler``; ``zone``: the
    site's time zone, for an MSH-7 without an offset. ``MessageProblem`` for a message that is
    not an ORU^R01 (``AR``) or cannot be read as one (``AE``)."""
    header = message.header
    code, event = header.kind
    if (code, event) != ("ORU", "R01"):
        raise MessageProblem(f"not an ORU^R01 message ({header.message_type or 'MSH-9 empty'}"
                             "): labsync takes lab results only", ack="AR",
                             code="200" if code != "ORU" else "201", where="MSH^1^9")
    if not header.control_id:
        raise MessageProblem("MSH-10 (message control id) is empty", code="101",
                             where="MSH^1^10")
    try:
        sent_at = parse_dtm(header.timestamp.split(header.delims.component)[0])
    except BadDate as exc:
        raise MessageProblem(f"MSH-7: {exc}", code="102", where="MSH^1^7") from None
    if sent_at is None:
        raise MessageProblem("MSH-7 (date/time of message) is empty", code="101",
                             where="MSH^1^7")
    notes: list[str] = []
    orders: dict[str, _Order] = {}
    orc: Segment | None = None
    current: tuple[_Order, Segment, datetime | None] | None = None
    for seg in message.segments:
        if seg.name == "ORC":
            orc = seg
        elif seg.name == "OBR":
            if current is not None:
                _close_obr(*current[:2], notes)
            external_id = _order_id(seg, orc, order_id)
            order = orders.setdefault(external_id, _Order(external_id))
            current = (order, seg, _obr_date(seg, sent_at))
        elif seg.name == "OBX":
            if current is None:
                raise MessageProblem(f"OBX at segment {seg.number} comes before any OBR",
                                     code="100", where=seg.where())
            _obx(current[0], seg, current[2], sent_at, notes)
    if current is not None:
        _close_obr(*current[:2], notes)
    if not orders:
        raise MessageProblem("the message has no OBR segment: no order to apply", code="100",
                             where="OBR^1")
    changed_at = aware(sent_at, zone)
    return Mapped(tuple(_lis_order(o, changed_at, header.control_id) for o in orders.values()),
                  tuple(notes))


def order_ids(message: Message, order_id: str) -> list[str]:
    """The order ids a message's OBRs name (``labsync order ID``), without reading the rest."""
    found, orc = [], None
    for seg in message.segments:
        if seg.name == "ORC":
            orc = seg
        elif seg.name == "OBR":
            try:
                found.append(_order_id(seg, orc, order_id))
            except MessageProblem:
                continue
    return list(dict.fromkeys(found))


def _order_id(obr: Segment, orc: Segment | None, which: str) -> str:
    number = 2 if which == "placer" else 3
    value = obr[number].first() or (orc[number].first() if orc is not None else "")
    if not value:
        label = "placer order number" if which == "placer" else "filler order number"
        raise MessageProblem(
            f"OBR at segment {obr.number}: OBR-{number} ({label}) is empty, and so is "
            f"ORC-{number}; lis.hl7.order_id = \"{which}\" needs it", code="101",
            where=obr.where(number))
    return value


def _obr_date(obr: Segment, sent_at: datetime) -> datetime | None:
    """OBR-7 (observation), else OBR-22 (results reported): the date of rows without OBX-14."""
    for number in (7, 22):
        try:
            moment = parse_dtm(obr[number].comp(1))
        except BadDate as exc:
            raise MessageProblem(f"OBR at segment {obr.number}: OBR-{number}: {exc}",
                                 code="102", where=obr.where(number)) from None
        if moment is not None:
            return with_offset_of(moment, sent_at)
    return None


def _obx(order: _Order, obx: Segment, obr_date: datetime | None, sent_at: datetime,
         notes: list[str]) -> None:
    where = f"OBX at segment {obx.number}"
    status = obx[11].first().upper()
    order.had_obx = True
    if status in _DROPPED:
        return
    order.row_statuses.append(OrderStatus.PROCESSING if status in _NOT_FINAL
                              else OrderStatus.COMPLETED)
    if status in _HIDDEN:
        return
    value_type = obx[2].first().upper()
    ident = obx[3]
    code = ident.comp(1).strip() or None
    name = (ident.comp(2) or ident.comp(5) or ident.comp(9)).strip() or None
    sub_id = obx[4].first()
    if value_type == "ED" or _looks_like_pdf(value_type, obx[5]):
        order.pdf_parts.setdefault((code or name or "", sub_id), []).append(obx[5])
        return
    if code is None and name is None:
        raise MessageProblem(f"{where}: OBX-3 has neither a code nor a name", code="101",
                             where=obx.where(3))
    key = (code, name, sub_id)
    row = order.rows.get(key)
    if row is None:
        row = order.rows[key] = _Row(f"{code}.{sub_id}" if code and sub_id else code, name)
    value = _value(value_type, obx[5])
    if value is not None:
        row.values.append(value)
    row.unit = row.unit or obx[6].comp(1).strip() or obx[6].comp(2).strip() or None
    if row.ref_min is None and row.ref_max is None:
        row.ref_min, row.ref_max = _range(obx[7].text)
    row.abnormal = row.abnormal or any(
        rep.comp(1).strip().upper() in ABNORMAL_FLAGS for rep in obx[8].reps())
    if row.result_date is None:
        try:
            observed = parse_dtm(obx[14].comp(1))
        except BadDate as exc:
            raise MessageProblem(f"{where}: OBX-14: {exc}", code="102",
                                 where=obx.where(14)) from None
        row.result_date = with_offset_of(observed, sent_at) if observed else obr_date


def _value(value_type: str, obx5: Field) -> str | None:
    """OBX-5 as text: repetitions joined by line breaks; SN as ``<5`` / ``10-20``; coded
    values as their text; everything else exactly as sent, unescaped."""
    parts = []
    for rep in obx5.reps():
        if not rep.raw:
            continue
        if value_type == "SN":
            text = "".join(c.strip() for c in rep.comps()[:4])
        elif value_type in _CODED:
            text = rep.comp(2) or rep.comp(9) or rep.comp(5) or rep.comp(1)
        else:
            text = rep.text
        if text:
            parts.append(text)
    return "\n".join(parts) if parts else None


def _range(text: str) -> tuple[str | None, str | None]:
    """OBX-7 as (min, max): split when it is two plain numbers around a dash, else all of it
    as the minimum (``<10``, ``4.3 to 6.2``, ``-3-3``): labsync never guesses a range."""
    if not text.strip():
        return None, None
    match = _RANGE.match(text)
    if match:
        return match.group(1), match.group(2)
    return text.strip(), None


def _looks_like_pdf(value_type: str, obx5: Field) -> bool:
    """A PDF sent as text (``TX``/``FT``/``ST``) rather than ``ED``: its value is base64 of a
    file that starts with ``%PDF``, a variant some LIS use."""
    return (value_type in ("TX", "FT", "ST") and len(obx5.raw) > 100
            and obx5.raw.lstrip().startswith(_PDF_B64_HEAD))


def _close_obr(order: _Order, obr: Segment, notes: list[str]) -> None:
    """The end of one OBR group: its status, and its PDF from the ED rows."""
    obr25 = obr[25].first().upper()
    rows, had_obx = order.row_statuses, order.had_obx
    order.row_statuses, order.had_obx = [], False
    if obr25 and obr25 not in _OBR_STATUS:
        raise MessageProblem(f"OBR at segment {obr.number}: OBR-25 {obr25!r} is not a result "
                             "status (HL7 table 0123)", code="103",
                             where=obr.where(25))
    status = _OBR_STATUS.get(obr25) if obr25 else None
    not_final = OrderStatus.PROCESSING in rows
    if status is None:  # OBR-25 empty: the rows decide
        if not_final or (had_obx and not rows):
            status = OrderStatus.PROCESSING
        else:
            status = OrderStatus.COMPLETED if rows else OrderStatus.RECEIVED
    elif status is OrderStatus.COMPLETED and not_final:
        status = OrderStatus.PROCESSING
    elif status is OrderStatus.RECEIVED and rows:
        status = OrderStatus.PROCESSING
    order.obr_statuses.append(status)
    for (test, _sub), pieces in order.pdf_parts.items():
        data = _pdf(pieces, notes, f"OBR at segment {obr.number}, ED row {test or '?'}")
        if data is not None and order.pdf is None:
            order.pdf = data
    order.pdf_parts = {}


def _pdf(pieces: list[Field], notes: list[str], where: str) -> bytes | None:
    """The bytes of an ED value (``^AP^PDF^Base64^…`` and its variants: the encoding named in
    any component after the first, the data in the ones after it; repetitions and
    continuation rows joined; line breaks and blanks inside the data ignored). None for an
    ED that is not a PDF. An encoding that does not decode gives empty bytes, which
    ``labsync.pdfs`` refuses like any other invalid PDF (``pdf.required`` decides then)."""
    kind, says_pdf, data = None, False, []
    for piece in pieces:
        for rep in piece.reps():
            comps = rep.comps()
            at = next((i for i, c in enumerate(comps) if i >= 1 and i < len(comps) - 1
                       and c.strip().upper() in _ENCODINGS), None)
            if at is None:
                data.append("".join(comps))
                continue
            kind = kind or _ENCODINGS[comps[at].strip().upper()]
            says_pdf = says_pdf or any("PDF" in c.upper() for c in comps[:at])
            data.append("".join(comps[at + 1:]))
    text = "".join("".join(data).split())
    if kind is None and text.startswith(_PDF_B64_HEAD):
        kind = "base64"
    if kind is None:
        notes.append(f"{where}: an ED value that names no encoding was left out")
        return None
    try:
        if kind == "base64":
            decoded = _b64(text)
        elif kind == "hex":
            decoded = bytes.fromhex(text)
        else:
            decoded = "".join(data).encode("latin-1", errors="replace")
    except (binascii.Error, ValueError):
        notes.append(f"{where}: the embedded PDF's {kind} does not decode: refused")
        return b""
    if not says_pdf and not decoded.startswith(b"%PDF"):
        notes.append(f"{where}: an ED value that is not a PDF was left out")
        return None
    return decoded


def _b64(text: str) -> bytes:
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return base64.b64decode(text, altchars=b"-_", validate=True)


def _lis_order(order: _Order, changed_at: datetime, version: str) -> LisOrder:
    status = _merged(order.obr_statuses)
    results = () if status is OrderStatus.CANCELLED else tuple(
        TestResult(code=row.code, name=row.name,
                   value="\n".join(row.values) if row.values else None, unit=row.unit,
                   ref_min=row.ref_min, ref_max=row.ref_max, abnormal=row.abnormal,
                   result_date=row.result_date)
        for row in order.rows.values())
    pdf = PdfRef.inline(order.pdf) if order.pdf is not None else None
    return LisOrder(order.external_id, status, results, changed_at=changed_at, version=version,
                    pdf=pdf)


def _merged(statuses: list[OrderStatus]) -> OrderStatus:
    """One order from several OBRs: cancelled only if all are; completed only if every one
    that is not cancelled is; received only if none has begun."""
    alive = [s for s in statuses if s is not OrderStatus.CANCELLED]
    if not alive:
        return OrderStatus.CANCELLED
    if all(s is OrderStatus.COMPLETED for s in alive):
        return OrderStatus.COMPLETED
    if all(s is OrderStatus.RECEIVED for s in alive):
        return OrderStatus.RECEIVED
    return OrderStatus.PROCESSING
