"""A fake SOAP LIMS, CaLab-like (an example, not CaLab's contract): spyne serves a real WSDL
and SOAP 1.1 over HTTP on localhost, with the orders, faults and counters of ``LimsServer``.

    with SoapLims(token="abc") as lims:
        lims.add_order("A-1", results=[...], pdf=sample_pdf())
        lims.wsdl_url   # → lis.mapped.wsdl (config/examples/calab-soap.toml)

The service (``urn:calab:lab:1``, ``LabService``) has two operations, both taking
``OrderNumber`` and ``Token``:

- ``GetOrderResults`` → ``OrderNumber``, ``StateCode`` (1 received, 2 in work, 3 done,
  9 cancelled), ``Changed``, ``Revision``, ``Patient``, ``Results`` (``Result[]``: ``TestCode``,
  ``TestName``, ``Value`` (text), ``Unit``, ``RefLow``/``RefHigh`` (``xs:decimal``), ``Flag``
  (``H``, ``L`` or ``N``), ``Approved`` (``xs:dateTime``));
- ``GetOrderForm`` → ``OrderNumber``, ``Content`` (``xs:base64Binary``; empty without one).

Faults, as spyne writes them: ``Client.OrderNotFound`` (no such order), ``Client.AuthFailed``
(wrong token), ``Server.Busy`` (a ``LisFault("transient")``). A ``LisFault("bad_data")``
answers ``StateCode`` 77 (an order) or a form that is an HTML page (a PDF). HTTP ``Fault``s
spoil the wire as in the other fakes. spyne's own log lines for faults are silenced.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import warnings
from decimal import Decimal as PyDecimal
from typing import Any

from labsync.model import OrderStatus
from labsync.testing._faultserver import Fault, Request, Response
from labsync.testing.lims_server import LimsOrder, LimsServer, LisFault

with warnings.catch_warnings():  # spyne 2.14 imports cgi, deprecated since Python 3.11
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    from spyne import Application, ComplexModel, ServiceBase, rpc
    from spyne.model.binary import ByteArray
    from spyne.model.complex import Array
    from spyne.model.fault import Fault as SoapFault
    from spyne.model.primitive import Date, DateTime, Decimal, Integer, Unicode
    from spyne.protocol.soap import Soap11
    from spyne.server.wsgi import WsgiApplication

__all__ = ["STATE_CODES", "Fault", "LisFault", "SoapLims"]

NAMESPACE = "urn:calab:lab:1"
PATH = "/calab/LabService.svc"
STATE_CODES = {OrderStatus.RECEIVED: 1, OrderStatus.PROCESSING: 2, OrderStatus.COMPLETED: 3,
               OrderStatus.CANCELLED: 9}
_BAD_STATE = 77
_ORDER_NUMBER = re.compile(rb"<(?:\w+:)?OrderNumber>([^<]*)</(?:\w+:)?OrderNumber>")
_OPERATIONS = {"GetOrderResults": "order", "GetOrderForm": "pdf"}

# One spyne application per fake (each registers itself, and says so when it replaces one).
for _name in ("spyne.application.client", "spyne.application.server", "spyne.util.appreg"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)  # faults are the fake's business


class PatientInfo(ComplexModel):
    __namespace__ = NAMESPACE
    Phone = Unicode
    LastName = Unicode
    FirstName = Unicode
    BirthDate = Date


class Result(ComplexModel):
    __namespace__ = NAMESPACE
    TestCode = Unicode
    TestName = Unicode
    Value = Unicode
    Unit = Unicode
    RefLow = Decimal
    RefHigh = Decimal
    Flag = Unicode
    Approved = DateTime


class OrderResults(ComplexModel):
    __namespace__ = NAMESPACE
    OrderNumber = Unicode
    StateCode = Integer
    Changed = DateTime
    Revision = Unicode
    Patient = PatientInfo
    Results = Array(Result)


class OrderForm(ComplexModel):
    __namespace__ = NAMESPACE
    OrderNumber = Unicode
    Content = ByteArray


def _decimal(text: str | None) -> PyDecimal | None:
    return PyDecimal(text) if text is not None else None


def _results(order: LimsOrder, state: int) -> OrderResults:
    patient = order.patient
    return OrderResults(
        OrderNumber=order.external_id, StateCode=state, Changed=order.changed_at,
        Revision=order.version,
        Patient=PatientInfo(Phone=patient.phone, LastName=patient.last_name,
                            FirstName=patient.first_name, BirthDate=patient.birth_date),
        Results=[Result(TestCode=r.code, TestName=r.name, Value=r.value, Unit=r.unit,
                        RefLow=_decimal(r.ref_min), RefHigh=_decimal(r.ref_max),
                        Flag="H" if r.abnormal else "N", Approved=r.result_date)
                 for r in order.results])


class SoapLims(LimsServer):
    """The fake CaLab-like LIMS; ``token`` is the ``Token`` argument it accepts."""

    def __init__(self, *, token: str = "calab-token",  # noqa: S107 - a fake's
                 host: str = "127.0.0.1",
                 port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.token = token
        self._pending = threading.local()
        self._wsgi = WsgiApplication(Application(
            [self._service()], tns=NAMESPACE, name="LabService",
            in_protocol=Soap11(validator="lxml"), out_protocol=Soap11()))

    @property
    def endpoint(self) -> str:
        return self.origin + PATH

    @property
    def wsdl_url(self) -> str:
        return self.endpoint + "?wsdl"

    def _service(self) -> type[ServiceBase]:
        lims = self

        class LabService(ServiceBase):
            @rpc(Unicode, Unicode, _returns=OrderResults)
            def GetOrderResults(ctx: Any, OrderNumber: str, Token: str) -> OrderResults:
                order, fault = lims._answering(OrderNumber, Token)
                state = STATE_CODES[order.status]
                if fault == "bad_data":
                    state = _BAD_STATE
                elif order.raw_status is not None:
                    state = int(order.raw_status)
                return _results(order, state)

            @rpc(Unicode, Unicode, _returns=OrderForm)
            def GetOrderForm(ctx: Any, OrderNumber: str, Token: str) -> OrderForm:
                order, fault = lims._answering(OrderNumber, Token)
                content = order.pdf
                if fault == "bad_data":
                    content = b"<html><body>502 Bad Gateway</body></html>"
                return OrderForm(OrderNumber=order.external_id,
                                 Content=[content] if content else None)

        return LabService

    def _answering(self, order_number: str, token: str) -> tuple[LimsOrder, str | None]:
        """The order asked for, or the fault its request was given (raised as spyne's)."""
        fault: LisFault | None = getattr(self._pending, "fault", None)
        if (fault is not None and fault.kind == "auth") or token != self.token:
            raise SoapFault(faultcode="Client.AuthFailed", faultstring="invalid token")
        if fault is not None and fault.kind == "transient":
            raise SoapFault(faultcode="Server.Busy", faultstring="the laboratory is busy")
        order = self.order(order_number)
        if order is None or (fault is not None and fault.kind == "unknown"):
            raise SoapFault(faultcode="Client.OrderNotFound",
                            faultstring=f"order {order_number} not found")
        return order, fault.kind if fault is not None else None

    # -- HTTP, into spyne's WSGI application ------------------------------------------------

    def handle(self, request: Request, stopping: threading.Event
               ) -> tuple[Response, Fault | None] | None:
        endpoint, external_id = self._route(request)
        with self.handling(endpoint, external_id):
            fault = self.take_fault(endpoint, external_id)
            if isinstance(fault, Fault) and fault.delay and stopping.wait(fault.delay):
                return None
            self._pending.fault = fault if isinstance(fault, LisFault) else None
            try:
                response = self._call_wsgi(request)
            finally:
                self._pending.fault = None
            return response, fault if isinstance(fault, Fault) else None

    def _route(self, request: Request) -> tuple[str, str | None]:
        path, _, query = request.target.partition("?")
        if path != PATH:
            return "unknown", None
        if request.method == "GET":
            return ("wsdl" if query.lower() == "wsdl" else "unknown"), None
        action = (request.headers.get("SOAPAction") or "").strip('"').rpartition("/")[2]
        match = _ORDER_NUMBER.search(request.body)
        external_id = match[1].decode("utf-8", "replace") if match else None
        return _OPERATIONS.get(action, "unknown"), external_id

    def _call_wsgi(self, request: Request) -> Response:
        path, _, query = request.target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method, "SCRIPT_NAME": "", "PATH_INFO": path,
            "QUERY_STRING": query, "SERVER_NAME": self._server.host,
            "SERVER_PORT": str(self._server.port), "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(request.body)), "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(request.body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in request.headers.items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            started["status"], started["headers"] = int(status.split()[0]), headers

        body = b"".join(self._wsgi(environ, start_response))
        headers = dict(started["headers"])
        content_type = headers.pop("Content-Type", "text/xml; charset=utf-8")
        headers.pop("Content-Length", None)
        return Response(started["status"], body, content_type, headers)

