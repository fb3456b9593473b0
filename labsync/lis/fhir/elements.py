"""FHIR R4 data types as labsync needs them: strings, decimals as their literal text,
codings, quantities, dates.

Every reader takes the JSON value (decoded with numbers as ``JsonNumber``, so ``5.40`` is
still ``"5.40"``) and ``where`` it sits, for the message of the ``BadLisData`` it raises
when the value is not what FHIR says it is. Nothing here knows a resource.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from labsync.errors import BadLisData
from labsync.lis.body import json_kind as kind
from labsync.lis.http import JsonNumber, excerpt

# A FHIR dateTime: a year, a year-month, a date, or a date and time (with an offset, FHIR
# says; without one labsync reads it as site time, as for QLAB).
_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?$")
_COMPARATORS = ("<", "<=", ">=", ">")


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadLisData(f"{where}: expected a JSON object, got {kind(value)}")
    return value


def optional_obj(value: Any, where: str) -> dict[str, Any] | None:
    return None if value is None else obj(value, where)


def array(value: Any, where: str) -> list[Any]:
    """A JSON array; absent is empty. (FHIR never sends an empty array, but some servers do.)"""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadLisData(f"{where}: expected a JSON array, got {kind(value)}")
    return value


def clean(value: str, where: str) -> str:
    """``value`` as a plain ``str``, refusing what MySQL or a browser should never get."""
    if "\x00" in value:
        raise BadLisData(f"{where}: contains a NUL character")
    if not value.isascii():  # only non-ASCII text can hold a lone surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadLisData(f"{where}: not valid Unicode text") from None
    return str(value)  # a JsonNumber becomes a plain str: the model holds text


def string(value: Any, where: str) -> str | None:
    """A JSON string (FHIR string, code, uri, …) or absent."""
    if value is None:
        return None
    if not isinstance(value, str) or isinstance(value, JsonNumber):
        raise BadLisData(f"{where}: must be a string")
    return clean(value, where)


def number(value: Any, where: str) -> str | None:
    """A FHIR decimal or integer as the literal text the LIS sent (``5.40``, ``1e308``)."""
    if value is None:
        return None
    if not isinstance(value, JsonNumber):
        raise BadLisData(f"{where}: must be a JSON number, got {kind(value)}")
    return str(value)


def boolean(value: Any, where: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise BadLisData(f"{where}: must be true or false")
    return value


def codings(concept: dict[str, Any] | None, where: str) -> list[dict[str, Any]]:
    """The codings of a CodeableConcept, each checked to be an object."""
    if concept is None:
        return []
    return [obj(c, f"{where}.coding[{i}]")
            for i, c in enumerate(array(concept.get("coding"), f"{where}.coding"))]


def chosen_coding(concept: dict[str, Any] | None, where: str,
                  systems: Sequence[str]) -> dict[str, Any] | None:
    """The coding of the first system in ``systems`` that the concept has a code in, else
    its first coding with a code; None without any."""
    coded = [c for c in codings(concept, where) if c.get("code") is not None]
    for system in systems:
        for coding in coded:
            if coding.get("system") == system:
                return coding
    return coded[0] if coded else None


def concept_text(concept: dict[str, Any] | None, where: str) -> str | None:
    """A CodeableConcept as words: its ``text``, else the first coding's display, else
    the first coding's code."""
    if concept is None:
        return None
    text = string(concept.get("text"), f"{where}.text")
    if text:
        return text
    found = codings(concept, where)
    for key in ("display", "code"):
        for i, coding in enumerate(found):
            value = string(coding.get(key), f"{where}.coding[{i}].{key}")
            if value:
                return value
    return None


def quantity(value: Any, where: str) -> tuple[str | None, str | None]:
    """A Quantity as (its value with the comparator in front, ``<5``; its unit, else its
    UCUM code)."""
    q = obj(value, where)
    amount = number(q.get("value"), f"{where}.value")
    comparator = string(q.get("comparator"), f"{where}.comparator")
    if comparator is not None and comparator not in _COMPARATORS:
        raise BadLisData(f"{where}.comparator: {excerpt(repr(comparator))} is not one of "
                         f"{', '.join(_COMPARATORS)}")
    unit = string(q.get("unit"), f"{where}.unit") or string(q.get("code"), f"{where}.code")
    if amount is None:
        return None, unit
    return (comparator or "") + amount, unit


def date_time(value: Any, where: str) -> datetime | None:
    """A FHIR dateTime or instant: aware when it has an offset (``Z`` too), naive when it
    has none; a date, a year-month or a year alone is midnight of its first day, naive
    (site time)."""
    if value is None or value == "":
        return None
    text = string(value, where) or ""
    partial = _PARTIAL_DATE.match(text)
    try:
        if partial:
            moment = datetime(int(partial.group(1)), int(partial.group(2) or 1), 1)
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadLisData(f"{where}: {excerpt(repr(text))} is not a FHIR dateTime") from None
    # The site's DATETIME holds years 1000-9999; a time-zone shift at the edges would overflow.
    if not 1000 <= moment.year <= 9998:
        raise BadLisData(f"{where}: {excerpt(repr(text))} is out of range (years 1000-9998)")
    return moment


def instant(value: Any, where: str) -> datetime | None:
    """A FHIR instant (``meta.lastUpdated``): a date-time that must carry its offset."""
    moment = date_time(value, where)
    if moment is not None and moment.utcoffset() is None:
        raise BadLisData(f"{where}: {excerpt(repr(value))} has no time-zone offset")
    return moment
