"""What the fake QLAB answers: its orders, and the QLAB API over them.

The QLAB API as ``CONTRACT.md`` describes it (``/v2`` base, ``X-Api-Key``, JSON): an order's
``results`` and ``pdf``, a patient search (``orders``, GET /orders) and order placement
(``create``, POST /orders). ``QlabApi`` holds the orders a test scripts and turns one request
into one ``Response``, before any fault; ``fake_qlab.FakeQlab`` serves it over HTTP, with
faults and counters on top. A request that matches no route is ``unknown``.
"""

from __future__ import annotations

import hmac
import itertools
import json
import re
import threading
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from labsync.testing._faultserver import Response, error_response, json_response
from labsync.testing.pdfs import sample_pdf

PATIENT_KEYS = ("phone", "last_name", "first_name", "birth_date")
SAMPLE_PDF = sample_pdf()

_ORDER_PATH = re.compile(r"/orders/([^/]+)/(results|pdf)")
_FILTERS = ("patient_phone", "date_from", "status")


@dataclass
class _Order:
    status: str
    results: list[dict[str, Any]]
    pdf: bytes | None
    patient: dict[str, Any]
    order_date: str
    results_body: bytes | None = None


class QlabApi:
    """The orders of a fake QLAB and its answers. Thread-safe: tests change orders while
    clients are calling. ``created`` keeps the JSON bodies of accepted ``POST /orders``."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._orders: dict[str, _Order] = {}
        self._ids = itertools.count(1)
        self.created: list[dict[str, Any]] = []

    # -- orders -----------------------------------------------------------------------------

    def add_order(
        self,
        external_id: str,
        *,
        status: str = "completed",
        results: list[dict[str, Any]] | None = None,
        pdf: bytes | None = SAMPLE_PDF,
        patient: dict[str, Any] | None = None,
        order_date: str | None = None,
        results_body: bytes | None = None,
        copy: bool = True,
    ) -> None:
        """Add (or replace) an order. ``results_body`` is served verbatim by ``/results``.

        ``status`` is not checked, so a test can serve one the contract does not know.
        ``copy=False`` serves ``results`` as given, not a copy: one list shared by many
        orders (nothing in the fake changes a list in place).
        """
        if results is None:
            results = []
        order = _Order(
            status=status,
            results=json.loads(json.dumps(results)) if copy else results,  # the caller's no more
            pdf=pdf,
            patient={**dict.fromkeys(PATIENT_KEYS), **(patient or {})},
            order_date=order_date or date.today().isoformat(),
            results_body=results_body,
        )
        with self._lock:
            self._orders[external_id] = order

    def set_status(
        self, external_id: str, status: str, results: list[dict[str, Any]] | None = None
    ) -> None:
        """Change an order's status, and its results when given (KeyError if unknown)."""
        with self._lock:
            order = self._orders[external_id]
            order.status = status
            if results is not None:
                order.results, order.results_body = json.loads(json.dumps(results)), None

    def set_results(self, external_id: str, results: list[dict[str, Any]]) -> None:
        """Replace an order's results (and drop a verbatim ``results_body``)."""
        with self._lock:
            order = self._orders[external_id]
            order.results, order.results_body = json.loads(json.dumps(results)), None

    def set_pdf(self, external_id: str, pdf: bytes | None) -> None:
        """Set an order's PDF; None makes ``/pdf`` answer 404 (not ready)."""
        with self._lock:
            self._orders[external_id].pdf = pdf

    def remove_order(self, external_id: str) -> None:
        """Forget an order: the LIS answers 404 for it from now on."""
        with self._lock:
            del self._orders[external_id]

    # -- answers ----------------------------------------------------------------------------

    def _respond(
        self,
        endpoint: str,
        external_id: str | None,
        query: dict[str, list[str]],
        body: bytes,
        api_key: str | None,
    ) -> Response:
        """The real answer, before any fault."""
        if api_key is None or not hmac.compare_digest(api_key.encode(), self.api_key.encode()):
            return error_response(401, "invalid api key")
        if endpoint == "create":
            return self._create(body)
        with self._lock:
            if endpoint == "orders":
                return json_response(200, self._find(query))
            order = self._orders.get(external_id) if external_id is not None else None
            if endpoint not in ("results", "pdf"):
                return error_response(404, "not found")
            if order is None:
                return error_response(404, "order not found")
            if endpoint == "pdf":
                if order.pdf is None:
                    return error_response(404, "pdf not ready")
                return Response(200, order.pdf, "application/pdf")
            if order.results_body is not None:
                return Response(200, order.results_body)
            payload = {"id": external_id, "status": order.status, "results": order.results}
            return json_response(200, payload)

    def _find(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Orders matching the query's phone, date_from and status (each only if given)."""
        phone, date_from, status = (query.get(k, [None])[0] for k in _FILTERS)
        return [
            {"id": oid, "order_date": o.order_date, "status": o.status, "patient": o.patient}
            for oid, o in self._orders.items()
            if phone in (None, o.patient.get("phone"))
            and (date_from is None or o.order_date >= date_from)
            and status in (None, o.status)
        ]

    def _create(self, body: bytes) -> Response:
        try:
            payload = json.loads(body)
        except ValueError:
            return error_response(400, "body is not JSON")
        if not (
            isinstance(payload, dict)
            and isinstance(payload.get("patient"), dict)
            and isinstance(payload.get("tests"), list)
            and payload["tests"]
        ):
            return error_response(400, "patient (object) and tests (non-empty list) are required")
        with self._lock:
            external_id = f"QL{next(self._ids):07d}"
            while external_id in self._orders:
                external_id = f"QL{next(self._ids):07d}"
            self.created.append(payload)
        self.add_order(external_id, status="received", pdf=None, patient=payload["patient"])
        return json_response(201, {"id": external_id, "status": "received"})


def route(method: str, target: str) -> tuple[str, str | None, dict[str, list[str]]]:
    """(endpoint, URL-decoded external id, query) of a request line's method and target."""
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    path = parts.path.removeprefix("/v2") if parts.path.startswith("/v2/") else ""
    if path == "/orders":
        return {"GET": "orders", "POST": "create"}.get(method, "unknown"), None, query
    match = _ORDER_PATH.fullmatch(path)
    if match and method == "GET":
        return match[2], unquote(match[1]), query
    return "unknown", None, query
