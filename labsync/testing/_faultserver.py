"""An HTTP/1.1 test server whose answers can be spoiled on purpose: the engine of fake_qlab.

The server does the wire: keep-alive connections, TLS, short or reset bodies, a prompt stop.
What to answer is an ``App``'s business (``fake_qlab.FakeQlab`` is the one in use).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import ssl
import struct
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

log = logging.getLogger("labsync.fake_qlab")

JSON_TYPE = "application/json; charset=utf-8"
# An idle keep-alive connection is dropped after this long; stop() closes them at once.
IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Fault:
    """How to spoil one response; unset fields leave the real response alone.

    A non-2xx ``status`` without ``body`` answers ``{"error": <reason>}`` as JSON rather than
    the real body. ``truncate_at`` sends the full Content-Length but only that many body bytes
    and closes; ``reset_after`` sends that many body bytes and resets the connection (RST).
    ``delay`` is waited out by the app, on top of its own latency.
    """

    status: int | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    content_type: str | None = None
    truncate_at: int | None = None
    reset_after: int | None = None

    def __post_init__(self) -> None:
        if self.truncate_at is not None and self.reset_after is not None:
            raise ValueError("a Fault has either truncate_at or reset_after, not both")
        if self.delay < 0 or min(self.truncate_at or 0, self.reset_after or 0) < 0:
            raise ValueError("delay, truncate_at and reset_after must not be negative")


@dataclass
class Response:
    """An answer before any fault."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: Any) -> Response:
    """``payload`` as UTF-8 JSON."""
    return Response(status, json.dumps(payload, ensure_ascii=False).encode())


def error_response(status: int, message: str) -> Response:
    """``{"error": message}``."""
    return json_response(status, {"error": message})


@dataclass(frozen=True)
class Request:
    """What the app gets: the request line's method and target, headers and body."""

    method: str
    target: str
    headers: Message
    body: bytes


class App(Protocol):
    """Decides the answer to a request; None drops it unanswered (the server is stopping)."""

    def handle(
        self, request: Request, stopping: threading.Event
    ) -> tuple[Response, Fault | None] | None: ...


def spoil(response: Response, fault: Fault | None) -> Response:
    """``response`` with ``fault``'s status, body and headers (not its wire effects)."""
    if fault is None:
        return response
    status, body, content_type = response.status, response.body, response.content_type
    if fault.status is not None:
        status = fault.status
        if not 200 <= status < 300:
            try:
                reason = HTTPStatus(status).phrase.lower()
            except ValueError:
                reason = "error"
            body, content_type = error_response(status, reason).body, JSON_TYPE
    if fault.body is not None:
        body = fault.body
    if fault.content_type is not None:
        content_type = fault.content_type
    return Response(status, body, content_type, {**response.headers, **fault.headers})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall
    server_version = "FakeQLAB/2"
    timeout = IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, not in the accepting thread

    def do_GET(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # a body we cannot delimit: answer, then hang up
            self._send(error_response(400 if length < 0 else 411, "give a Content-Length"), None)
            return
        body = self.rfile.read(length) if length else b""
        request = Request(self.command, self.path, self.headers, body)
        answer = self.server.app.handle(request, self.server.stopping)
        if answer is None:
            self.close_connection = True
            return
        response, fault = answer
        self._send(spoil(response, fault), fault)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _send(self, response: Response, fault: Fault | None) -> None:
        cut = None
        if fault is not None:
            cut = fault.truncate_at if fault.reset_after is None else fault.reset_after
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body[:cut])
        except OSError:  # the client gave up (its read timeout) and closed
            self.close_connection = True
            return
        if fault is not None and fault.reset_after is not None:
            # Linger 0 makes close() send RST. The descriptor really closes when the handler's
            # file objects do, before socketserver could shut it down gracefully (FIN).
            linger = struct.pack("ii", 1, 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()
        if cut is not None:
            self.close_connection = True

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App, stopping: threading.Event) -> None:
        self.app, self.stopping = app, stopping
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Wake every handler blocked reading its next keep-alive request."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown: SSLSocket's own would pull the TLS object from
                # under the handler thread that is reading through it.
                socket.socket.shutdown(connection, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # a client hung up, a TLS handshake failed
            log.debug("fake_qlab: connection from %s failed", client_address, exc_info=True)
        else:
            log.exception("fake_qlab: error serving %s", client_address)


class FaultServer:
    """Serves an ``App`` on ``host:port`` from a daemon thread; restartable on the same port."""

    def __init__(self, app: App, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self._app, self.host, self.port, self.ssl_context = app, host, port, ssl_context
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Bind (remembering the port for a restart) and start serving."""
        if self._server is not None:
            raise RuntimeError("the server is already running")
        self._stopping.clear()
        server = _Server((self.host, self.port), self._app, self._stopping)
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-qlab-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and drop every open connection, idle keep-alive ones included."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # wakes handlers waiting out a latency or a fault's delay
        server.shutdown()
        server.server_close()
        server.drop_connections()
        thread.join(timeout=5)
        self._server = self._thread = None
