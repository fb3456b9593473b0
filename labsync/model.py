"""LIS-neutral data: what an adapter returns and what the engine works with.

Adapters turn their vendor's answers into these types and validate them on the way in, so
the engine never sees a vendor's JSON. Values are already text where the site stores text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime


class OrderStatus(enum.StrEnum):
    """An order's status, as the LIS and the site's ``local_lab_orders.STATUS`` both spell it."""

    RECEIVED = "received"
    PROCESSING = "processing"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


PENDING_STATUSES = (OrderStatus.RECEIVED, OrderStatus.PROCESSING)


@dataclass(frozen=True, slots=True)
class TestResult:
    """One test's result as the LIS reported it.

    ``value``, ``ref_min`` and ``ref_max`` are text exactly as the LIS sent them (a JSON number
    keeps its literal, ``5.40`` stays ``5.40``). ``result_date`` carries its offset if the LIS
    gave one (aware) and is naive otherwise; the engine converts it to site time.
    """

    __test__ = False  # not a pytest class, despite the name

    code: str | None
    name: str | None
    value: str | None
    unit: str | None = None
    ref_min: str | None = None
    ref_max: str | None = None
    abnormal: bool = False
    result_date: datetime | None = None

    @property
    def key(self) -> str:
        """What identifies the test within its order: its code, or its name without one."""
        return self.code if self.code else f"name:{self.name}"


@dataclass(frozen=True, slots=True)
class LisOrder:
    """An order's state in the LIS: its status and the results it has so far."""

    external_id: str
    status: OrderStatus
    results: tuple[TestResult, ...] = ()


@dataclass(frozen=True, slots=True)
class Patient:
    """The patient of an order, as the LIS knows them (for matching orders found by phone)."""

    phone: str | None = None
    last_name: str | None = None
    first_name: str | None = None
    birth_date: date | None = None


@dataclass(frozen=True, slots=True)
class LisOrderRef:
    """An order found in the LIS by patient (``find_orders``) or just created (``create_order``)."""

    external_id: str
    status: OrderStatus
    order_date: date | None = None
    patient: Patient = field(default_factory=Patient)
