"""The one interface every LIS adapter implements.

Terms:
- *external id*: the order's id in the LIS, ``local_lab_orders.EXTERNAL_ORDER_ID``.
- Every method is safe to call from several threads at once; an adapter keeps per-thread
  connections itself.
- Every method either returns validated, LIS-neutral data (``labsync.model``) or raises a
  ``LisError`` subclass (``labsync.errors``): ``TransientLisError`` after its own bounded
  retries are spent, ``PermanentLisError`` (``LisAuthError``, ``UnknownOrder``,
  ``PdfNotReady``) or ``BadLisData``. Nothing else escapes, so the engine can confine every
  failure to its order.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from datetime import date
from typing import BinaryIO

from labsync.model import LisOrder, LisOrderRef, Patient


class LisClient(abc.ABC):
    """A laboratory information system, as labsync needs it."""

    @abc.abstractmethod
    def fetch_order(self, external_id: str) -> LisOrder:
        """The order's status and results so far; ``UnknownOrder`` if the LIS has no such order."""

    @abc.abstractmethod
    def fetch_pdf(self, external_id: str, sink: BinaryIO, *, max_bytes: int) -> int:
        """Stream the order's PDF form into ``sink``; return the number of bytes written.

        ``sink`` is positioned at 0 and truncated before every attempt, so a retried download
        never appends to a partial one. Raises ``PdfNotReady`` while the LIS has no PDF, and
        ``BadLisData`` if the body is not a PDF, is cut short, or exceeds ``max_bytes``.
        """

    @abc.abstractmethod
    def find_orders(self, phone: str, date_from: date) -> Sequence[LisOrderRef]:
        """Orders of the patient with this E.164 phone, placed on or after ``date_from``."""

    @abc.abstractmethod
    def create_order(self, patient: Patient, tests: Sequence[str]) -> LisOrderRef:
        """Place an order for ``tests`` (LIS test codes). Never retried: it is not idempotent."""

    def probe(self) -> None:
        """Reach the LIS and prove the credentials work; raise a ``LisError`` if not.

        The default asks for an order id no LIS will have: "unknown order" means the LIS
        answered and accepted the key. Adapters with a real health endpoint override this.
        """
        from labsync.errors import UnknownOrder

        try:
            self.fetch_order("labsync-probe-0")
        except UnknownOrder:
            return

    def close(self) -> None:  # noqa: B027 - optional hook, most adapters need nothing
        """Release connections. The client is not used afterwards."""
