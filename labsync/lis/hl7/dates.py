"""HL7 v2 dates and times (DTM, and the TS of older versions): ``YYYY[MM[DD[HH[MM[SS[.S…]]]]]]
[+/-ZZZZ]``.

An offset gives an aware time; without one the time is naive, and ``with_offset_of`` gives
it another time's offset (OBX-14 without an offset takes MSH-7's, issue 14).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone, tzinfo

_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?"
                  r"([+-])?(\d{4})?$")


class BadDate(ValueError):
    """Not an HL7 date/time."""


def parse_dtm(text: str) -> datetime | None:
    """``text`` (a DTM, or a TS whose first component it is) as a datetime; None when empty.

    Missing parts are their lowest value (``20240514`` is midnight). ``BadDate`` for text
    that is not one, or a date that does not exist.
    """
    text = text.strip()
    if not text:
        return None
    match = _DTM.match(text)
    if match is None or (match.group(8) is None) != (match.group(9) is None):
        raise BadDate(f"{text!r} is not an HL7 date/time (YYYYMMDDHHMMSS[+ZZZZ])")
    year, month, day, hour, minute, second, fraction, sign, offset = match.groups()
    try:
        zone: tzinfo | None = None
        if offset is not None:
            minutes = int(offset[:2]) * 60 + int(offset[2:])
            if int(offset[2:]) > 59 or minutes >= 24 * 60:
                raise BadDate(f"{text!r}: the offset {sign}{offset} is not a time-zone offset")
            zone = timezone(timedelta(minutes=-minutes if sign == "-" else minutes))
        return datetime(int(year), int(month or 1), int(day or 1), int(hour or 0),
                        int(minute or 0), int(second or 0),
                        int((fraction or "0").ljust(6, "0")), tzinfo=zone)
    except ValueError as exc:
        if isinstance(exc, BadDate):
            raise
        raise BadDate(f"{text!r} is not a date/time that exists ({exc})") from None


def with_offset_of(moment: datetime | None, reference: datetime | None) -> datetime | None:
    """``moment`` as it is if it has an offset; else with ``reference``'s offset, if that one
    was written with one; else naive (site time)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    if reference is None or reference.tzinfo is None:
        return moment
    offset = reference.utcoffset()
    return moment.replace(tzinfo=timezone(offset)) if offset is not None else moment


def aware(moment: datetime, zone: tzinfo) -> datetime:
    """``moment`` with an offset: its own, or ``zone``'s (the site's) when it has none."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
