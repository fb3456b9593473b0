"""What the fake LIMSes of the mapped adapter share: their orders, faults and counters.

A fake LIMS (``fake_rest_lims.FakeRestLims``, ``soap_lims.SoapLims``) keeps its orders in
``labsync.model`` terms (``LimsOrder``) and renders them in its vendor's shape, so the same
logical orders can be served as MedWork-like JSON, a nested referral, or CaLab-like SOAP.
``LimsServer`` serves an app on ``_faultserver.FaultServer`` (a real HTTP/1.1 server on
localhost) and keeps, for every request, its endpoint (``order``, ``pdf``, ``find``,
``wsdl``, ``unknown``) and order id: ``request_count``. Faults are queued per endpoint and
order (``inject``): an HTTP ``Fault`` spoils the response on the wire; a ``LisFault``
(``auth``, ``unknown``, ``transient``, ``bad_data``) is answered by the app in its own
protocol (a 401 or a SOAP ``Client.AuthFailed`` fault, …).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any

from labsync.model import OrderStatus, Patient, TestResult
from labsync.testing._faults import FaultQueue, count_requests
from labsync.testing._faultserver import Fault, FaultServer, Request, Response

__all__ = ["Fault", "LimsOrder", "LimsServer", "LisFault"]

ENDPOINTS = ("order", "pdf", "find", "wsdl", "unknown", "*")


@dataclass(frozen=True)
class LisFault:
    """A failure in the LIS's own terms: ``auth``, ``unknown`` (order or PDF not there),
    ``transient`` or ``bad_data``; each fake says it the way its protocol does."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("auth", "unknown", "transient", "bad_data"):
            raise ValueError(f"unknown LIS fault {self.kind!r}")


@dataclass(frozen=True)
class LimsOrder:
    """One order as a fake LIMS holds it, whatever shape it is served in."""

    external_id: str
    status: OrderStatus = OrderStatus.COMPLETED
    results: tuple[TestResult, ...] = ()
    pdf: bytes | None = None
    patient: Patient = field(default_factory=Patient)
    order_date: date | None = None
    changed_at: datetime | None = None
    version: str | None = None
    raw_status: str | None = None  # a status text of the LIS's own, served instead


class LimsServer:
    """Orders, faults and counters of a fake LIMS, served by ``handle`` (the subclass's)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._orders: dict[str, LimsOrder] = {}
        self._faults: FaultQueue[Fault | LisFault] = FaultQueue()
        self.requests: list[tuple[str, str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = FaultServer(self, host, port, None)

    def handle(self, request: Request, stopping: threading.Event
               ) -> tuple[Response, Fault | None] | None:
        """One request's answer (and the HTTP fault to spoil it with): the subclass's."""
        raise NotImplementedError

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> LimsServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self._server.port == 0:
            raise RuntimeError("start() the fake LIMS first")
        return f"http://{self._server.host}:{self._server.port}"

    # -- orders -----------------------------------------------------------------------------

    def add_order(self, external_id: str, *, status: OrderStatus = OrderStatus.COMPLETED,
                  results: Sequence[TestResult] = (), pdf: bytes | None = None,
                  patient: Patient | None = None, order_date: date | None = None,
                  changed_at: datetime | None = None, version: str | None = None,
                  raw_status: str | None = None) -> None:
        """Add or replace an order."""
        order = LimsOrder(external_id, status, tuple(results), pdf, patient or Patient(),
                          order_date, changed_at, version, raw_status)
        with self._lock:
            self._orders[external_id] = order

    def update_order(self, external_id: str, **changes: Any) -> None:
        """Change an order's fields (``status``, ``results``, ``pdf``, …); KeyError if unknown."""
        if "results" in changes:
            changes["results"] = tuple(changes["results"])
        with self._lock:
            self._orders[external_id] = replace(self._orders[external_id], **changes)

    def set_pdf(self, external_id: str, pdf: bytes | None) -> None:
        """The order's PDF; None: not ready."""
        self.update_order(external_id, pdf=pdf)

    def remove_order(self, external_id: str) -> None:
        with self._lock:
            del self._orders[external_id]

    def order(self, external_id: str | None) -> LimsOrder | None:
        with self._lock:
            return self._orders.get(external_id) if external_id is not None else None

    def orders(self) -> list[LimsOrder]:
        with self._lock:
            return list(self._orders.values())

    # -- faults and counters ----------------------------------------------------------------

    def inject(self, external_id: str | None, endpoint: str, fault: Fault | LisFault,
               times: int | None = 1) -> None:
        """Spoil the next ``times`` matching requests (None: all); ``external_id`` None
        matches any order, endpoint ``"*"`` any request."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        self._faults.add(endpoint, external_id, fault, times)

    def clear_faults(self) -> None:
        self._faults.clear()

    def request_count(self, endpoint: str | None = None, external_id: str | None = None) -> int:
        with self._lock:
            return count_requests(self.requests, endpoint, external_id)

    def take_fault(self, endpoint: str, external_id: str | None) -> Fault | LisFault | None:
        """The first queued fault matching this request, counted down."""
        return self._faults.take(endpoint, external_id)

    @contextlib.contextmanager
    def handling(self, endpoint: str, external_id: str | None) -> Iterator[None]:
        """Count one request while it is served."""
        with self._lock:
            self.requests.append((endpoint, external_id))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
