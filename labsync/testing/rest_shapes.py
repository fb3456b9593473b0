"""Two JSON shapes of the same orders, for the fake REST LIMS: examples, not vendor contracts.

- ``MEDWORK``: a MedWork/Eralis-like flat order (``order``, ``patient``, ``tests[]``), the
  PDF at its own URL, ``Authorization: Token …``;
- ``NESTED``: a referral with samples and their tests (``samples[].tests[]``), each result in
  its own object, the PDF inline as base64 (``documents[?type=='pdf']``), ``X-Lims-Key``.

Each shape renders a ``LimsOrder`` as its JSON (values that read as numbers are sent as JSON
numbers: the hard case for keeping ``5.40``), routes a request path, and lists the orders a
patient search finds. ``config/examples/`` holds the mapping of each.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from labsync.model import OrderStatus, Patient, TestResult
from labsync.testing.lims_server import LimsOrder

_JSON_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")


class Num(str):
    """Text to be sent as a JSON number, exactly as written (``5.40``)."""

    __slots__ = ()


def number_or_text(value: str | None) -> Any:
    """``value`` as a JSON number when it reads as one, else as it is."""
    return Num(value) if value is not None and _JSON_NUMBER.fullmatch(value) else value


def json_body(payload: Any) -> bytes:
    """``payload`` as UTF-8 JSON, every ``Num`` written as a bare number."""
    literals: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, Num):
            token = f"@@n{len(literals)}@@"
            literals[f'"{token}"'] = str(value)
            return token
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(payload), ensure_ascii=False)
    for token, literal in literals.items():
        text = text.replace(token, literal)
    return text.encode("utf-8")


def _iso(moment: datetime | date | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@dataclass(frozen=True)
class RestShape:
    """How one kind of REST LIMS lays out its URLs, statuses and JSON."""

    name: str
    base_path: str
    statuses: dict[OrderStatus, str]
    auth_header: str
    auth_prefix: str  # what comes before the token in the header's value
    order_path: re.Pattern[str]
    pdf_path: re.Pattern[str] | None
    find_path: str
    render: Callable[[LimsOrder, str], Any]  # (order, its status text) → JSON payload
    render_found: Callable[[Sequence[tuple[LimsOrder, str]]], Any]
    find_keys: tuple[str, str]  # the query's (phone, date from) parameter names

    def status_text(self, order: LimsOrder) -> str:
        return order.raw_status if order.raw_status is not None else self.statuses[order.status]

    def route(self, method: str, target: str) -> tuple[str, str | None, dict[str, list[str]]]:
        """(endpoint, URL-decoded order id, query) of a request line."""
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        if method != "GET" or not parts.path.startswith(self.base_path + "/"):
            return "unknown", None, query
        path = parts.path[len(self.base_path):]
        if path == self.find_path:
            return "find", None, query
        for endpoint, pattern in (("order", self.order_path), ("pdf", self.pdf_path)):
            match = pattern.fullmatch(path) if pattern is not None else None
            if match:
                return endpoint, unquote(match[1]), query
        return "unknown", None, query

    def found(self, orders: Sequence[LimsOrder], query: dict[str, list[str]]) -> Any:
        """The answer of a patient search: the orders of that phone since that date."""
        phone_key, date_key = self.find_keys
        phone = query.get(phone_key, [None])[0]
        since = query.get(date_key, [None])[0]
        hits = [(o, self.status_text(o)) for o in orders
                if phone is not None and o.patient.phone == phone
                and (since is None or (o.order_date is not None
                                       and o.order_date.isoformat() >= since))]
        return self.render_found(hits)


# -- MedWork-like -------------------------------------------------------------------------------


def _patient_flat(patient: Patient) -> dict[str, Any]:
    return {"phone": patient.phone, "last_name": patient.last_name,
            "first_name": patient.first_name, "birth_date": _iso(patient.birth_date)}


def _medwork_test(result: TestResult) -> dict[str, Any]:
    return {
        "code": result.code,
        "name": result.name,
        "result": number_or_text(result.value),
        "units": result.unit,
        "reference": {"min": number_or_text(result.ref_min),
                      "max": number_or_text(result.ref_max)},
        "out_of_range": result.abnormal,
        "validated_at": _iso(result.result_date),
    }


def _medwork(order: LimsOrder, status: str) -> dict[str, Any]:
    return {
        "order": {"number": order.external_id, "status": status,
                  "created": _iso(order.order_date), "modified": _iso(order.changed_at),
                  "revision": order.version},
        "patient": _patient_flat(order.patient),
        "tests": [_medwork_test(r) for r in order.results],
    }


def _medwork_found(hits: Sequence[tuple[LimsOrder, str]]) -> dict[str, Any]:
    return {"total": len(hits), "items": [
        {"number": o.external_id, "status": status, "created": _iso(o.order_date),
         "patient": _patient_flat(o.patient)} for o, status in hits]}


MEDWORK = RestShape(
    name="medwork",
    base_path="/api/v2",
    statuses={OrderStatus.RECEIVED: "NEW", OrderStatus.PROCESSING: "IN_WORK",
              OrderStatus.COMPLETED: "DONE", OrderStatus.CANCELLED: "CANCELED"},
    auth_header="Authorization",
    auth_prefix="Token ",
    order_path=re.compile(r"/orders/([^/]+)"),
    pdf_path=re.compile(r"/orders/([^/]+)/report\.pdf"),
    find_path="/orders",
    render=_medwork,
    render_found=_medwork_found,
    find_keys=("phone", "created_from"),
)


# -- a nested referral → samples → tests LIMS ------------------------------------------------------


def _nested_test(result: TestResult) -> dict[str, Any]:
    """A test with its absent values left out, not null (the mapper reads both alike)."""
    outcome = {"value": number_or_text(result.value), "unit": result.unit,
               "flag": "H" if result.abnormal else "N",
               "approved_at": _iso(result.result_date)}
    test: dict[str, Any] = {"code": result.code, "title": result.name,
                            "result": {k: v for k, v in outcome.items() if v is not None}}
    norm = {"low": number_or_text(result.ref_min), "high": number_or_text(result.ref_max)}
    if any(v is not None for v in norm.values()):
        test["norm"] = {k: v for k, v in norm.items() if v is not None}
    return {k: v for k, v in test.items() if v is not None}


def _nested(order: LimsOrder, status: str) -> dict[str, Any]:
    half = (len(order.results) + 1) // 2  # two tubes: the tests split between them
    tubes = [order.results[:half], order.results[half:]] if order.results else []
    documents = []
    if order.pdf is not None and order.status is OrderStatus.COMPLETED:
        documents.append({"type": "pdf", "name": f"{order.external_id}.pdf",
                          "content": base64.b64encode(order.pdf).decode("ascii")})
    return {
        "referral": {"number": order.external_id, "date": _iso(order.order_date),
                     "updated_at": _iso(order.changed_at), "etag": order.version},
        "state": {"code": status},
        "patient": {"phone": order.patient.phone, "surname": order.patient.last_name,
                    "name": order.patient.first_name,
                    "birthday": _iso(order.patient.birth_date)},
        "samples": [{"barcode": f"{order.external_id}-{i + 1}", "material": "blood",
                     "tests": [_nested_test(r) for r in tube]}
                    for i, tube in enumerate(tubes) if tube],
        "documents": documents,
    }


def _nested_found(hits: Sequence[tuple[LimsOrder, str]]) -> dict[str, Any]:
    return {"result": {"referrals": [
        {"number": o.external_id, "state": status, "date": _iso(o.order_date),
         "patient": {"phone": o.patient.phone, "surname": o.patient.last_name,
                     "name": o.patient.first_name, "birthday": _iso(o.patient.birth_date)}}
        for o, status in hits]}}


NESTED = RestShape(
    name="nested",
    base_path="/lims/v3",
    statuses={OrderStatus.RECEIVED: "new", OrderStatus.PROCESSING: "in_work",
              OrderStatus.COMPLETED: "done", OrderStatus.CANCELLED: "rejected"},
    auth_header="X-Lims-Key",
    auth_prefix="",
    order_path=re.compile(r"/referrals/([^/]+)"),
    pdf_path=None,
    find_path="/referrals",
    render=_nested,
    render_found=_nested_found,
    find_keys=("phone", "from"),
)

SHAPES = {shape.name: shape for shape in (MEDWORK, NESTED)}
