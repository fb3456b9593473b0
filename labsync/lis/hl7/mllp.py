"""The MLLP listener: ``<VT>message<FS><CR>`` frames over TCP, one thread per connection.

Written here, not taken from a library, because the ones at hand get the framing wrong:
hl7apy's server reads one message per connection and ignores the rest (hl7apy issue #37);
python-hl7's asyncio reader decodes every frame with one fixed encoding before it is
parsed (so MSH-18 cannot choose it), and its ``read_stream`` gives up on a message longer
than one read (python-hl7 issue #17). Here:

- several senders at once (a thread each, up to ``max_connections``), several messages per
  connection, bytes between frames (the CR after FS, stray line breaks) ignored, and a new
  ``<VT>`` inside a frame starting the frame over (the sender gave up on the last one);
- a frame is never buffered past ``max_frame`` bytes: a bigger one is answered with an
  error ACK built from its first bytes, and the connection closed;
- a connection quiet for ``idle_timeout`` is closed, mid-frame or between frames;
- only peers in ``allow`` (addresses or networks) are served; others are closed at once;
- ``close()`` stops accepting, closes idle connections, and waits for a message being
  stored to be stored and acknowledged. A frame only half received is dropped without an
  ACK: the sender sends it again.

The listener knows nothing of HL7: ``handler.message(frame, peer)`` returns the ACK for a
frame, or None to close without one (labsync could not store it: the sender must resend).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

log = structlog.get_logger("labsync.lis.hl7")

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
CHUNK = 256 * 1024
HEAD = 64 * 1024  # what of a refused frame is kept, to answer it by its MSH
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Handler(Protocol):
    def message(self, frame: bytes, peer: str) -> bytes | None: ...

    def oversize(self, head: bytes, peer: str, limit: int) -> bytes: ...


def networks(allow: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(a, strict=False) for a in allow)


def allowed(peer: str, allow: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in allow)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False  # a frame is being handled: stored and acknowledged


class MllpListener:
    """Serves MLLP on ``(host, port)`` until ``close()``; ``port`` 0 picks a free one."""

    def __init__(self, host: str, port: int, handler: Handler, *, allow: Sequence[Network],
                 max_frame: int, idle_timeout: float = 300.0, max_connections: int = 64) -> None:
        self.host, self.port = host, port
        self.handler = handler
        self.allow = tuple(allow)
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[_Connection, threading.Thread] = {}
        self._acceptor: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked)."""
        assert self._sock is not None, "not started"
        name = self._sock.getsockname()
        return name[0], name[1]

    def start(self) -> None:
        self._sock = bind(self.host, self.port)
        self._sock.listen(128)
        self._sock.settimeout(0.2)
        self._acceptor = threading.Thread(target=self._accept_loop, name="hl7-mllp-accept",
                                          daemon=True)
        self._acceptor.start()
        log.info("hl7.listening", address=f"{self.address[0]}:{self.address[1]}")

    def close(self, timeout: float = 30.0) -> None:
        """Stop: no new connection; idle ones closed; a message in hand finishes first."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            with conn.lock:
                if not conn.busy:
                    _shutdown(conn.sock)
        for thread in connections.values():
            thread.join(timeout)

    # -- accepting -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            peer = str(address[0])
            if not allowed(peer, self.allow):
                log.warning("hl7.peer_refused", peer=peer, reason="not in lis.hl7.allow")
                _shutdown(sock)
                continue
            with self._lock:
                full = len(self._connections) >= self.max_connections
            if full:
                log.warning("hl7.peer_refused", peer=peer,
                            reason=f"{self.max_connections} connections open already")
                _shutdown(sock)
                continue
            conn = _Connection(sock, peer)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"hl7-mllp-{peer}")
            with self._lock:
                self._connections[conn] = thread
            thread.start()

    # -- one connection --------------------------------------------------------------------

    def _serve(self, conn: _Connection) -> None:
        log.info("hl7.connected", peer=conn.peer)
        try:
            conn.sock.settimeout(self.idle_timeout)
            self._frames(conn)
        except TimeoutError:
            log.info("hl7.idle_closed", peer=conn.peer, idle_s=self.idle_timeout)
        except OSError as exc:
            if not self._stopping.is_set():
                log.info("hl7.connection_lost", peer=conn.peer, error=str(exc))
        except Exception:  # a bug must not take the listener down: this connection ends
            log.exception("hl7.internal_error", peer=conn.peer)
        finally:
            _shutdown(conn.sock)
            with self._lock:
                self._connections.pop(conn, None)
            log.info("hl7.disconnected", peer=conn.peer)

    def _frames(self, conn: _Connection) -> None:
        frame = bytearray()
        in_frame = False
        outside = 0  # bytes seen outside any frame: bounded too
        while not self._stopping.is_set():
            chunk = conn.sock.recv(CHUNK)
            if not chunk:
                return
            pos, size = 0, len(chunk)
            while pos < size:
                if not in_frame:
                    start = chunk.find(VT, pos)
                    outside += (size if start < 0 else start) - pos
                    if start < 0:
                        break
                    in_frame, pos = True, start + 1
                    frame.clear()
                    continue
                end, restart = chunk.find(FS, pos), chunk.find(VT, pos)
                if restart >= 0 and (end < 0 or restart < end):
                    frame.clear()
                    pos = restart + 1
                    continue
                stop = size if end < 0 else end
                if len(frame) + stop - pos > self.max_frame:
                    head = bytes(frame[:HEAD]) + chunk[pos:pos + max(0, HEAD - len(frame))]
                    self._refuse_oversize(conn, head)
                    return
                frame += chunk[pos:stop]
                if end < 0:
                    break
                pos, in_frame = end + 1, False
                if not self._handle(conn, bytes(frame)):
                    return
            if outside > self.max_frame:
                log.warning("hl7.not_mllp", peer=conn.peer, bytes=outside)
                return

    def _refuse_oversize(self, conn: _Connection, head: bytes) -> None:
        """An error ACK for a frame over the cap, then the connection closed. What is left of
        the frame is read and thrown away for a moment first: closing with unread bytes would
        reset the connection and could lose the ACK on its way."""
        log.warning("hl7.frame_too_big", peer=conn.peer, limit=self.max_frame)
        conn.sock.sendall(VT + self.handler.oversize(head, conn.peer, self.max_frame) + FS + CR)
        conn.sock.shutdown(socket.SHUT_WR)
        conn.sock.settimeout(0.5)
        deadline = time.monotonic() + 3.0
        try:
            while conn.sock.recv(CHUNK) and time.monotonic() < deadline:
                pass
        except OSError:
            pass

    def _handle(self, conn: _Connection, frame: bytes) -> bool:
        """Store and acknowledge one frame; False when the connection is to end."""
        with conn.lock:
            if self._stopping.is_set():
                return False  # never acknowledged: the sender resends it
            conn.busy = True
        try:
            ack = self.handler.message(frame, conn.peer)
            if ack is None:
                return False
            conn.sock.sendall(VT + ack + FS + CR)
            return not self._stopping.is_set()
        finally:
            with conn.lock:
                conn.busy = False


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (IPv6 when the host is), not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
