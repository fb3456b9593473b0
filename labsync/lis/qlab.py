"""The QLAB adapter: QLAB's REST API v2 (CONTRACT.md, "The QLAB API") behind ``LisClient``.

Everything QLAB sends is untrusted input. It is validated field by field on the way in and
refused as a whole (``BadLisData``, naming the order and the field) rather than half-used:
a result silently dropped or a value rounded would show a patient the wrong thing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any, BinaryIO, NamedTuple, TypeVar

from labsync.config import LisConfig
from labsync.errors import BadLisData, PdfNotReady, UnknownOrder
from labsync.lis.base import OrderLookup, OrderPlacement, PatientSearch, PdfSource
from labsync.lis.body import JSON_MAX_BYTES, decode_json
from labsync.lis.body import json_kind as _kind
from labsync.lis.http import HttpTransport, JsonNumber, excerpt, quote_id
from labsync.model import (
    BY_ORDER,
    LisOrder,
    LisOrderRef,
    OrderStatus,
    Patient,
    PdfKind,
    PdfRef,
    TestResult,
)

_T = TypeVar("_T")
_STATUSES = {status.value: status for status in OrderStatus}


class QlabAnswer(NamedTuple):
    """An order's ``/results`` body as received, the API key masked (``labsync try-order``)."""

    body: bytes


class QlabClient(OrderLookup, PdfSource, PatientSearch, OrderPlacement):
    """A QLAB LIS at ``config.base_url`` (``…/v2``), authenticated by ``X-Api-Key``."""

    def __init__(
        self,
        config: LisConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = HttpTransport(config, sleep=sleep, clock=clock)

    def fetch_order(self, external_id: str) -> LisOrder:
        """``GET /orders/{id}/results``; 404 is ``UnknownOrder``."""
        data = self._http.get_json(
            f"/orders/{quote_id(external_id)}/results",
            what=f"results of order {excerpt(external_id)}",
            not_found=UnknownOrder,
        )
        return self._validated(parse_order, external_id, data)

    def fetch_pdf(
        self, external_id: str, sink: BinaryIO, *, max_bytes: int, ref: PdfRef = BY_ORDER
    ) -> int:
        """``GET /orders/{id}/pdf`` streamed into ``sink``; 404 is ``PdfNotReady``.

        QLAB hands out PDFs by order id only (``parse_order`` gives ``PdfRef.by_order()``);
        the bytes are checked by ``labsync.pdfs``.
        """
        what = f"PDF of order {excerpt(external_id)}"
        if ref.kind is not PdfKind.BY_ORDER:
            raise BadLisData(f"{what}: QLAB gives PDFs by order id only, not {ref.kind}")
        return self._http.stream_to(
            f"/orders/{quote_id(external_id)}/pdf",
            sink,
            what=what,
            not_found=PdfNotReady,
            max_bytes=max_bytes,
            accept="application/pdf",
        )

    def find_orders(self, phone: str, date_from: date) -> list[LisOrderRef]:
        """``GET /orders?patient_phone=…&date_from=…``, every status."""
        what = f"orders of phone {_mask(phone)}"
        data = self._http.get_json(
            "/orders",
            what=what,
            params={"patient_phone": phone, "date_from": f"{date_from:%Y-%m-%d}"},
        )
        return self._validated(_order_refs, data, what)

    def create_order(self, patient: Patient, tests: Sequence[str]) -> LisOrderRef:
        """``POST /orders`` with ``"source": "website"``; never retried."""
        what = "new order"
        payload = {
            "patient": {
                "phone": patient.phone,
                "last_name": patient.last_name,
                "first_name": patient.first_name,
                "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
            },
            "tests": list(tests),
            "source": "website",
        }
        data = self._http.post_json("/orders", payload, what=what)
        return self._validated(_created, data, what, patient)

    def close(self) -> None:
        """Close the HTTP sessions."""
        self._http.close()

    # -- for ``labsync try-order``: the answer as received, then validated -----------------

    def answer_as_received(self, external_id: str) -> QlabAnswer:
        """``GET /orders/{id}/results`` as received, not yet validated; 404 is
        ``UnknownOrder``. With ``order_from_answer`` it is ``fetch_order``."""
        sink = io.BytesIO()
        self._http.stream_to(f"/orders/{quote_id(external_id)}/results", sink,
                             what=f"results of order {excerpt(external_id)}",
                             not_found=UnknownOrder, max_bytes=JSON_MAX_BYTES,
                             accept="application/json")
        text = sink.getvalue().decode("utf-8", "surrogateescape")
        return QlabAnswer(self._http.redact(text).encode("utf-8", "surrogateescape"))

    def order_from_answer(self, external_id: str, answer: QlabAnswer) -> LisOrder:
        """The order of an ``answer_as_received``, validated as ``fetch_order`` does."""
        data = decode_json(answer.body, what=f"results of order {excerpt(external_id)}")
        return self._validated(parse_order, external_id, data)

    def _validated(self, parse: Callable[..., _T], *args: Any) -> _T:
        """``parse(*args)``; its messages quote LIS values, which might echo the API key."""
        try:
            return parse(*args)
        except BadLisData as exc:
            raise BadLisData(self._http.redact(str(exc)), status=exc.status) from None


# -- validation: each function names the field it refuses ---------------------------------


def parse_order(external_id: str, data: Any) -> LisOrder:
    """A ``/orders/{id}/results`` body as a ``LisOrder``, or ``BadLisData``."""
    where = f"order {excerpt(external_id)}"
    body = _object(data, where)
    for key in ("id", "order_id"):
        sent = body.get(key)
        if sent is not None and (not isinstance(sent, str) or sent != external_id):
            raise BadLisData(f"{where}: results of a different order ({key} {excerpt(repr(sent))})")
    status = _status(body.get("status"), f"{where}: status")
    raw_results = body.get("results")
    if raw_results is None:
        raw_results = []
    if not isinstance(raw_results, list):
        raise BadLisData(f"{where}: results: expected a JSON array, got {_kind(raw_results)}")
    results = tuple(_result(item, f"{where}: results[{i}]") for i, item in enumerate(raw_results))
    # QLAB serves a completed order's PDF at /orders/{id}/pdf (404 until it is rendered).
    pdf = BY_ORDER if status is OrderStatus.COMPLETED else None
    return LisOrder(external_id=external_id, status=status, results=results, pdf=pdf)


def _order_refs(data: Any, what: str) -> list[LisOrderRef]:
    if not isinstance(data, list):
        raise BadLisData(f"{what}: expected a JSON array, got {_kind(data)}")
    return [_order_ref(item, f"{what}: [{i}]") for i, item in enumerate(data)]


def _created(data: Any, what: str, patient: Patient) -> LisOrderRef:
    body = _object(data, what)
    return LisOrderRef(
        external_id=_order_id(body.get("id"), f"{what}: id"),
        status=_status(body.get("status"), f"{what}: status"),
        patient=patient,
    )


def _result(data: Any, where: str) -> TestResult:
    item = _object(data, where)
    code = _scalar(item.get("code"), f"{where}.code") or None
    name = _scalar(item.get("name"), f"{where}.name") or None
    if code is None and name is None:
        raise BadLisData(f"{where}: has neither a code nor a name")
    test = f"{where} ({excerpt(code or name or '')})"  # later messages name the test too
    abnormal = item.get("abnormal")
    if abnormal is not None and not isinstance(abnormal, bool):
        raise BadLisData(f"{test}.abnormal: must be true, false or null")
    return TestResult(
        code=code,
        name=name,
        value=_scalar(item.get("value"), f"{test}.value"),
        unit=_scalar(item.get("unit"), f"{test}.unit"),
        ref_min=_scalar(item.get("ref_min"), f"{test}.ref_min"),
        ref_max=_scalar(item.get("ref_max"), f"{test}.ref_max"),
        abnormal=abnormal is True,
        result_date=_datetime(item.get("result_date"), f"{test}.result_date"),
    )


def _order_ref(data: Any, where: str) -> LisOrderRef:
    item = _object(data, where)
    external_id = _order_id(item.get("id"), f"{where}.id")
    where = f"{where} (order {excerpt(external_id)})"  # an LIS-sent id: shown sanitised
    patient_data = item.get("patient")
    patient = Patient() if patient_data is None else _patient(patient_data, f"{where}.patient")
    return LisOrderRef(
        external_id=external_id,
        status=_status(item.get("status"), f"{where}.status"),
        order_date=_date(item.get("order_date"), f"{where}.order_date", allow_time=True),
        patient=patient,
    )


def _patient(data: Any, where: str) -> Patient:
    item = _object(data, where)
    return Patient(
        phone=_string(item.get("phone"), f"{where}.phone"),
        last_name=_string(item.get("last_name"), f"{where}.last_name"),
        first_name=_string(item.get("first_name"), f"{where}.first_name"),
        birth_date=_date(item.get("birth_date"), f"{where}.birth_date"),
    )


def _object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadLisData(f"{where}: expected a JSON object, got {_kind(data)}")
    return data


def _text(value: str, where: str) -> str:
    """``value`` as a plain ``str``, refusing what MySQL or a browser should never get."""
    if "\x00" in value:
        raise BadLisData(f"{where}: contains a NUL character")
    # Only non-ASCII text can hold a lone surrogate; most values are ASCII and skip the copy.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
            raise BadLisData(f"{where}: not valid Unicode text") from None
    return str(value)  # a JsonNumber becomes a plain str: the model holds text, nothing else


def _scalar(value: Any, where: str) -> str | None:
    """A JSON number (its literal text), a string, or null."""
    if value is None:
        return None
    if not isinstance(value, str):  # JsonNumber is a str; booleans, arrays, objects are not
        raise BadLisData(f"{where}: must be a number, a string or null")
    return _text(value, where)


def _string(value: Any, where: str) -> str | None:
    """A JSON string or null (a phone sent as a number has lost its ``+`` already)."""
    if value is None:
        return None
    if not isinstance(value, str) or isinstance(value, JsonNumber):
        raise BadLisData(f"{where}: must be a string or null")
    return _text(value, where)


def _order_id(value: Any, where: str) -> str:
    text = _scalar(value, where)
    if not text:
        raise BadLisData(f"{where}: missing or empty")
    return text


def _status(value: Any, where: str) -> OrderStatus:
    status = _STATUSES.get(value) if isinstance(value, str) else None
    if status is None:
        raise BadLisData(f"{where}: {excerpt(repr(value))} is not one of {', '.join(_STATUSES)}")
    return status


def _datetime(value: Any, where: str) -> datetime | None:
    """ISO 8601; aware when the LIS gave an offset or ``Z``, naive when it did not."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or isinstance(value, JsonNumber):
        raise BadLisData(f"{where}: must be an ISO 8601 date-time string or null")
    try:
        moment = datetime.fromisoformat(_text(value, where))
    except ValueError:
        raise BadLisData(f"{where}: {excerpt(repr(value))} is not an ISO 8601 date-time") from None
    # The site's DATETIME holds years 1000-9999; at the very edges a time-zone shift would
    # overflow, and no lab result is dated there anyway.
    if not 1000 <= moment.year <= 9998:
        raise BadLisData(f"{where}: {excerpt(repr(value))} is out of range (years 1000-9998)")
    return moment


def _date(value: Any, where: str, *, allow_time: bool = False) -> date | None:
    """``YYYY-MM-DD`` (or, with ``allow_time``, a date-time whose date is taken)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or isinstance(value, JsonNumber):
        raise BadLisData(f"{where}: must be an ISO 8601 date string or null")
    try:
        return date.fromisoformat(_text(value, where))
    except ValueError:
        if allow_time:
            try:
                return datetime.fromisoformat(value).date()
            except ValueError:
                pass
        raise BadLisData(f"{where}: {excerpt(repr(value))} is not an ISO 8601 date") from None


def _mask(phone: str) -> str:
    """A phone number for messages: enough to tell patients apart, not enough to call them."""
    return f"…{phone[-4:]}" if isinstance(phone, str) and len(phone) > 4 else "…"
