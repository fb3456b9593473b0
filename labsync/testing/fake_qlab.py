"""A fake QLAB LIS: a real HTTP/1.1 server on localhost with scriptable orders and faults.

It speaks the QLAB API as ``CONTRACT.md`` describes it (``/v2`` base, ``X-Api-Key``, JSON)
and serves from a daemon thread, so clients talk to it through their real HTTP stack:
connection pools, keep-alive, timeouts, TLS. Tests script it with ``add_order``/``set_*``,
break it with ``inject(..., Fault(...))`` and read back what clients did through
``requests`` (with ``request_times``), ``request_count`` and ``max_in_flight``. Endpoint
names used throughout:
``results``, ``pdf``, ``orders`` (GET /orders), ``create`` (POST /orders); a request that
matches no route is logged as ``unknown``.

Run ``python -m labsync.testing.fake_qlab --orders 100`` for a standalone server
(``--help`` lists the options the benchmark in ``bench/perf.py`` uses: PDF size, share of
completed orders, results per order, counters printed on exit).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import itertools
import json
import math
import re
import signal
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from labsync.testing._faultserver import (
    Fault,
    FaultServer,
    Request,
    Response,
    error_response,
    json_response,
)
from labsync.testing.pdfs import sample_pdf

__all__ = [
    "ENDPOINTS",
    "SAMPLE_PDF",
    "FakeQlab",
    "Fault",
    "main",
    "sample_results",
    "seed_orders",
    "seed_plan",
]

ENDPOINTS = frozenset({"results", "pdf", "orders", "create", "*"})
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


@dataclass
class _Injection:
    external_id: str | None
    endpoint: str
    fault: Fault
    remaining: int | None


class FakeQlab:
    """The fake LIS. Thread-safe: tests change orders and faults while clients are calling.

    ``stop()`` then ``start()`` again serves the same orders on the same port (an outage).
    ``created`` keeps the JSON bodies of accepted ``POST /orders`` requests.
    ``request_times[i]`` is the ``time.monotonic()`` at which ``requests[i]`` arrived.
    """

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self._server = FaultServer(self, host, port, ssl_context)
        self._lock = threading.Lock()
        self._orders: dict[str, _Order] = {}
        self._faults: list[_Injection] = []
        self._ids = itertools.count(1)
        self.requests: list[tuple[str, str, str | None]] = []
        self.request_times: list[float] = []
        self.created: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> FakeQlab:
        """Bind and serve from a daemon thread; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection, idle keep-alive ones included."""
        self._server.stop()

    def __enter__(self) -> FakeQlab:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (kept after ``stop()`` so a restart reuses it)."""
        if self._server.port == 0:
            raise RuntimeError("start() the fake QLAB first")
        return self._server.port

    @property
    def base_url(self) -> str:
        """``http(s)://HOST:PORT/v2``, as a client's ``lis.base_url``."""
        scheme = "http" if self._server.ssl_context is None else "https"
        host = self._server.host
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}/v2"

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
    ) -> None:
        """Add (or replace) an order. ``results_body`` is served verbatim by ``/results``.

        ``status`` is not checked, so a test can serve one the contract does not know.
        """
        order = _Order(
            status=status,
            results=json.loads(json.dumps(results or [])),  # a deep copy the caller can't touch
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

    # -- faults and counters ----------------------------------------------------------------

    def inject(
        self, external_id: str | None, endpoint: str, fault: Fault, times: int | None = 1
    ) -> None:
        """Spoil the next ``times`` matching responses (None: all of them), FIFO among faults.

        ``external_id`` None matches any request of ``endpoint``; ``endpoint`` ``"*"`` matches
        every request, unknown routes included.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, not {endpoint!r}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for forever")
        with self._lock:
            self._faults.append(_Injection(external_id, endpoint, fault, times))

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._faults.clear()

    def request_count(self, endpoint: str | None = None, external_id: str | None = None) -> int:
        """Requests received (authorised or not), filtered by endpoint and/or order."""
        with self._lock:
            return sum(
                1
                for ep, _method, oid in self.requests
                if endpoint in (None, ep) and external_id in (None, oid)
            )

    def counters(self) -> dict[str, Any]:
        """Requests so far (in all and by endpoint) and the most ever in flight at once."""
        with self._lock:
            by_endpoint = Counter(endpoint for endpoint, _method, _oid in self.requests)
            return {
                "requests": len(self.requests),
                "by_endpoint": dict(sorted(by_endpoint.items())),
                "max_in_flight": self.max_in_flight,
            }

    def reset_counters(self) -> None:
        """Clear the request log; ``max_in_flight`` restarts from the requests in flight now."""
        with self._lock:
            self.requests.clear()
            self.request_times.clear()
            self.max_in_flight = self.in_flight

    # -- serving (called from handler threads) ----------------------------------------------

    def handle(
        self, request: Request, stopping: threading.Event
    ) -> tuple[Response, Fault | None] | None:
        """Answer one request: the ``App`` hook of the server. None when stopping meanwhile."""
        endpoint, external_id, query = _route(request.method, request.target)
        with self._handling(endpoint, request.method, external_id):
            fault = self._take_fault(endpoint, external_id)
            wait = self.latency + (fault.delay if fault else 0.0)
            if wait > 0 and stopping.wait(wait):
                return None
            api_key = request.headers.get("X-Api-Key")
            return self._respond(endpoint, external_id, query, request.body, api_key), fault

    @contextlib.contextmanager
    def _handling(self, endpoint: str, method: str, external_id: str | None) -> Iterator[None]:
        with self._lock:
            self.requests.append((endpoint, method, external_id))
            self.request_times.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def _take_fault(self, endpoint: str, external_id: str | None) -> Fault | None:
        with self._lock:
            for index, injection in enumerate(self._faults):
                wanted_id = injection.external_id
                if injection.endpoint in ("*", endpoint) and wanted_id in (None, external_id):
                    if injection.remaining is not None:
                        injection.remaining -= 1
                        if injection.remaining == 0:
                            del self._faults[index]
                    return injection.fault
        return None

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


def _route(method: str, target: str) -> tuple[str, str | None, dict[str, list[str]]]:
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


# -- sample data and the command line -------------------------------------------------------

_SAMPLE_TESTS: tuple[tuple[str, str, float | str, str | None, float | None, float | None], ...] = (
    ("HGB", "Гемоглобин", 142, "г/л", 120, 160),
    ("WBC", "Лейкоциты", 6.4, "10^9/л", 4.0, 9.0),
    ("RBC", "Эритроциты", 4.7, "10^12/л", 3.8, 5.3),
    ("PLT", "Тромбоциты", 251, "10^9/л", 150, 400),
    ("GLU", "Глюкоза", 6.3, "ммоль/л", 3.9, 6.1),
    ("CHOL", "Холестерин общий", 5.2, "ммоль/л", None, 5.2),
    ("ALT", "АЛТ", 24, "Ед/л", None, 41),
    ("CREA", "Креатинин", 88, "мкмоль/л", 62, 106),
    ("TSH", "ТТГ", 2.1, "мЕд/л", 0.4, 4.0),
    ("HCV", "Антитела к HCV", "negative", None, None, None),
)


def sample_results(
    count: int = 10, *, result_date: str = "2024-05-14T10:30:00+03:00"
) -> list[dict[str, Any]]:
    """``count`` plausible QLAB results (a blood panel; codes repeat with a suffix past 10)."""
    results = []
    for i in range(count):
        code, name, value, unit, ref_min, ref_max = _SAMPLE_TESTS[i % len(_SAMPLE_TESTS)]
        abnormal = isinstance(value, float | int) and not (
            (ref_min is None or value >= ref_min) and (ref_max is None or value <= ref_max)
        )
        suffix = f"-{i // len(_SAMPLE_TESTS)}" if i >= len(_SAMPLE_TESTS) else ""
        results.append(
            {
                "code": code + suffix,
                "name": name,
                "value": value,
                "unit": unit,
                "ref_min": ref_min,
                "ref_max": ref_max,
                "abnormal": abnormal,
                "result_date": result_date,
            }
        )
    return results


def seed_plan(
    count: int, *, prefix: str = "QL-", completed_ratio: float = 0.5
) -> list[tuple[str, bool]]:
    """``(external_id, completed)`` of the orders ``seed_orders`` adds, in order.

    Completed orders are spread evenly: order ``i`` is completed when ``ceil((i+1)·r)`` steps
    past ``ceil(i·r)``, so the first is, and exactly ``ceil(count·r)`` of them are; with the
    default ½, the even ones.
    """
    if not 0 <= completed_ratio <= 1:
        raise ValueError("completed_ratio must be between 0 and 1")
    ratio = Fraction(str(completed_ratio))  # exact: no float drift over 100,000 orders
    return [
        (f"{prefix}{i + 1:06d}", math.ceil((i + 1) * ratio) > math.ceil(i * ratio))
        for i in range(count)
    ]


def seed_orders(
    fake: FakeQlab,
    count: int,
    *,
    prefix: str = "QL-",
    completed_ratio: float = 0.5,
    results: int = 10,
    pdf_size: int | None = None,
) -> list[str]:
    """Add ``count`` orders (``seed_plan``): completed ones with ``results`` results and a PDF,
    the others processing.

    Without ``pdf_size`` each completed order gets its own small PDF naming it. With it, every
    completed order shares one PDF of exactly ``pdf_size`` bytes, and all share one results
    list, so 100,000 orders fit in memory (nothing in the fake changes a list in place).
    """
    shared_pdf = None if pdf_size is None else sample_pdf("Lab results", size=pdf_size)
    shared_results = json.loads(json.dumps(sample_results(results)))
    ids = []
    for i, (external_id, completed) in enumerate(
        seed_plan(count, prefix=prefix, completed_ratio=completed_ratio)
    ):
        patient = {
            "phone": f"+7999{i:07d}",
            "last_name": "Иванова",
            "first_name": "Анна",
            "birth_date": "1985-03-21",
        }
        if completed:
            pdf = shared_pdf or sample_pdf(f"Lab results {external_id}")
            order = _Order("completed", shared_results, pdf, patient, date.today().isoformat())
        else:
            order = _Order("processing", [], None, patient, date.today().isoformat())
        with fake._lock:
            fake._orders[external_id] = order
        ids.append(external_id)
    return ids


def main(argv: list[str] | None = None) -> int:
    """Serve a seeded fake QLAB until Ctrl-C or SIGTERM.

    The first line on stdout is the base URL. With ``--stats``, one JSON line of counters
    (``FakeQlab.counters``, with ``--times`` also ``request_times``) follows when the server
    stops.
    """
    parser = argparse.ArgumentParser(
        prog="python -m labsync.testing.fake_qlab", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--orders", type=int, default=10, help="orders to seed (default 10)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per response")
    parser.add_argument("--prefix", default="QL-", help="order id prefix (default QL-)")
    parser.add_argument(
        "--completed-ratio",
        type=float,
        default=0.5,
        help="share of the orders that are completed, spread evenly (default 0.5)",
    )
    parser.add_argument(
        "--results", type=int, default=10, help="results per completed order (default 10)"
    )
    parser.add_argument(
        "--pdf-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="every completed order serves one shared PDF of exactly this size",
    )
    parser.add_argument(
        "--stats", action="store_true", help="print the request counters as JSON on exit"
    )
    parser.add_argument(
        "--times", action="store_true",
        help="with --stats: also each request's arrival (time.monotonic(), this machine's clock)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.completed_ratio <= 1:
        parser.error("--completed-ratio must be between 0 and 1")
    fake = FakeQlab(args.api_key, host=args.host, port=args.port, latency=args.latency)
    seed_orders(
        fake,
        args.orders,
        prefix=args.prefix,
        completed_ratio=args.completed_ratio,
        results=args.results,
        pdf_size=args.pdf_size,
    )
    stop = threading.Event()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if on_main else None
    with fake:
        print(fake.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    if on_main:
        signal.signal(signal.SIGTERM, previous)
    if args.stats:
        counters = fake.counters()
        if args.times:
            counters["request_times"] = list(fake.request_times)
        sys.stdout.write(json.dumps(counters) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
