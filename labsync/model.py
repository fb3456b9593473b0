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


class PdfKind(enum.StrEnum):
    """How an order's PDF is to be had (see ``PdfRef``)."""

    INLINE = "inline"  # the bytes came with the answer
    URL = "url"  # a URL that the adapter that gave it resolves
    BY_ORDER = "by_order"  # ask the adapter for the PDF of this order id


@dataclass(frozen=True, slots=True)
class PdfRef:
    """A handle for an order's PDF form; ``labsync.pdfs.PdfStore.stage`` turns it into a file.

    Whatever the kind, the bytes go through the same checks (``%PDF-``, ``%%EOF``, the size
    cap) in ``labsync.pdfs``: a handle promises nothing about what it points to.
    """

    kind: PdfKind
    data: bytes | None = field(default=None, repr=False)  # INLINE only: may be megabytes
    url: str | None = None  # URL only

    def __post_init__(self) -> None:
        if (self.data is not None) != (self.kind is PdfKind.INLINE):
            raise ValueError("a PdfRef carries bytes if and only if it is inline")
        if (self.url is not None) != (self.kind is PdfKind.URL):
            raise ValueError("a PdfRef carries a URL if and only if it is a URL handle")

    @classmethod
    def inline(cls, data: bytes) -> PdfRef:
        """The PDF's bytes, as the LIS sent them in its answer (an HL7 ED segment, FHIR data)."""
        return cls(PdfKind.INLINE, data=bytes(data))

    @classmethod
    def at(cls, url: str) -> PdfRef:
        """A URL that only the adapter which gave it fetches (it decides what it may follow)."""
        return cls(PdfKind.URL, url=url)

    @classmethod
    def by_order(cls) -> PdfRef:
        """Ask for the PDF by the order's id (QLAB's ``GET /orders/{id}/pdf``): ``BY_ORDER``."""
        return BY_ORDER

    def __repr__(self) -> str:
        if self.kind is PdfKind.INLINE:
            return f"PdfRef.inline(<{len(self.data or b'')} bytes>)"
        if self.kind is PdfKind.URL:
            return f"PdfRef.at({self.url!r})"
        return "PdfRef.by_order()"


BY_ORDER = PdfRef(PdfKind.BY_ORDER)


@dataclass(frozen=True, slots=True)
class LisOrder:
    """An order's state in the LIS: its status, the results it has so far, and its PDF.

    - ``changed_at``: when the LIS last changed the order, time-zone aware; None when the LIS
      does not say (QLAB).
    - ``version``: an opaque version token from the LIS (FHIR ``meta.versionId``, an HL7
      message's control id): two answers with the same token are the same state, two with
      different tokens are not; the token says nothing about which one is newer.
    - ``pdf``: how to get the order's PDF form, or None when this answer has none.

    ``is_older_than`` and ``same_version_as`` compare two answers about the same order, so
    that an older message or feed page never overwrites a newer answer.
    """

    external_id: str
    status: OrderStatus
    results: tuple[TestResult, ...] = ()
    changed_at: datetime | None = None
    version: str | None = None
    pdf: PdfRef | None = None

    def __post_init__(self) -> None:
        if self.changed_at is not None and self.changed_at.utcoffset() is None:
            # Comparing a naive time with an aware one fails (or lies): refuse it here, where
            # the adapter that made it is still on the stack.
            raise ValueError(f"order {self.external_id}: changed_at must be time-zone aware")

    def is_older_than(self, other: LisOrder) -> bool:
        """True when this answer is known to be older than ``other``: both say when the LIS
        changed the order and this one's ``changed_at`` is earlier.

        Without both times nothing is known to be older, so this is False (the caller decides
        what to do with answers it cannot order). ``version`` plays no part: a token only
        says same or not, never which is newer.
        """
        if self.changed_at is None or other.changed_at is None:
            return False
        return self.changed_at < other.changed_at

    def same_version_as(self, other: LisOrder) -> bool:
        """True when both answers carry a version token and the tokens are equal: the same
        state of the order, which need not be applied again. False when either has none."""
        return self.version is not None and self.version == other.version


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
