"""A fake REST LIMS for the mapped adapter: real HTTP on localhost, orders in a shape of
``rest_shapes`` (MedWork-like, or a nested referral), faults and counters of ``LimsServer``.

    with FakeRestLims(MEDWORK, token="abc") as lims:
        lims.add_order("A-1", status=OrderStatus.COMPLETED, results=[...], pdf=sample_pdf())
        lims.base_url   # → lis.base_url of a config (config/examples/medwork-rest.toml)

Answers: the order's JSON (404 for an order it does not have), its PDF (404 while none),
a patient search; 401 without the right credential header. ``LisFault``s are answered as
such an LIMS would: ``auth`` 401, ``unknown`` 404, ``transient`` 503, ``bad_data`` a 200
whose status the mapping does not know (an order) or an HTML page (a PDF).
"""

from __future__ import annotations

import hmac
import threading

from labsync.testing._faultserver import (
    Fault,
    Request,
    Response,
    error_response,
    json_response,
)
from labsync.testing.lims_server import LimsServer, LisFault
from labsync.testing.rest_shapes import MEDWORK, NESTED, SHAPES, RestShape, json_body

__all__ = ["MEDWORK", "NESTED", "SHAPES", "FakeRestLims", "Fault", "LisFault"]

_UNKNOWN_STATUS = "ARCHIVED_AND_PURGED"
_LIS_FAULTS = {"auth": (401, "invalid credentials"), "unknown": (404, "not found"),
               "transient": (503, "service unavailable")}


class FakeRestLims(LimsServer):
    """A REST LIMS answering in ``shape``, asking for ``token`` in the shape's header."""

    def __init__(self, shape: RestShape = MEDWORK, *, token: str = "lims-token",  # noqa: S107 - a fake's
                 host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.shape = shape
        self.token = token

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/<base path>``: the ``lis.base_url`` of a config."""
        return self.origin + self.shape.base_path

    @property
    def auth_value(self) -> str:
        """The whole value of the credential header (``Token abc``)."""
        return self.shape.auth_prefix + self.token

    def handle(self, request: Request, stopping: threading.Event
               ) -> tuple[Response, Fault | None] | None:
        endpoint, external_id, query = self.shape.route(request.method, request.target)
        with self.handling(endpoint, external_id):
            fault = self.take_fault(endpoint, external_id)
            if isinstance(fault, Fault) and fault.delay and stopping.wait(fault.delay):
                return None
            if isinstance(fault, LisFault):
                return self._lis_fault(fault, endpoint, external_id), None
            return self._respond(request, endpoint, external_id, query), fault

    def _authorised(self, request: Request) -> bool:
        given = request.headers.get(self.shape.auth_header) or ""
        return hmac.compare_digest(given.encode(), self.auth_value.encode())

    def _respond(self, request: Request, endpoint: str, external_id: str | None,
                 query: dict[str, list[str]]) -> Response:
        if not self._authorised(request):
            return error_response(401, "invalid credentials")
        if endpoint == "find":
            return Response(200, json_body(self.shape.found(self.orders(), query)))
        order = self.order(external_id)
        if endpoint not in ("order", "pdf") or order is None:
            return error_response(404, "not found")
        if endpoint == "pdf":
            if order.pdf is None:
                return error_response(404, "report not ready")
            return Response(200, order.pdf, "application/pdf")
        return Response(200, json_body(self.shape.render(order, self.shape.status_text(order))))

    def _lis_fault(self, fault: LisFault, endpoint: str, external_id: str | None) -> Response:
        if fault.kind == "bad_data":
            order = self.order(external_id)
            if endpoint == "pdf" or order is None:
                return Response(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return Response(200, json_body(self.shape.render(order, _UNKNOWN_STATUS)))
        status, message = _LIS_FAULTS[fault.kind]
        return json_response(status, {"error": message})
