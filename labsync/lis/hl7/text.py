"""HL7 v2 text: the character sets of MSH-18 (table 0211) and the escape sequences.

python-hl7 is not used for either, on purpose:

- ``hl7.parse`` decodes a whole message with one encoding chosen before it is read; the
  charset is in MSH-18 of the message itself, so labsync reads the MSH segment first and
  decodes each message with its own charset (``codec_for``).
- ``hl7.Message.unescape`` turns ``\\.br\\`` into ``\\r`` (labsync wants a line break,
  ``\\n``), ``\\H\\``/``\\N\\`` into ``_``, reads ``\\Xhh\\`` one byte per character (so a
  UTF-8 ``\\XD0B0\\`` becomes two Latin-1 characters instead of ``а``), and drops whatever
  follows an escape character that is never closed (python-hl7 issue #84). ``unescape``
  below keeps such text literally instead.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from labsync.errors import BadLisData

# HL7 table 0211 and the few names real senders use for the same sets. Values are Python
# codec names; None means "the configured default" (the standard's ASCII is in practice
# whatever the LIS's platform writes, which is why labsync.hl7.encoding exists).
_TABLE_0211: dict[str, str | None] = {
    "": None,
    "ASCII": None,
    "ISO IR6": None,
    "8859": "iso8859-1",
    **{f"8859/{n}": f"iso8859-{n}" for n in range(1, 10)},
    "8859/15": "iso8859-15",
    "ISO IR100": "iso8859-1",
    "ISO IR101": "iso8859-2",
    "ISO IR144": "iso8859-5",
    "ISO IR126": "iso8859-7",
    "ISO IR127": "iso8859-6",
    "ISO IR138": "iso8859-8",
    "ISO IR148": "iso8859-9",
    "ISO IR192": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "KOI8-R": "koi8-r",
    **{f"CP125{n}": f"cp125{n}" for n in range(9)},
    **{f"WINDOWS-125{n}": f"cp125{n}" for n in range(9)},
}
# Sets whose bytes are not ASCII where the separators are: a message in one of them cannot be
# split by its "|" and "^" bytes, so it is refused by name rather than misread.
_NOT_ASCII_BASED = ("UNICODE", "UNICODE UTF-16", "UNICODE UTF-32", "ISO IR14", "ISO IR87",
                    "ISO IR159", "CNS 11643-1992")


class CharsetError(BadLisData):
    """MSH-18 names a character set labsync does not know, or the bytes are not in it."""


def codec_for(msh18: str, default: str) -> str:
    """The Python codec for MSH-18's first repetition; ``default`` when it is empty or ASCII.

    An unknown name is an error, never a guess.
    """
    name = " ".join(msh18.split()).upper()
    if name in _TABLE_0211:
        return _TABLE_0211[name] or default
    if name in _NOT_ASCII_BASED:
        raise CharsetError(f"MSH-18 {msh18!r}: a character set labsync cannot read "
                           "(only ASCII-based sets: 8859/x, UNICODE UTF-8, cp1251, ...)")
    raise CharsetError(f"MSH-18 {msh18!r} is not a character set of HL7 table 0211")


def valid_codec(name: str) -> str:
    """``name`` as Python's codec name; ``LookupError`` if Python has no such codec."""
    return codecs.lookup(name).name


@dataclass(frozen=True, slots=True)
class Delimiters:
    """A message's separators, from MSH-1 and MSH-2 (``|^~\\&`` unless it says otherwise)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""  # HL7 2.7's fifth encoding character, rare

    @classmethod
    def from_msh(cls, field: str, encoding_chars: str) -> Delimiters:
        chars = encoding_chars + "\0" * (5 - len(encoding_chars))
        pick = [c if c not in ("\0", field) else "" for c in chars[:5]]
        return cls(field, pick[0] or "^", pick[1] or "~", pick[2], pick[3] or "&", pick[4])

    def clash(self) -> str | None:
        """Why these separators cannot split a message (two the same, a letter, a digit or
        white space among them), or None."""
        chars = [c for c in (self.field, self.component, self.repetition, self.escape,
                             self.subcomponent, self.truncation) if c]
        odd = [c for c in chars if c.isalnum() or c.isspace() or not c.isprintable()]
        if odd:
            return f"MSH-2: {odd[0]!r} cannot be a separator"
        if len(set(chars)) < len(chars):
            return f"MSH-1/MSH-2: a separator is used twice ({''.join(chars)!r})"
        return None

    def escaped(self, text: str) -> str:
        """``text`` with the delimiters escaped, for a field labsync writes (an ACK's reason)."""
        if not self.escape:
            return text
        esc = self.escape
        out = text.replace(esc, f"{esc}E{esc}")
        for char, code in ((self.field, "F"), (self.component, "S"),
                           (self.repetition, "R"), (self.subcomponent, "T")):
            out = out.replace(char, f"{esc}{code}{esc}")
        return out.replace("\r", f"{esc}.br{esc}").replace("\n", f"{esc}.br{esc}")


_FORMAT = re.compile(r"^\.(br|sp|in|ti|sk|ce|fi|nf)([+-]?\d*)$")
_HEX = re.compile(r"^[0-9A-Fa-f]+$")


def unescape(text: str, delims: Delimiters, codec: str) -> str:
    """An HL7 value as the sender meant it: every escape sequence replaced.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` are the delimiters; ``\\.br\\`` (and ``\\.sp\\``,
    ``\\.ce\\``) a line break, ``\\.skN\\`` N spaces, the other formatting commands nothing;
    ``\\H\\``/``\\N\\`` (highlighting), ``\\Z..\\`` (local) and ``\\C..\\``/``\\M..\\``
    (switching character sets, which labsync does not do) are removed; ``\\Xhh..\\`` are
    bytes, read in ``codec`` (consecutive ones together, so a character split over two
    escapes survives). A sequence labsync does not recognise, and an escape character that
    is never closed, stay as written: no text is lost.
    """
    esc = delims.escape
    if not esc or esc not in text:
        return text
    out: list[str] = []
    pending = bytearray()  # bytes of \X..\ sequences not yet decoded

    def flush() -> None:
        if pending:
            out.append(pending.decode(codec, errors="replace"))
            pending.clear()

    i, n = 0, len(text)
    while i < n:
        start = text.find(esc, i)
        if start < 0:
            flush()
            out.append(text[i:])
            break
        if start > i:
            flush()
            out.append(text[i:start])
        end = text.find(esc, start + 1)
        if end < 0:  # never closed: literal
            flush()
            out.append(text[start:])
            break
        seq = text[start + 1:end]
        if seq[:1] == "X" and len(seq) > 1 and len(seq) % 2 == 1 and _HEX.match(seq[1:]):
            pending += bytes.fromhex(seq[1:])
        else:
            flush()
            replaced = _sequence(seq, delims)
            out.append(text[start:end + 1] if replaced is None else replaced)
        i = end + 1
    flush()
    return "".join(out)


def _sequence(seq: str, d: Delimiters) -> str | None:
    """What one escape sequence (without its escape characters) stands for; None: unknown."""
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition,
              "E": d.escape, "P": d.truncation, "H": "", "N": ""}
    if seq in simple:
        return simple[seq]
    if seq[:1] in ("Z", "C", "M") and len(seq) > 1:
        return ""
    match = _FORMAT.match(seq)
    if match is None:
        return None
    command, count_text = match.groups()
    count = abs(int(count_text)) if count_text.lstrip("+-") else 1
    if command in ("br", "ce"):
        return "\n"
    if command == "sp":
        return "\n" * max(count, 1)
    if command == "sk":
        return " " * count
    return ""  # .in .ti .fi .nf: layout only
