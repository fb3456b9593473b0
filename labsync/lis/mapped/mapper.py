"""An LIS answer as plain data (JSON, or a SOAP answer serialised by zeep) → ``labsync.model``.

The ``Spec``'s expressions find each part; this module checks what they find, field by
field, and refuses a whole answer it cannot use (``BadLisData`` naming the order, the key
and its expression) rather than half-use it, as ``lis/qlab.py`` does for QLAB.

Values are text exactly as the LIS wrote them: JSON numbers arrive as their literal
(``JsonNumber``), SOAP numbers too where zeep allows (``soap.py``); a ``Decimal`` keeps its
text (``3.90``), an ``int`` is its digits, a ``float`` (an ``xs:double`` zeep parsed) its
shortest form. SOAP answers also bring datetimes, dates, booleans and bytes where JSON has
text; each is taken where it makes sense (a ``result_date``, an ``abnormal`` flag, a PDF).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from labsync.errors import BadLisData
from labsync.lis.body import JsonNumber
from labsync.lis.classify import excerpt
from labsync.lis.mapped.spec import Expression, Spec
from labsync.model import BY_ORDER, LisOrder, LisOrderRef, OrderStatus, Patient, PdfRef, TestResult

_WITH_RESULTS = (OrderStatus.PROCESSING, OrderStatus.COMPLETED)


@dataclass(frozen=True)
class Answer:
    """What the LIS answered: the body as received (secrets masked), and as plain data."""

    body: bytes
    data: Any
_SHOWN_STATUSES = 12  # how many known status values a message lists


def order_from(external_id: str, answer: Any, spec: Spec) -> LisOrder:
    """The order ``answer`` describes, asked for as ``external_id``; ``BadLisData`` if the
    answer cannot be used."""
    where = f"order {excerpt(external_id)}"
    if spec.order_id is not None:
        sent = spec.order_id.search(answer, where)
        if sent is not None and _scalar(sent, where, spec.order_id) != external_id:
            raise BadLisData(f"{where}: the answer is about another order ({spec.order_id.key}"
                             f" ({spec.order_id.text}) gave {excerpt(repr(str(sent)))})")
    status = status_of(spec.status.search(answer, where), where, spec)
    results: tuple[TestResult, ...] = ()
    if status in _WITH_RESULTS:
        results = _results(answer, where, spec, required=status is OrderStatus.COMPLETED)
    changed_at = None
    if spec.changed_at is not None:
        changed_at = _datetime(spec.changed_at.search(answer, where), where, spec.changed_at)
        if changed_at is not None and changed_at.utcoffset() is None:
            raise BadLisData(f"{where}: {_named(spec.changed_at)} has no time-zone offset")
    version = None
    if spec.version is not None:
        version = _scalar(spec.version.search(answer, where), where, spec.version)
    pdf: PdfRef | None = None
    if status is OrderStatus.COMPLETED:
        if spec.has_pdf_source:
            pdf = BY_ORDER
        elif spec.pdf_base64 is not None:
            data = pdf_bytes(spec.pdf_base64.search(answer, where), f"PDF of {where}",
                             spec.pdf_base64)
            pdf = PdfRef.inline(data) if data else None
    return LisOrder(external_id=external_id, status=status, results=results,
                    changed_at=changed_at, version=version, pdf=pdf)


def status_of(found: Any, where: str, spec: Spec) -> OrderStatus:
    """The labsync status of the LIS's status value: its text, looked up exactly."""
    if found is None:
        raise BadLisData(f"{where}: {_named(spec.status)} gave nothing")
    text = _scalar(found, where, spec.status)
    status = spec.status_map.get(text) if text is not None else None
    if status is None:
        known = list(spec.status_map)
        shown = ", ".join(repr(k) for k in known[:_SHOWN_STATUSES])
        more = ", …" if len(known) > _SHOWN_STATUSES else ""
        raise BadLisData(f"{where}: status {excerpt(repr(text))} is not in "
                         f"lis.mapped.status_map (known: {shown}{more})")
    return status


def _results(answer: Any, where: str, spec: Spec, *, required: bool) -> tuple[TestResult, ...]:
    """The order's results. ``each`` finding nothing is an order without results when the
    field it starts from is there and null (SOAP's empty ``<Results/>``, which zeep makes
    null); for a completed order anything else is refused: a path that does not fit the
    answer must not complete an order with no results."""
    items = spec.each.search(answer, where)
    if items is None:
        root = spec.each.root_field
        if required and not (root is not None and isinstance(answer, Mapping)
                             and root in answer and answer[root] is None):
            raise BadLisData(f"{where}: {_named(spec.each)} gave nothing for a completed order")
        return ()
    if not isinstance(items, list):
        raise BadLisData(f"{where}: {_named(spec.each)} must give a list, not {_kind(items)}")
    return tuple(_result(item, f"{where}: result {i + 1}", spec) for i, item in enumerate(items))


def _result(item: Any, where: str, spec: Spec) -> TestResult:
    fields = spec.fields

    def get(name: str) -> Any:
        expression = fields.get(name)
        return None if expression is None else expression.search(item, where)

    code = _scalar(get("code"), where, fields.get("code")) or None
    name = _scalar(get("name"), where, fields.get("name")) or None
    if code is None and name is None:
        raise BadLisData(f"{where}: has neither a code ({_named(fields.get('code'))}) nor a "
                         f"name ({_named(fields.get('name'))})")
    test = f"{where} ({excerpt(code or name or '')})"
    value = _scalar(get("value"), test, fields.get("value"))
    if value is None:
        raise BadLisData(f"{test}: {_named(fields.get('value'))} gave nothing")
    return TestResult(
        code=code,
        name=name,
        value=value,
        unit=_scalar(get("unit"), test, fields.get("unit")),
        ref_min=_scalar(get("ref_min"), test, fields.get("ref_min")),
        ref_max=_scalar(get("ref_max"), test, fields.get("ref_max")),
        abnormal=_abnormal(get("abnormal"), test, fields.get("abnormal"),
                           spec.abnormal_values),
        result_date=_datetime(get("result_date"), test, fields.get("result_date")),
    )


def _abnormal(flag: Any, where: str, expression: Expression | None,
              abnormal_values: frozenset[str]) -> bool:
    """True, false or null; with ``abnormal_values``, any text: abnormal when listed."""
    if flag is None or isinstance(flag, bool):
        return flag is True
    if abnormal_values and not isinstance(flag, list | dict):
        return _scalar(flag, where, expression) in abnormal_values
    raise BadLisData(f"{where}: {_named(expression)} must be true, false or null, not "
                     f"{excerpt(repr(flag))} (or list the abnormal values in "
                     "lis.mapped.results.abnormal_values)")


def pdf_bytes(found: Any, where: str, expression: Expression) -> bytes | None:
    """The PDF's bytes from what ``pdf_base64`` found: bytes as they are (zeep decoded a
    ``base64Binary``), base64 text decoded; None when there is none."""
    if found is None or found in ("", b""):
        return None
    if isinstance(found, bytes | bytearray):
        return bytes(found)
    if not isinstance(found, str):
        raise BadLisData(f"{where}: {_named(expression)} must give base64 text or bytes, not "
                         f"{_kind(found)}")
    try:
        return base64.b64decode("".join(found.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadLisData(f"{where}: {_named(expression)} is not valid base64") from None


# -- patient search -------------------------------------------------------------------------


def refs_from(answer: Any, where: str, spec: Spec) -> list[LisOrderRef]:
    """The orders a ``find_url`` answer lists (``find_each``, each item by ``[find]``)."""
    assert spec.find_each is not None
    items = spec.find_each.search(answer, where)
    if items is None:
        return []
    if not isinstance(items, list):
        raise BadLisData(f"{where}: {_named(spec.find_each)} must give a list, not "
                         f"{_kind(items)}")
    return [_ref(item, f"{where}: order {i + 1}", spec) for i, item in enumerate(items)]


def _ref(item: Any, where: str, spec: Spec) -> LisOrderRef:
    fields = spec.find_fields

    def get(name: str) -> Any:
        expression = fields.get(name)
        return None if expression is None else expression.search(item, where)

    external_id = _scalar(get("id"), where, fields.get("id"))
    if not external_id:
        raise BadLisData(f"{where}: {_named(fields.get('id'))} gave nothing")
    where = f"{where} ({excerpt(external_id)})"
    patient = Patient(
        phone=_string(get("phone"), where, fields.get("phone")),
        last_name=_string(get("last_name"), where, fields.get("last_name")),
        first_name=_string(get("first_name"), where, fields.get("first_name")),
        birth_date=_date(get("birth_date"), where, fields.get("birth_date")),
    )
    return LisOrderRef(external_id=external_id,
                       status=status_of(get("status"), where, spec),
                       order_date=_date(get("order_date"), where, fields.get("order_date")),
                       patient=patient)


# -- values -----------------------------------------------------------------------------------


def _named(expression: Expression | None) -> str:
    return "(no expression)" if expression is None else f"{expression.key} ({expression.text})"


def _kind(value: Any) -> str:
    """A type name for messages; the value itself may be large or hold patient data."""
    if value is None:
        return "null"
    names: dict[type, str] = {bool: "a boolean", str: "a string", list: "a list",
                              dict: "an object", bytes: "bytes"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _text(value: str, where: str, expression: Expression | None) -> str:
    """``value`` as a plain ``str``, refusing what MySQL or a browser should never get."""
    if "\x00" in value:
        raise BadLisData(f"{where}: {_named(expression)} contains a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
            raise BadLisData(f"{where}: {_named(expression)} is not valid Unicode text"
                             ) from None
    return str(value)  # a JsonNumber becomes a plain str: the model holds text


def _scalar(value: Any, where: str, expression: Expression | None) -> str | None:
    """A number (as its literal text), a string, or null; anything else is refused."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadLisData(f"{where}: {_named(expression)} must be a number, a string or null, "
                         "not a boolean")
    if isinstance(value, str):  # JsonNumber is a str: its literal
        return _text(value, where, expression)
    if isinstance(value, Decimal | int):
        return str(value)  # Decimal("3.90") → "3.90"
    if isinstance(value, float):
        return repr(value)  # an xs:double zeep parsed: its literal is gone (docs/mapped.md)
    raise BadLisData(f"{where}: {_named(expression)} must be a number, a string or null, not "
                     f"{_kind(value)}")


def _string(value: Any, where: str, expression: Expression | None) -> str | None:
    """Text or null (a phone sent as a number has lost its ``+`` already)."""
    if value is None:
        return None
    if not isinstance(value, str) or _is_number(value):
        raise BadLisData(f"{where}: {_named(expression)} must be a string or null")
    return _text(value, where, expression)


def _is_number(value: Any) -> bool:
    return isinstance(value, JsonNumber)


def _datetime(value: Any, where: str, expression: Expression | None) -> datetime | None:
    """ISO 8601 text, a datetime or a date; aware when the LIS gave an offset."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time())
    elif isinstance(value, str) and not _is_number(value):
        try:
            moment = datetime.fromisoformat(_text(value, where, expression))
        except ValueError:
            raise BadLisData(f"{where}: {_named(expression)}: {excerpt(repr(value))} is not an "
                             "ISO 8601 date-time") from None
    else:
        raise BadLisData(f"{where}: {_named(expression)} must be an ISO 8601 date-time or null")
    # The site's DATETIME holds years 1000-9999; at the edges a time-zone shift would overflow.
    if not 1000 <= moment.year <= 9998:
        raise BadLisData(f"{where}: {_named(expression)}: {excerpt(repr(str(value)))} is out of "
                         "range (years 1000-9998)")
    return moment


def _date(value: Any, where: str, expression: Expression | None) -> date | None:
    """``YYYY-MM-DD`` (a date-time's date is taken), a date or a datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str) and not _is_number(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            try:
                return datetime.fromisoformat(value).date()
            except ValueError:
                pass
    raise BadLisData(f"{where}: {_named(expression)}: {excerpt(repr(str(value)))} is not an "
                     "ISO 8601 date")


def plain(value: Any) -> Any:
    """``value`` with mappings as plain dicts (zeep's OrderedDicts), for printing."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
