"""Reading HL7 v2 messages: split a file or frame into messages, read the MSH header, decode
each message in its own charset, and give its segments' fields.

Real messages are untidy, and these are the decisions (issue 14):

- Segments end in CR, LF or CRLF, mixed within one message; blank lines are dropped. A
  line that does not start like a segment (three letters or digits, then the field
  separator) continues the segment before it, joined by a line break: such a line is
  text with a raw newline in it, and splitting it off would lose it.
- A file can hold several messages, each starting at an ``MSH`` segment; batch and file
  envelopes (``FHS BHS BTS FTS``), MLLP framing bytes and a UTF-8 byte-order mark around
  them are dropped.
- MSH-18 chooses the charset (``text.codec_for``), the configured ``encoding`` when it
  is empty or ASCII. A byte sequence that is not valid in that charset is an error.

Segments are split at ``\\r`` (``split_messages`` leaves nothing else between them) and
fields at MSH-1; repetitions, components and sub-components are split only when asked
(``Field``). python-hl7's ``hl7.parse`` did this first: it builds the whole tree of every
field at once, which was 70 % of the CPU of reading a message (0.39 of 0.55 ms), and nests a
field without separators one level less deep than one with them. The tests check this split
against ``hl7.parse`` on every real message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256

from labsync.errors import BadLisData
from labsync.lis.hl7.text import CharsetError, Delimiters, codec_for, unescape

BOM = b"\xef\xbb\xbf"
_LINES = re.compile(rb"\r\n|\r|\n")
_SEGMENT_START = re.compile(rb"^[A-Z][A-Z0-9]{2}(?:[^A-Za-z0-9\s]|$)")
_ENVELOPES = (b"FHS", b"BHS", b"BTS", b"FTS")
_FRAMING_BYTES = b"\x0b\x1c"
MAX_ID = 200  # labsync_deliveries.DELIVERY_ID


class MessageProblem(BadLisData):
    """A message labsync refuses, with what its ACK says: ``AE`` (cannot be read) or ``AR``
    (read, but not a message labsync takes), an HL7 error code (table 0357) and where."""

    def __init__(self, message: str, *, ack: str = "AE", code: str = "207",
                 where: str = "", header: Header | None = None) -> None:
        super().__init__(message)
        self.ack, self.code, self.where = ack, code, where
        self.header = header  # MSH as far as it could be read (for the ACK), if at all


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file (or one MLLP frame), each as its segments joined by ``\\r``.

    Text before the first ``MSH`` (a batch header, garbage) is not a message and is dropped;
    an input with no ``MSH`` at all gives one "message" of what it holds, so that its
    problem is reported rather than the input silently vanishing.
    """
    data = data.translate(None, _FRAMING_BYTES)
    messages: list[list[bytes]] = []
    before: list[bytes] = []
    for raw_line in _LINES.split(data):
        line = raw_line[3:] if raw_line.startswith(BOM) else raw_line
        if not line.strip():
            continue
        if line.startswith(b"MSH"):
            messages.append([line])
        elif line[:3] in _ENVELOPES and _SEGMENT_START.match(line):
            continue
        elif not messages:
            before.append(line)
        elif _SEGMENT_START.match(line):
            messages[-1].append(line)
        else:  # raw newline inside a value: part of the segment before
            messages[-1][-1] += b"\n" + line
    if not messages:
        return [b"\r".join(before)] if before else []
    return [b"\r".join(segments) for segments in messages]


@dataclass(frozen=True, slots=True)
class Header:
    """What MSH says, enough to store, order and acknowledge a message before it is read."""

    delims: Delimiters
    codec: str
    sending_app: str  # MSH-3, as written
    sending_facility: str  # MSH-4
    receiving_app: str  # MSH-5
    receiving_facility: str  # MSH-6
    timestamp: str  # MSH-7
    message_type: str  # MSH-9, as written (ORU^R01^ORU_R01)
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12

    @property
    def delivery_id(self) -> str:
        """The stable id of this message: its MSH-10 with the sending application and
        facility, which is what makes a resend the same delivery (``Delivery.id``)."""
        return delivery_id(self.sending_app, self.sending_facility, self.control_id)

    @property
    def kind(self) -> tuple[str, str]:
        """(message code, trigger event): ``("ORU", "R01")``."""
        parts = self.message_type.split(self.delims.component)
        return (parts[0].strip().upper(), parts[1].strip().upper() if len(parts) > 1 else "")


def delivery_id(sending_app: str, sending_facility: str, control_id: str) -> str:
    """``APP^ID|FACILITY|MSH-10``, or MSH-10 alone when the sender names neither; a hash
    stands in for an id longer than the column that records it."""
    sender = f"{sending_app}|{sending_facility}" if (sending_app or sending_facility) else ""
    full = f"{sender}|{control_id}" if sender else control_id
    if len(full) <= MAX_ID:
        return full
    return f"{control_id[:100]}|sha256:{sha256(full.encode('utf-8')).hexdigest()}"


def read_header(message: bytes, default_codec: str) -> Header:
    """MSH of ``message`` (as ``split_messages`` gives it); ``MessageProblem`` if it has none,
    or names a charset labsync cannot read."""
    if not message.startswith(b"MSH") or len(message) < 8:
        raise MessageProblem("not an HL7 message (it does not start with an MSH segment)",
                             code="100", where="MSH^1")
    end = message.find(b"\r")
    msh = message if end < 0 else message[:end]
    field_sep = chr(msh[3]) if len(msh) > 3 else ""
    if not field_sep or field_sep.isalnum() or field_sep.isspace() or not field_sep.isprintable():
        raise MessageProblem("MSH: no field separator after MSH", code="100", where="MSH^1")
    # Latin-1 first: MSH-18 is ASCII in every set labsync reads, the rest is decoded after.
    loose = msh.decode("latin-1").split(field_sep)
    if len(loose) < 3:  # python-hl7 would look for the end of MSH-2 in the next segments
        raise MessageProblem("MSH: MSH-2 is not followed by a field separator", code="100",
                             where="MSH^1^2")
    delims = Delimiters.from_msh(field_sep, loose[1] if len(loose) > 1 else "")
    if (clash := delims.clash()) is not None:
        raise MessageProblem(clash, code="102", where="MSH^1^2")
    charset = _field(loose, 18).split(delims.repetition)[0] if delims.repetition else _field(
        loose, 18)
    loose_header = Header(delims, "latin-1", *(_field(loose, n) for n in _HEADER_FIELDS))
    try:
        codec = codec_for(charset, default_codec)
        fields = msh.decode(codec).split(field_sep)
    except CharsetError as exc:
        raise MessageProblem(str(exc), code="103", where="MSH^1^18",
                             header=loose_header) from None
    except UnicodeDecodeError:
        raise MessageProblem(f"MSH: bytes that are not {charset or default_codec}",
                             code="102", where="MSH^1", header=loose_header) from None
    return Header(delims, codec, *(_field(fields, n) for n in _HEADER_FIELDS))


_HEADER_FIELDS = (3, 4, 5, 6, 7, 9, 10, 11, 12)


def _field(fields: list[str], number: int) -> str:
    """MSH-``number`` from MSH split at its field separator (MSH-1 is the separator itself,
    so MSH-n is at index n-1)."""
    return fields[number - 1].strip() if len(fields) >= number else ""


class Field:
    """One field's raw text, split on demand: ``field.rep(0).comp(1)`` is the text of the
    first repetition's first component, unescaped (HL7 numbers from 1, repetitions from 0)."""

    __slots__ = ("_codec", "_delims", "raw")

    def __init__(self, raw: str, delims: Delimiters, codec: str) -> None:
        self.raw, self._delims, self._codec = raw, delims, codec

    def __bool__(self) -> bool:
        return bool(self.raw)

    @property
    def text(self) -> str:
        """The whole field, unescaped (separators inside it stay as written)."""
        return unescape(self.raw, self._delims, self._codec)

    def reps(self) -> list[Field]:
        sep = self._delims.repetition
        parts = self.raw.split(sep) if sep and sep in self.raw else [self.raw]
        return [Field(p, self._delims, self._codec) for p in parts]

    def rep(self, index: int) -> Field:
        reps = self.reps()
        return reps[index] if index < len(reps) else Field("", self._delims, self._codec)

    def comps(self) -> list[str]:
        """Every component, unescaped (the first repetition's, if it repeats)."""
        first = self.rep(0).raw if self._delims.repetition in self.raw else self.raw
        return [unescape(c, self._delims, self._codec)
                for c in first.split(self._delims.component)]

    def comp(self, number: int) -> str:
        """Component ``number`` (from 1), its sub-components as written, unescaped."""
        comps = self.comps()
        return comps[number - 1] if number <= len(comps) else ""

    def first(self) -> str:
        """The first component's first sub-component: an identifier's value (``X^MOLIS``,
        ``T09-1&OLIS&ISO`` both give their first part)."""
        first = self.comp(1)
        sub = self._delims.subcomponent
        return (first.split(sub)[0] if sub else first).strip()


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    fields: tuple[str, ...]  # raw; index n is field n (MSH: n is MSH-n as well)
    delims: Delimiters
    codec: str
    number: int  # its position in the message, from 1, for error messages
    occurrence: int = 1  # the how-manieth segment of its name: ERR-2's segment sequence

    def where(self, field: int | None = None) -> str:
        """Its location as ``ERR-2`` writes it: ``OBX^3^5`` (third OBX, field 5)."""
        return f"{self.name}^{self.occurrence}" + (f"^{field}" if field is not None else "")

    def __getitem__(self, number: int) -> Field:
        raw = self.fields[number] if number < len(self.fields) else ""
        return Field(raw, self.delims, self.codec)


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    segments: tuple[Segment, ...]

    def named(self, name: str) -> Iterator[Segment]:
        return (s for s in self.segments if s.name == name)


def parse_message(message: bytes, default_codec: str, *, header: Header | None = None
                  ) -> Message:
    """The whole message, decoded in its charset and split into segments and fields;
    ``MessageProblem`` for anything that keeps it from being read. ``header``: its MSH,
    when the caller has read it already."""
    header = header or read_header(message, default_codec)
    try:
        text = message.decode(header.codec)
    except UnicodeDecodeError as exc:
        raise MessageProblem(f"byte {exc.start}: not valid {header.codec} (MSH-18 says the "
                             "message's character set)", code="102", where="MSH^1^18") from None
    field_sep = header.delims.field
    segments = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.split("\r"), start=1):
        fields = line.split(field_sep)
        if number == 1:  # MSH-1 is the separator itself: MSH-n stays at index n
            fields.insert(1, field_sep)
        name = fields[0].strip()
        seen[name] = seen.get(name, 0) + 1
        segments.append(Segment(name, tuple(fields), header.delims, header.codec, number,
                                seen[name]))
    return Message(header, tuple(segments))
