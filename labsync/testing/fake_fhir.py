"""A fake FHIR R4 server: real HTTP/1.1 on localhost, scriptable resources, injectable faults.

It serves ``fhir_api.FhirApi`` (DiagnosticReport searches and feeds with includes and
paging, Observation and Binary reads) at ``http://127.0.0.1:PORT/fhir`` through
``_faultserver``, like the fake QLAB, so the adapter talks to it through its real HTTP
stack. It is the server for what a real FHIR server will not do on demand: 401, 429 with
``Retry-After``, 5xx, slow answers, garbage, a ``next`` link to another host, a number
served as ``5.40``, a Binary as raw PDF or as JSON. ``DripServer`` serves a body slowly,
a few bytes at a time.

Endpoints (for ``inject`` and ``request_count``): ``search`` (by identifier; key: the
identifier's value), ``feed`` (by ``_lastUpdated``), ``page`` (a ``next`` link; key: the
stored search), ``observation`` and ``binary`` (key: the id), ``metadata``, ``unknown``;
``"*"`` matches them all.
"""

from __future__ import annotations

import contextlib
import socketserver
import threading
from dataclasses import dataclass

from labsync.testing._faults import FaultQueue, count_requests
from labsync.testing._faultserver import Fault, FaultServer, Request, Response
from labsync.testing.fhir_api import FhirApi, Num, dumps, loads, observation, outcome, report

__all__ = ["DripServer", "FakeFhir", "Fault", "FhirApi", "Num", "dumps", "loads",
           "observation", "report"]

ENDPOINTS = frozenset({"search", "feed", "page", "observation", "binary", "metadata",
                       "unknown", "*"})


@dataclass(frozen=True)
class Seen:
    """One request as the server got it."""

    endpoint: str
    key: str | None
    target: str
    authorization: str | None
    accept: str | None


class FakeFhir(FhirApi):
    """The fake server. ``token``: the Bearer token it wants (None: it wants none).

    ``requests`` lists every request (``Seen``); ``stop()`` then ``start()`` serves the same
    resources on the same port.
    """

    def __init__(self, token: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 base_path: str = "/fhir") -> None:
        super().__init__(base_path)
        self.token = token
        self._server = FaultServer(self, host, port, None)
        self._faults: FaultQueue[Fault] = FaultQueue()
        self.requests: list[Seen] = []

    def start(self) -> FakeFhir:
        self._server.start()
        self.base_url = f"http://{self._server.host}:{self._server.port}{self.base_path}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeFhir:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults and counters ----------------------------------------------------------------

    def inject(self, endpoint: str, fault: Fault, *, key: str | None = None,
               times: int | None = 1) -> None:
        """Spoil the next ``times`` answers of ``endpoint`` (for ``key`` only, if given);
        None: all of them. Faults apply in the order they were injected."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, not {endpoint!r}")
        self._faults.add(endpoint, key, fault, times)

    def clear_faults(self) -> None:
        self._faults.clear()

    def request_count(self, endpoint: str | None = None, key: str | None = None) -> int:
        with self._lock:
            return count_requests(((s.endpoint, s.key) for s in self.requests), endpoint, key)

    def targets(self, endpoint: str | None = None) -> list[str]:
        """The request targets (path and query, as sent) of ``endpoint``'s requests."""
        with self._lock:
            return [s.target for s in self.requests if endpoint in (None, s.endpoint)]

    # -- serving ----------------------------------------------------------------------------

    def handle(self, request: Request, stopping: threading.Event
               ) -> tuple[Response, Fault | None] | None:
        endpoint, key, query, _path = self.route(request.target)
        authorization = request.headers.get("Authorization")
        accept = request.headers.get("Accept") or ""
        with self._lock:
            self.requests.append(Seen(endpoint, key, request.target, authorization, accept))
        fault = self._faults.take(endpoint, key)
        if fault is not None and fault.delay and stopping.wait(fault.delay):
            return None
        if self.token is not None and authorization != f"Bearer {self.token}":
            return outcome(401, "a valid Bearer token is required"), fault
        if request.method != "GET":
            return outcome(405, "labsync only reads"), fault
        return self.answer(endpoint, key, query, accept), fault


class DripServer:
    """Answers every request with ``body`` (JSON), ``chunk`` bytes every ``interval``
    seconds: a body that keeps coming, slowly, with a correct Content-Length."""

    def __init__(self, body: bytes, *, chunk: int = 8, interval: float = 0.05,
                 content_type: str = "application/fhir+json") -> None:
        self.body, self.chunk, self.interval = body, chunk, interval
        self.content_type = content_type
        self._stopping = threading.Event()
        drip = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    head = (f"HTTP/1.1 200 OK\r\nContent-Type: {drip.content_type}\r\n"
                            f"Content-Length: {len(drip.body)}\r\nConnection: close\r\n\r\n")
                    self.wfile.write(head.encode())
                    for start in range(0, len(drip.body), drip.chunk):
                        if drip._stopping.wait(drip.interval):
                            return
                        self.wfile.write(drip.body[start:start + drip.chunk])

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                         kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/fhir"

    def __enter__(self) -> DripServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
