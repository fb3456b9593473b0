"""Small, valid PDF files for tests and benchmarks, built without any PDF library."""

from __future__ import annotations

_HEADER = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"  # the binary comment tells tools the file is binary
_FILLER_LINE = b"labsync sample pdf filler 0123456789 abcdefghijklmnopqrstuvwxyz\n"


def sample_pdf(text: str = "Lab results", size: int | None = None) -> bytes:
    """A one-page PDF 1.4 showing ``text`` (one line per ``\\n``) in Helvetica.

    With ``size``, an unreferenced filler stream pads the file to exactly ``size`` bytes
    (or leaves it as is when the plain file is already that big), for download benchmarks.
    Helvetica's standard encoding has no Cyrillic: characters outside Windows-1252 become ``?``.
    """
    plain = _build(text, filler=0)
    if size is None or size <= len(plain):
        return plain
    # The filler's own wrapper and the digits of offsets shift the total a little; a few
    # rounds of correction land on the exact size.
    filler = max(0, size - len(plain) - 64)
    pdf = _build(text, filler)
    for _ in range(8):
        if len(pdf) == size:
            break
        filler = max(0, filler + size - len(pdf))
        pdf = _build(text, filler)
    return pdf


def _escape(line: str) -> bytes:
    """``line`` as the body of a PDF literal string."""
    raw = line.encode("cp1252", errors="replace")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _stream(data: bytes) -> bytes:
    return b"<< /Length %d >>\nstream\n%s\nendstream" % (len(data), data)


def _build(text: str, filler: int) -> bytes:
    """The PDF bytes, with ``filler`` bytes of padding stream content (0 = no padding object)."""
    shown = b" Tj T* ".join(b"(" + _escape(line) + b")" for line in text.split("\n"))
    content = b"BT /F1 14 Tf 18 TL 72 770 Td " + shown + b" Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842]"
        b" /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        _stream(content),
    ]
    if filler > 0:
        reps, rest = divmod(filler, len(_FILLER_LINE))
        objects.append(_stream(_FILLER_LINE * reps + _FILLER_LINE[:rest]))

    out = bytearray(_HEADER)
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref_at
    return bytes(out)
