"""A fake QLAB LIS: a real HTTP/1.1 server on localhost with scriptable orders and faults.

It speaks the QLAB API as ``CONTRACT.md`` describes it (``/v2`` base, ``X-Api-Key``, JSON;
the orders and the answers are ``qlab_api.QlabApi``'s) and serves from a daemon thread, so
clients talk to it through their real HTTP stack: connection pools, keep-alive, timeouts,
TLS. Tests script it with ``add_order``/``set_*``,
break it with ``inject(..., Fault(...))`` and read back what clients did through
``requests`` (with ``request_times``), ``request_count`` and ``max_in_flight``. Endpoint
names used throughout:
``results``, ``pdf``, ``orders`` (GET /orders), ``create`` (POST /orders); a request that
matches no route is logged as ``unknown``.

Run ``python -m labsync.testing.fake_qlab --orders 100`` for a standalone server
(``--help`` lists the options the benchmark in ``bench/perf.py`` uses: PDF size, share of
completed orders, results per order, counters printed on exit); the sample orders come
from ``qlab_samples``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from labsync.testing._faults import FaultQueue, count_requests
from labsync.testing._faultserver import Fault, FaultServer, Request, Response
from labsync.testing.qlab_api import SAMPLE_PDF, QlabApi, route
from labsync.testing.qlab_samples import sample_results, seed_orders, seed_plan

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


class FakeQlab(QlabApi):
    """The fake LIS. Thread-safe: tests change orders and faults while clients are calling.

    Orders are scripted with ``QlabApi``'s ``add_order``/``set_*``; ``created`` keeps the
    JSON bodies of accepted ``POST /orders`` requests.
    ``stop()`` then ``start()`` again serves the same orders on the same port (an outage).
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
        super().__init__(api_key)
        self.latency = latency
        self._server = FaultServer(self, host, port, ssl_context)
        self._faults: FaultQueue[Fault] = FaultQueue()
        self.requests: list[tuple[str, str, str | None]] = []
        self.request_times: list[float] = []
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
        self._faults.add(endpoint, external_id, fault, times)

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        self._faults.clear()

    def request_count(self, endpoint: str | None = None, external_id: str | None = None) -> int:
        """Requests received (authorised or not), filtered by endpoint and/or order."""
        with self._lock:
            seen = ((ep, oid) for ep, _method, oid in self.requests)
            return count_requests(seen, endpoint, external_id)

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
        endpoint, external_id, query = route(request.method, request.target)
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
        # A method of its own so that a test's subclass can decide faults its own way.
        return self._faults.take(endpoint, external_id)


# -- the command line ---------------------------------------------------------------------


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
