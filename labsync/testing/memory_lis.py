"""An in-memory LIS adapter with every capability: the reference adapter, and the worked
example of how to write one (``docs/adapters.md``).

``MemoryLis`` is the part you would write in ``labsync/lis/<name>.py``; the LIS it talks
to is a ``MemoryLab`` (``labsync.testing.memory_lab``), which tests script. The adapter:

- declares what it can do by the interfaces it inherits (``labsync.lis.base``);
- asks the lab, and turns each answer into ``labsync.model`` types or an ``LisError`` in
  one place (``_classified``), checking the shape of what came back, because even a
  lab's answer is input;
- retries what is transient, a bounded number of times, and nothing else (``_asking``);
- streams a PDF into the sink it is given, rewound before every try, never past
  ``max_bytes``, and leaves the PDF checks to ``labsync.pdfs``;
- keeps nothing of its own but what a process keeps in memory: which inbox deliveries are
  in hand. That is all a crash loses, and the inbox contract makes losing it harmless.

It is thread-safe: the lab holds one lock over its state, the adapter one over its
in-hand deliveries.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any, BinaryIO, TypeVar

from labsync.errors import (
    BadLisData,
    LisAuthError,
    PdfNotReady,
    PermanentLisError,
    TransientLisError,
    UnknownOrder,
)
from labsync.lis.base import (
    ChangeFeed,
    Delivery,
    FeedPage,
    Hold,
    Inbox,
    OrderLookup,
    OrderPlacement,
    PatientSearch,
    PdfSource,
)
from labsync.model import BY_ORDER, LisOrder, LisOrderRef, Patient, PdfKind, PdfRef
from labsync.testing.memory_lab import URL_PREFIX, Answer, Fault, MemoryLab

__all__ = ["URL_PREFIX", "Fault", "MemoryLab", "MemoryLis"]

_T = TypeVar("_T")
CHUNK = 64 * 1024


class MemoryLis(OrderLookup, ChangeFeed, Inbox, PdfSource, PatientSearch, OrderPlacement):
    """The adapter over a ``MemoryLab``: every capability, by inheriting every interface.

    ``attempts`` bounds the tries of a request that fails transiently (the first included);
    ``sleep`` is what waits between them (tests pass one that does not sleep);
    ``page_size`` is how many changes one feed read returns at most.
    """

    def __init__(self, lab: MemoryLab | None = None, *, attempts: int = 3,
                 sleep: Callable[[float], None] = time.sleep, page_size: int = 50) -> None:
        self.lab = lab if lab is not None else MemoryLab()
        self._attempts, self._sleep, self._page_size = attempts, sleep, page_size
        self._lock = threading.Lock()
        # process memory (a restart forgets it): what is in hand, and the drain it was
        # taken in; what was released in this drain; how many drains have ended
        self._in_hand: dict[str, int] = {}
        self._later: set[str] = set()
        self._drains = 0

    # -- the one place answers become data or errors ---------------------------------------

    def _classified(self, answer: Answer, what: str, missing: type[PermanentLisError]) -> Any:
        """The body of an ok answer; every other code as its ``LisError``."""
        if answer.code == "ok":
            return answer.body
        if answer.code == "denied":
            raise LisAuthError(f"{what}: the LIS refused the credentials")
        if answer.code == "missing":
            raise missing(f"{what}: {'not ready yet' if missing is PdfNotReady else 'unknown'}")
        raise TransientLisError(f"{what}: the LIS is busy ({answer.code})")

    def _asking(self, attempt: Callable[[], _T], what: str) -> _T:
        """``attempt()``, again after a transient failure, ``attempts`` times at most; the
        last error is raised. Only idempotent requests come here (never ``create_order``)."""
        for n in itertools.count(1):
            try:
                return attempt()
            except TransientLisError:
                if n >= self._attempts:
                    raise
                self._sleep(0.05 * 2 ** (n - 1))  # a real adapter logs each wait
        raise AssertionError("unreachable")  # pragma: no cover

    # -- OrderLookup ------------------------------------------------------------------------

    def fetch_order(self, external_id: str) -> LisOrder:
        """The order as the lab has it; validated, because even a lab's answer is input."""
        what = f"order {external_id}"

        def attempt() -> LisOrder:
            body = self._classified(self.lab.serve("order", external_id), what, UnknownOrder)
            # A real adapter checks field by field here (lis/qlab.py, parse_order).
            if not isinstance(body, LisOrder):
                raise BadLisData(f"{what}: the answer is not an order")
            if body.external_id != external_id:
                raise BadLisData(f"{what}: the answer is about order {body.external_id}")
            return body

        return self._asking(attempt, what)

    # -- PdfSource --------------------------------------------------------------------------

    def fetch_pdf(self, external_id: str, sink: BinaryIO, *, max_bytes: int,
                  ref: PdfRef = BY_ORDER) -> int:
        """Stream the PDF into ``sink``, rewound before every try, never past ``max_bytes``.

        The bytes are not checked for being a PDF: ``labsync.pdfs`` does that for everyone.
        """
        what = f"PDF of order {external_id}"
        if ref.kind is PdfKind.URL:
            url = ref.url or ""
            if not url.startswith(URL_PREFIX):  # never follow a URL off the LIS
                raise BadLisData(f"{what}: {url[:80]!r} is not a URL of this LIS")
            external_id = url[len(URL_PREFIX):]
        elif ref.kind is not PdfKind.BY_ORDER:
            raise BadLisData(f"{what}: a {ref.kind} handle is not fetched")

        def attempt() -> int:
            sink.seek(0)
            sink.truncate()
            answer = self.lab.serve("pdf", external_id)
            data = answer.body if answer.code in ("ok", "cut") else b""
            if not isinstance(data, bytes):
                raise BadLisData(f"{what}: the answer is not a file")
            if len(data) > max_bytes:
                raise BadLisData(f"{what}: the body is larger than {max_bytes} bytes")
            for start in range(0, len(data), CHUNK):
                sink.write(data[start:start + CHUNK])
            self._classified(answer, what, PdfNotReady)  # a "cut" body breaks off: retried
            sink.flush()
            return len(data)

        return self._asking(attempt, what)

    # -- ChangeFeed -------------------------------------------------------------------------

    def changes(self, cursor: str | None, *, since: datetime | None = None) -> FeedPage:
        """The lab's log of changes from position ``cursor`` (``mem:<n>``), a page at a time."""
        if cursor is None:
            start = 0
        elif cursor.startswith("mem:") and cursor[4:].isdigit():
            start = int(cursor[4:])
        else:
            raise PermanentLisError(f"change feed: {cursor[:40]!r} is not a cursor of this LIS")
        what = f"changes after {cursor}"

        def attempt() -> tuple[list[LisOrder], int]:
            body = self._classified(self.lab.serve("feed", start=start, limit=self._page_size),
                                    what, PermanentLisError)
            if not (isinstance(body, tuple) and all(isinstance(o, LisOrder) for o in body[0])):
                raise BadLisData(f"{what}: the answer is not a page of orders")
            return body

        page, total = self._asking(attempt, what)
        end = start + len(page)
        if cursor is None and since is not None:  # a first read starts at a time
            page = [o for o in page if o.changed_at is None or o.changed_at >= since]
        return FeedPage(tuple(page), f"mem:{end}", more=end < total)

    # -- Inbox ------------------------------------------------------------------------------

    def take(self) -> Delivery | None:
        """The oldest waiting delivery not in hand; once none is left, released ones wait
        again for the next drain."""
        with self._lock:
            for delivery, state in self.lab.inbox():
                key = delivery.id
                if state == "waiting" and key not in self._in_hand and key not in self._later:
                    self._in_hand[key] = self._drains
                    return delivery
            self._later.clear()
            self._drains += 1
            return None

    def done(self, delivery: Delivery) -> None:
        # Durable first, then out of hand: the other way round, another thread could take
        # it again in between.
        self.lab.finish(delivery.id, "done")
        with self._lock:
            self._in_hand.pop(delivery.id, None)

    def failed(self, delivery: Delivery, reason: str) -> None:
        self.lab.finish(delivery.id, "failed", reason)
        with self._lock:
            self._in_hand.pop(delivery.id, None)

    def release(self, delivery: Delivery, reason: str,
                hold: Hold = Hold.UNKNOWN_ORDER) -> None:
        with self._lock:
            taken_in = self._in_hand.pop(delivery.id, self._drains)
            # Not again in a drain still under way, unless that drain is given up.
            if taken_in == self._drains and hold is not Hold.UNAVAILABLE:
                self._later.add(delivery.id)

    # -- PatientSearch, OrderPlacement ------------------------------------------------------

    def find_orders(self, phone: str, date_from: date) -> list[LisOrderRef]:
        what = "orders of a phone"

        def attempt() -> list[LisOrderRef]:
            body = self._classified(self.lab.serve("search", phone=phone, date_from=date_from),
                                    what, PermanentLisError)
            if not (isinstance(body, list) and all(isinstance(r, LisOrderRef) for r in body)):
                raise BadLisData(f"{what}: the answer is not a list of orders")
            return body

        return self._asking(attempt, what)

    def create_order(self, patient: Patient, tests: Sequence[str]) -> LisOrderRef:
        """Never retried: a transient failure leaves the outcome unknown."""
        answer = self.lab.serve("create", patient=patient, tests=list(tests))
        ref = self._classified(answer, "new order", PermanentLisError)
        if not isinstance(ref, LisOrderRef):
            raise BadLisData("new order: the answer is not an order")
        return ref
