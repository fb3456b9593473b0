"""The lab of the FHIR change-feed benchmark: a fake FHIR server holding one DiagnosticReport
per pending order, and a driver completing those orders at a steady rate.

The server is ``labsync.testing.fake_fhir.FakeFhir`` (real HTTP on localhost, its own
threads, in the benchmark's process), with two bench-side changes that alter no answer:

- ``IndexedFhir``: the fake finds the reports of a search by scanning every resource it
  holds, 14 ms per search by identifier at 10,000 reports on this machine, which made the
  fake, not labsync, the bottleneck of order-by-order polling (10,000 searches a pass). A
  search by identifier alone is handed only the reports carrying that identifier value;
  the fake's own code still filters, sorts, includes and pages them.
- ``Lab`` drops the fake's stored searches every second (``forget_searches``): the fake
  keeps a copy of every search's matches for its ``next`` links, which at 10,000 reports
  grows by gigabytes during the first feed read. labsync follows a stored ``next`` link
  only when a whole page shares one ``lastUpdated``, which the distinct timestamps here
  never make; an expired one would answer 410, which the adapter handles.

Every change is stamped: ``meta.lastUpdated`` is the wall clock at the ``put`` (strictly
increasing by at least 1 ms), and the driver hands the monotonic time of the ``put`` to
its ``on_change`` callback, for the delivery delay.
"""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from labsync.testing._faultserver import Fault
from labsync.testing.fake_fhir import FakeFhir
from labsync.testing.fhir_api import Num, observation, report, unescape
from labsync.testing.pdfs import sample_pdf

TOKEN = "bench-fhir-token-3c7e"
ORDER_SYSTEM = "http://lab.example/orders"
PREFIX = "FH-"
# The fake's endpoints the benchmark reports, in this order: a feed search (by
# _lastUpdated), a next-page link followed, a search by identifier, an Observation read, a
# Binary read (the PDF); any other endpoint is counted under its own name.
GROUPS = ("feed", "page", "search", "observation", "binary")


def order_ids(count: int) -> list[str]:
    return [f"{PREFIX}{i:06d}" for i in range(1, count + 1)]


class _Resources(dict[str, Any]):
    """The fake's resource store with an index of the reports by identifier value.

    ``items()`` in a thread whose ``hint`` is set yields only the hinted keys: the fake's
    search by identifier then scans those, and filters them with its own ``_matches``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_value: dict[str, set[str]] = {}
        self.local = threading.local()

    def __setitem__(self, key: str, value: Any) -> None:
        self._unindex(key)
        super().__setitem__(key, value)
        if key.startswith("DiagnosticReport/"):
            for ident in value.get("identifier") or ():
                self.by_value.setdefault(str(ident.get("value")), set()).add(key)

    def pop(self, key: str, *default: Any) -> Any:
        self._unindex(key)
        return super().pop(key, *default)

    def _unindex(self, key: str) -> None:
        old = self.get(key)
        if old is not None and key.startswith("DiagnosticReport/"):
            for ident in old.get("identifier") or ():
                self.by_value.get(str(ident.get("value")), set()).discard(key)

    def items(self) -> Any:
        hint = getattr(self.local, "hint", None)
        if hint is None:
            return super().items()
        return [(key, self[key]) for key in sorted(hint) if key in self]


class IndexedFhir(FakeFhir):
    """``FakeFhir`` whose searches by identifier do not scan every resource."""

    def __init__(self, token: str | None = None) -> None:
        super().__init__(token)
        self._resources = _Resources()

    def _search(self, query: dict[str, list[str]]) -> Any:
        store = self._resources
        wanted = query.get("identifier", [])
        if not isinstance(store, _Resources) or len(wanted) != 1 or "_lastUpdated" in query:
            return super()._search(query)
        # As the fake's _matches reads the value: after the last "|", unescaped.
        value = unescape(wanted[0].rpartition("|")[2] if "|" in wanted[0] else wanted[0])
        with self._lock:
            store.local.hint = set(store.by_value.get(value, ()))
            try:
                return super()._search(query)
            finally:
                store.local.hint = None


class Lab:
    """The fake FHIR server and the reports of the benchmark's orders."""

    def __init__(self, *, results: int, pdf_mode: str, pdf_size: int,
                 latency: float = 0.0) -> None:
        self.results = results
        self.pdf_mode = pdf_mode  # "binary" (a presentedForm url) or "inline" (data)
        self.pdf = sample_pdf("Lab results (bench)", size=pdf_size)
        self.pdf_b64 = base64.b64encode(self.pdf).decode("ascii")
        self.fake = IndexedFhir(token=TOKEN)
        self.fake.start()
        if latency > 0:
            self.fake.inject("*", Fault(delay=latency), times=None)
        self.ids: list[str] = []
        self._last = datetime(2000, 1, 1, tzinfo=UTC)
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._forget, name="bench-fhir-janitor",
                                         daemon=True)
        self._janitor.start()

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    def close(self) -> None:
        self._stop.set()
        self._janitor.join(timeout=5)
        self.fake.stop()

    def _forget(self) -> None:
        while not self._stop.wait(1.0):
            self.fake.forget_searches()

    def _stamp(self, at: datetime | None = None) -> datetime:
        """``at`` (default now), cut to the millisecond, and later than every stamp before."""
        moment = at or datetime.now(UTC)
        moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
        if moment <= self._last:
            moment = self._last + timedelta(milliseconds=1)
        self._last = moment
        return moment

    # -- the reports ------------------------------------------------------------------------

    def seed(self, ids: list[str], *, first: datetime, last: datetime) -> None:
        """A pending report (registered or processing, alternately) for each order, their
        ``lastUpdated`` spread evenly from ``first`` to ``last``, and nothing else."""
        self.clear()
        self.ids = list(ids)
        self._last = datetime(2000, 1, 1, tzinfo=UTC)
        step = (last - first) / max(len(ids) - 1, 1)
        for i, external_id in enumerate(ids):
            status = "registered" if i % 2 == 0 else "partial"  # labsync: processing
            self.fake.put(report(self._rid(i), external_id, status=status, system=ORDER_SYSTEM),
                          last_updated=self._stamp(first + step * i))

    def clear(self) -> None:
        """No resource left (the request log stays: the marks count from it)."""
        for i, _external_id in enumerate(self.ids):
            self.fake.delete("DiagnosticReport", self._rid(i))
            for k in range(self.results):
                self.fake.delete("Observation", self._oid(i, k))
            self.fake.put_binary(self._bid(i), None)
        self.fake.forget_searches()

    def complete(self, i: int, at: datetime | None = None) -> datetime:
        """Order ``i``'s report turns final, with its Observations and its PDF; returns the
        report's ``lastUpdated``."""
        external_id = self.ids[i]
        moment = self._stamp(at)
        for k in range(self.results):
            low, value = Num(f"{3 + k % 4}.90"), Num(f"{4 + k % 5}.{k % 10}0")
            self.fake.put(observation(
                self._oid(i, k), f"{10000 + k}-{k % 10}", value, unit="mmol/L",
                name=f"Test {k + 1}", effectiveDateTime=moment.isoformat(),
                referenceRange=[{"low": {"value": low}, "high": {"value": Num("9.10")}}]),
                last_updated=moment)
        if self.pdf_mode == "inline":
            form = {"contentType": "application/pdf", "data": self.pdf_b64}
        else:
            self.fake.put_binary(self._bid(i), self.pdf)
            form = {"contentType": "application/pdf", "url": f"Binary/{self._bid(i)}"}
        self.fake.put(report(self._rid(i), external_id, status="final", system=ORDER_SYSTEM,
                             results=[self._oid(i, k) for k in range(self.results)],
                             issued=moment.isoformat(), presentedForm=[form]),
                      last_updated=moment)
        return moment

    @staticmethod
    def _rid(i: int) -> str:
        return f"dr-{i + 1}"

    @staticmethod
    def _oid(i: int, k: int) -> str:
        return f"obs-{i + 1}-{k + 1}"

    @staticmethod
    def _bid(i: int) -> str:
        return f"pdf-{i + 1}"

    # -- what labsync asked -----------------------------------------------------------------

    def mark(self) -> int:
        """A place in the server's request log."""
        return len(self.fake.requests)

    def requests_since(self, start: int, end: int | None = None) -> dict[str, int]:
        """The requests served between two marks, by endpoint."""
        counts = Counter(seen.endpoint for seen in self.fake.requests[start:end])
        return {name: counts.get(name, 0) for name in (*GROUPS, *sorted(counts))}


class Driver(threading.Thread):
    """Completes ``sequence`` (indices into ``lab.ids``) at ``rate`` per second, one every
    ``1/rate`` seconds from the start, for at most ``duration`` seconds; each change goes to
    ``on_change(external_id, monotonic time of the put)``."""

    def __init__(self, lab: Lab, sequence: Iterable[int], *, rate: float, duration: float,
                 on_change: Callable[[str, float], None]) -> None:
        super().__init__(name="bench-fhir-driver", daemon=True)
        self.lab, self.rate, self.duration = lab, rate, duration
        self.sequence = list(sequence)
        self.on_change = on_change
        self.stop = threading.Event()
        self.done: list[str] = []
        self.late_s = 0.0  # the most a completion started behind its schedule

    def run(self) -> None:
        started = time.monotonic()
        for k, i in enumerate(self.sequence):
            due = started + k / self.rate
            if due - started >= self.duration or self.stop.wait(max(0.0, due -
                                                                     time.monotonic())):
                break
            self.late_s = max(self.late_s, time.monotonic() - due)
            self.lab.complete(i)
            changed = time.monotonic()
            self.done.append(self.lab.ids[i])
            self.on_change(self.lab.ids[i], changed)


def completion_order(count: int, wanted: int, seed: int) -> list[int]:
    """Which orders complete, in which order: ``wanted`` of ``count``, seeded."""
    return random.Random(seed).sample(range(count), min(wanted, count))
