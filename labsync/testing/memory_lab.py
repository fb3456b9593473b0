"""The laboratory system behind the memory adapter (``labsync.testing.memory_lis``).

``MemoryLab`` stands for the vendor's server, and, for the inbox, for labsync's spool
folder on disk: it outlives any adapter, so a new adapter over the same lab is the adapter
after a crash and a restart. Tests script it in ``labsync.model`` terms (``add_order``,
``update_order``, ``set_pdf``, ``deliver``) and break it on purpose (``fail``). It answers
the way a remote system does, with a code and a body (``Answer``), and the adapter makes
sense of that; it never raises an ``LisError`` itself. One lock guards all of its state.
"""

from __future__ import annotations

import enum
import itertools
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

from labsync.lis.base import Delivery
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

URL_PREFIX = "memory://lab/pdf/"  # the URLs of the lab's PDFs (PdfRef.at)
_KEEP: Any = object()  # "leave as it is" for update_order


class Fault(enum.StrEnum):
    """How the lab misbehaves, scripted per order and per request kind (``MemoryLab.fail``)."""

    AUTH = "auth"  # refuses the credentials
    UNKNOWN = "unknown"  # says it has no such order
    PDF_NOT_READY = "pdf_not_ready"  # says the PDF is not rendered yet
    TRANSIENT = "transient"  # busy; a PDF download breaks off half-way
    BAD_DATA = "bad_data"  # answers with something that is not what was asked for


@dataclass(frozen=True)
class Answer:
    """What the lab sends back: ``code`` is ok, denied, missing, busy or cut; and a body."""

    code: str
    body: Any = None


@dataclass
class _Order:
    order: LisOrder  # as the lab has it now (its ``pdf`` handle is made when it is asked)
    patient: Patient
    order_date: date | None
    pdf: bytes | None
    pdf_as: PdfKind


@dataclass
class _Stored:
    delivery: Delivery
    state: str = "waiting"  # waiting | done | failed
    reason: str = ""


@dataclass
class _Fault:
    fault: Fault
    left: int | None  # None: for ever


class MemoryLab:
    """The LIS: scripted by tests in ``labsync.model`` terms; asked by ``MemoryLis``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._orders: dict[str, _Order] = {}
        self._log: list[LisOrder] = []  # every add/update, in order: the change feed
        self._inbox: dict[str, _Stored] = {}  # insertion order is the sender's order
        self._faults: dict[tuple[str | None, str], list[_Fault]] = {}
        self._ids = itertools.count(1)
        self.calls: Counter[tuple[str, str | None]] = Counter()  # (kind, order) → requests
        self.created: list[tuple[Patient, tuple[str, ...]]] = []

    # -- scripting ------------------------------------------------------------------------

    def add_order(self, external_id: str, *, status: OrderStatus = OrderStatus.COMPLETED,
                  results: Sequence[TestResult] = (), patient: Patient | None = None,
                  order_date: date | None = None, changed_at: datetime | None = None,
                  version: str | None = None, pdf: bytes | None = None,
                  pdf_as: PdfKind = PdfKind.BY_ORDER) -> None:
        """Add (or replace) an order. ``pdf_as`` is how its answers hand out the PDF."""
        order = LisOrder(external_id, OrderStatus(status), tuple(results), changed_at, version)
        with self._lock:
            self._orders[external_id] = _Order(order, patient or Patient(), order_date, pdf,
                                               PdfKind(pdf_as))
            self._log.append(order)

    def update_order(self, external_id: str, *, status: Any = _KEEP, results: Any = _KEEP,
                     changed_at: Any = _KEEP, version: Any = _KEEP, pdf: Any = _KEEP) -> None:
        """Change what is given, leave the rest; the change goes into the feed."""
        with self._lock:
            record = self._orders[external_id]
            changes = {k: v for k, v in (("status", status), ("changed_at", changed_at),
                                         ("version", version)) if v is not _KEEP}
            if results is not _KEEP:
                changes["results"] = tuple(results)
            record.order = replace(record.order, **changes)
            if pdf is not _KEEP:
                record.pdf = pdf
            self._log.append(record.order)

    def set_pdf(self, external_id: str, pdf: bytes | None) -> None:
        """The order's PDF bytes; None: not rendered yet. Not a change the feed reports."""
        with self._lock:
            self._orders[external_id].pdf = pdf

    def fail(self, external_id: str | None, fault: Fault | str, *, on: str = "order",
             times: int | None = 1) -> None:
        """Misbehave on the next ``times`` requests (None: all) of kind ``on`` (order, pdf,
        feed, search, create) about ``external_id`` (None: any)."""
        with self._lock:
            self._faults.setdefault((external_id, on), []).append(_Fault(Fault(fault), times))

    def deliver(self, delivery_id: str, orders: Sequence[LisOrder], *,
                received_at: datetime | None = None, problem: str | None = None) -> bool:
        """A pushed message, now safe in the inbox; False if that id is stored already (a
        sender's resend: acknowledged again, kept once)."""
        with self._lock:
            if delivery_id in self._inbox:
                return False
            self._inbox[delivery_id] = _Stored(Delivery(delivery_id, tuple(orders),
                                                        received_at, problem))
            return True

    def inbox_state(self, delivery_id: str) -> str:
        """``waiting``, ``done`` or ``failed: <reason>``."""
        with self._lock:
            stored = self._inbox[delivery_id]
            return f"failed: {stored.reason}" if stored.state == "failed" else stored.state

    def requests(self, on: str | None = None, external_id: str | None = None) -> int:
        """Requests the lab has had, of one kind and/or about one order."""
        with self._lock:
            return sum(n for (kind, oid), n in self.calls.items()
                       if on in (None, kind) and external_id in (None, oid))

    # -- serving: what the adapter asks (any thread) ----------------------------------------

    def serve(self, on: str, external_id: str | None = None, **query: Any) -> Answer:
        """One request; the answer before the adapter makes sense of it."""
        with self._lock:
            self.calls[on, external_id] += 1
            fault = self._take_fault(on, external_id)
            if fault is Fault.AUTH:
                return Answer("denied", "invalid credentials")
            if fault is Fault.BAD_DATA:
                return Answer("ok", "<html>502 Bad Gateway</html>")
            if fault in (Fault.UNKNOWN, Fault.PDF_NOT_READY):
                return Answer("missing")
            record = self._orders.get(external_id) if external_id is not None else None
            if fault is Fault.TRANSIENT:
                pdf = record.pdf if record is not None and record.pdf is not None else b""
                return Answer("cut", pdf[: len(pdf) // 2]) if on == "pdf" else Answer("busy")
            if on in ("order", "pdf"):
                if record is None or (on == "pdf" and record.pdf is None):
                    return Answer("missing")
                return Answer("ok", self._answered(record.order) if on == "order"
                              else record.pdf)
            if on == "feed":
                start, limit = query["start"], query["limit"]
                page = [self._answered(o) for o in self._log[start:start + limit]]
                return Answer("ok", (page, len(self._log)))
            if on == "search":
                return Answer("ok", [
                    LisOrderRef(oid, r.order.status, r.order_date, r.patient)
                    for oid, r in self._orders.items() if r.patient.phone == query["phone"]
                    and r.order_date is not None and r.order_date >= query["date_from"]])
            if on == "create":
                new_id = f"MEM-{next(self._ids):06d}"
                self.created.append((query["patient"], tuple(query["tests"])))
                self._orders[new_id] = _Order(LisOrder(new_id, OrderStatus.RECEIVED),
                                              query["patient"], date.today(), None,
                                              PdfKind.BY_ORDER)
                return Answer("ok", LisOrderRef(new_id, OrderStatus.RECEIVED, date.today(),
                                                query["patient"]))
            return Answer("missing")

    def inbox(self) -> list[tuple[Delivery, str]]:
        """The stored deliveries and their states (waiting, done, failed), oldest first."""
        with self._lock:
            return [(stored.delivery, stored.state) for stored in self._inbox.values()]

    def finish(self, delivery_id: str, state: str, reason: str = "") -> None:
        """Mark a delivery done or failed, for good (on disk, for a real inbox)."""
        with self._lock:
            stored = self._inbox[delivery_id]
            if stored.state == "waiting":
                stored.state, stored.reason = state, reason

    def _take_fault(self, on: str, external_id: str | None) -> Fault | None:
        for key in ((external_id, on), (None, on)):
            queue = self._faults.get(key)
            if queue:
                head = queue[0]
                if head.left is not None:
                    head.left -= 1
                    if head.left == 0:
                        queue.pop(0)
                return head.fault
        return None

    def _answered(self, order: LisOrder) -> LisOrder:
        """``order`` as answered: with a PDF handle of the lab's kind, when it has one."""
        record = self._orders[order.external_id]
        kind = record.pdf_as
        if kind is PdfKind.BY_ORDER:
            pdf = BY_ORDER if order.status is OrderStatus.COMPLETED else None
        elif record.pdf is None:
            pdf = None
        else:
            pdf = (PdfRef.inline(record.pdf) if kind is PdfKind.INLINE
                   else PdfRef.at(URL_PREFIX + order.external_id))
        return replace(order, pdf=pdf)
