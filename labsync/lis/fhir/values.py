"""An Observation's ``value[x]`` and ``referenceRange`` as the text the site stores.

Numbers keep their literal (``5.40`` stays ``5.40``); a Quantity's ``comparator`` goes in
front (``<5``); a Range is ``low-high``, a Ratio ``numerator:denominator`` (a titre,
``1:128``). The types a lab result never takes (``valueSampledData``, ``valueAttachment``)
are refused, by name, rather than shown as something they are not.
"""

from __future__ import annotations

from typing import Any

from labsync.errors import BadLisData
from labsync.lis.fhir.elements import (
    array,
    boolean,
    concept_text,
    date_time,
    number,
    obj,
    optional_obj,
    quantity,
    string,
)

_VALUE_KEYS = ("valueQuantity", "valueString", "valueCodeableConcept", "valueInteger",
               "valueBoolean", "valueRange", "valueRatio", "valueDateTime", "valueTime",
               "valuePeriod")
_REFUSED = ("valueSampledData", "valueAttachment", "valueReference")


def has_value(item: dict[str, Any]) -> bool:
    """Whether the Observation (or component) carries a ``value[x]`` at all."""
    return any(key.startswith("value") and item[key] is not None for key in item)


def observation_value(item: dict[str, Any], where: str) -> tuple[str | None, str | None] | None:
    """(value, unit) of an Observation or component; None when it has no ``value[x]``."""
    given = [key for key in item if key.startswith("value") and item[key] is not None]
    if not given:
        return None
    if len(given) > 1:
        raise BadLisData(f"{where}: has more than one value ({', '.join(sorted(given))})")
    key = given[0]
    value = item[key]
    place = f"{where}.{key}"
    if key in _REFUSED:
        raise BadLisData(f"{place}: labsync cannot show this kind of value as a result")
    if key not in _VALUE_KEYS:
        raise BadLisData(f"{place}: not a value type of FHIR R4")
    if key == "valueQuantity":
        return quantity(value, place)
    if key == "valueCodeableConcept":
        return concept_text(obj(value, place), place), None
    if key == "valueInteger":
        return number(value, place), None
    if key == "valueBoolean":
        flag = boolean(value, place)
        return ("true" if flag else "false"), None
    if key == "valueRange":
        return _range(obj(value, place), place)
    if key == "valueRatio":
        return _ratio(obj(value, place), place)
    if key == "valuePeriod":
        period = obj(value, place)
        start = string(period.get("start"), f"{place}.start") or ""
        end = string(period.get("end"), f"{place}.end") or ""
        date_time(start, f"{place}.start")  # checked, shown as sent
        date_time(end, f"{place}.end")
        return f"{start} - {end}".strip(" -") or None, None
    return string(value, place), None  # valueString, valueDateTime, valueTime: as sent


def _range(value: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    low, low_unit = _simple(value.get("low"), f"{where}.low")
    high, high_unit = _simple(value.get("high"), f"{where}.high")
    unit = low_unit or high_unit
    if low is not None and high is not None:
        return f"{low}-{high}", unit
    if low is not None:
        return f">={low}", unit
    if high is not None:
        return f"<={high}", unit
    return None, unit


def _ratio(value: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    top, top_unit = _simple(value.get("numerator"), f"{where}.numerator")
    bottom, bottom_unit = _simple(value.get("denominator"), f"{where}.denominator")
    if top is None or bottom is None:
        return None, None
    unit = f"{top_unit}/{bottom_unit}" if top_unit and bottom_unit else top_unit or bottom_unit
    return f"{top}:{bottom}", unit


def _simple(value: Any, where: str) -> tuple[str | None, str | None]:
    """A SimpleQuantity (no comparator), or absent."""
    if value is None:
        return None, None
    return quantity(value, where)


def reference_range(item: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """(REFERENCE_MIN, REFERENCE_MAX) from ``referenceRange[0]``: its low and high values,
    or, with neither, its ``text`` whole in the first (as for HL7's OBX-7)."""
    ranges = array(item.get("referenceRange"), f"{where}.referenceRange")
    if not ranges:
        return None, None
    place = f"{where}.referenceRange[0]"
    first = obj(ranges[0], place)
    low = optional_obj(first.get("low"), f"{place}.low")
    high = optional_obj(first.get("high"), f"{place}.high")
    low_value = number(low.get("value"), f"{place}.low.value") if low else None
    high_value = number(high.get("value"), f"{place}.high.value") if high else None
    if low_value is None and high_value is None:
        return string(first.get("text"), f"{place}.text") or None, None
    return low_value, high_value
