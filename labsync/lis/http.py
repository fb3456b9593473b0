"""The HTTP edge every HTTP-based LIS adapter shares: sessions, classification, retries.

Adapters build paths and validate what comes back; this module does everything between:
one ``requests.Session`` per thread, an optional request-rate cap, every response and
transport failure put through ``labsync.lis.classify``, and bounded retries of idempotent
GETs. Requests are built by ``request.py`` (the fast path) and bodies read by ``body.py``;
an adapter imports what it needs of both from here.

Error messages are built from a caller's label (``what``), the HTTP status and a short,
sanitised excerpt of the body: never from headers, URLs (queries carry phone numbers) or
the API key, and the original requests exception is not chained, because its text holds
the URL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import requests
import structlog
from requests.adapters import HTTPAdapter
from requests.utils import check_header_validity
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential, wait_random

from labsync import __version__
from labsync.config import LisConfig
from labsync.errors import LisError, PermanentLisError, TransientLisError
from labsync.lis.body import (
    JSON_MAX_BYTES,
    JsonNumber,
    check_json_type,
    copy_body,
    decode_json,
    read_body,
)
from labsync.lis.classify import (
    TRANSPORT_ERRORS,
    NotFound,
    classify_exception,
    classify_response,
    excerpt,
)
from labsync.lis.request import prepare, quote_id, sent_as_written

# What an adapter needs besides the transport, importable from this one place.
__all__ = ["BodyCheck", "HttpTransport", "JsonNumber", "RateLimiter", "excerpt", "quote_id"]

log = structlog.get_logger("labsync.lis")

#: ``check(head, tail)`` of a finished download: its first and last ``body.EDGE_BYTES``.
BodyCheck = Callable[[bytes, bytes], None]
Sleep = Callable[[float], None]
Clock = Callable[[], float]


class RateLimiter:
    """Spaces request starts at least ``1/rps`` seconds apart, across all threads."""

    def __init__(self, rps: float, *, sleep: Sleep = time.sleep, clock: Clock = time.monotonic):
        self._interval = 1.0 / rps
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._next: float | None = None

    def acquire(self) -> None:
        """Wait for this caller's slot."""
        # Slots are handed out under the lock, the waiting happens outside it, so threads
        # queue up in order without holding each other up longer than their slot requires.
        with self._lock:
            now = self._clock()
            slot = now if self._next is None else max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)


class _BudgetSpent(stop_base):
    """Stop once the time budget is spent, or when the next wait would overrun it.

    tenacity's own ``stop_after_delay`` reads ``time.monotonic`` itself; this one uses the
    injected clock, so tests control time, and never sleeps past the budget (a ``Retry-After``
    beyond it means giving up now rather than waking up too late to try).
    """

    def __init__(self, clock: Clock, budget: float) -> None:
        self._clock = clock
        self._deadline = clock() + budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._clock() + retry_state.upcoming_sleep > self._deadline


class HttpTransport:
    """HTTP to one LIS base URL, shared by the threads of one adapter."""

    def __init__(
        self, config: LisConfig, *, sleep: Sleep = time.sleep, clock: Clock = time.monotonic
    ) -> None:
        self._config = config
        self._sleep = sleep
        self._clock = clock
        self._base_url = config.base_url.rstrip("/")
        self._timeout = (config.connect_timeout, config.read_timeout)
        self._verify: str | bool = str(config.ca_file) if config.ca_file else True  # TLS always
        self._redact = tuple(sorted(config.secret_values(), key=len, reverse=True))
        self._local = threading.local()
        self._proxies = requests.utils.get_environ_proxies(self._base_url)
        self._plain_url = sent_as_written(self._base_url)
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._limiter = (
            RateLimiter(config.max_rps, sleep=sleep, clock=clock) if config.max_rps > 0 else None
        )
        # 0.5 s doubling to 10 s, plus up to 0.5 s of jitter so workers that failed together
        # do not all come back in the same instant.
        self._backoff = wait_exponential(multiplier=0.5, max=10.0) + wait_random(0, 0.5)

    # -- sessions -------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._config.auth_headers())  # lis.auth: X-Api-Key, …
            session.headers["Accept"] = "application/json"
            session.headers["User-Agent"] = f"labsync/{__version__}"
            # ``prepare`` sends these without requests' per-request check: check them once
            # (an API key with a line break is refused here, as requests would refuse it).
            for header in session.headers.items():
                check_header_validity(header)
            session.verify = self._verify
            # requests reads the proxy and CA variables of the environment on every request
            # (about a quarter of the HTTP CPU, measured); read them once here instead.
            session.trust_env = False
            session.proxies.update(self._proxies)
            # One LIS host; each worker thread has its own session, the pool bounds the rest.
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._config.max_concurrency)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            with self._lock:
                self._sessions.append(session)
            self._local.session = session
        return session

    def redact(self, text: str) -> str:
        """``text`` with the API key masked, for messages that quote what the LIS sent."""
        for secret in self._redact:
            text = text.replace(secret, "***")
        return text

    def _mask_key(self, body: bytes) -> bytes:
        """The API key masked in a body before anything quotes from it (an LIS that echoes
        the key must not put it into a validation message, cut or whole)."""
        for secret in self._redact:
            body = body.replace(secret.encode("utf-8"), b"***")
        return body

    def close(self) -> None:
        """Close every thread's session."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    # -- one attempt ----------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        what: str,
        not_found: NotFound = PermanentLisError,
        params: Mapping[str, str] | None = None,
        payload: Any = None,
        accept: str | None = None,
    ) -> requests.Response:
        """Send once (after the rate cap) and classify; returns a 2xx response, body unread."""
        if self._limiter is not None:
            self._limiter.acquire()
        try:
            session = self._session()
            # Session.send, not the adapter: requests-mock and hooks see every request.
            request = prepare(session, method, self._base_url + path, params=params,
                              payload=payload, accept=accept, plain_url=self._plain_url)
            response = session.send(
                request,
                timeout=self._timeout,
                # Per request, never left to requests: Session.request lets REQUESTS_CA_BUNDLE
                # override session.verify (psf/requests#3829), which would drop lis.ca_file.
                verify=self._verify,
                proxies=self._proxies,
                stream=True,
                allow_redirects=False,
            )
        except TRANSPORT_ERRORS as exc:
            raise classify_exception(exc, what) from None
        try:
            classify_response(response, what=what, not_found=not_found, redact=self._redact)
        except LisError:
            response.close()
            raise
        return response

    # -- retries --------------------------------------------------------------------------

    def _retrying(self, what: str) -> Retrying:
        """A fresh retry controller for one request; its time budget starts now."""

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, TransientLisError) and exc.retry_after is not None:
                return exc.retry_after  # the LIS said when; guessing sooner just gets another 429
            return float(self._backoff(state))

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "lis.retry",
                what=what,
                attempt=state.attempt_number,
                wait=round(state.upcoming_sleep, 3),
                error=getattr(exc, "kind", None),
                status=getattr(exc, "status", None),
                detail=str(exc),
            )

        return Retrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self._config.retry_attempts)
            | _BudgetSpent(self._clock, self._config.retry_max_seconds),
            wait=wait,
            retry=retry_if_exception_type(TransientLisError),
            before_sleep=before_sleep,
            reraise=True,
        )

    # -- requests -------------------------------------------------------------------------

    def get_json(
        self,
        path: str,
        *,
        what: str,
        not_found: NotFound = PermanentLisError,
        params: Mapping[str, str] | None = None,
        max_bytes: int = JSON_MAX_BYTES,
    ) -> Any:
        """GET ``path``, decode its JSON (numbers as ``JsonNumber``), retry what is transient."""

        def attempt() -> Any:
            deadline = self._clock() + self._config.download_timeout
            with self._send("GET", path, what=what, not_found=not_found, params=params) as resp:
                check_json_type(resp, what)
                body = b"".join(read_body(resp, what, max_bytes, deadline=deadline,
                                          clock=self._clock))
            return decode_json(self._mask_key(body), what=what)

        return self._retrying(what)(attempt)

    def stream_to(
        self,
        path: str,
        sink: BinaryIO,
        *,
        what: str,
        not_found: NotFound = PermanentLisError,
        max_bytes: int,
        check: BodyCheck | None = None,
        accept: str = "*/*",
    ) -> int:
        """GET ``path`` into ``sink`` in 64 KiB chunks; return the bytes written.

        The whole download is one retried unit: ``sink`` is rewound and truncated before each
        attempt. ``check(head, tail)``, when given, sees the first and last ``EDGE_BYTES`` of
        a complete body and raises ``BadLisData`` to refuse it (PDFs are checked by
        ``labsync.pdfs``, for every adapter alike). Errors writing to ``sink`` are the
        caller's and pass through unchanged.
        """

        def attempt() -> int:
            sink.seek(0)
            sink.truncate()
            # read_timeout bounds each read; a server dripping bytes could still hold a
            # worker for ever, so the whole download has a deadline of its own.
            deadline = self._clock() + self._config.download_timeout
            with self._send("GET", path, what=what, not_found=not_found, accept=accept) as resp:
                head, tail, total = copy_body(resp, sink, what, max_bytes, deadline=deadline,
                                              clock=self._clock)
            if check is not None:
                check(head, tail)
            sink.flush()
            return total

        return int(self._retrying(what)(attempt))

    def post_json(
        self, path: str, payload: Any, *, what: str, max_bytes: int = JSON_MAX_BYTES
    ) -> Any:
        """POST ``payload`` as JSON and decode the JSON answer. Never retried: POST creates things.

        A ``TransientLisError`` here means the outcome is unknown (the LIS may have acted).
        """
        with self._send("POST", path, what=what, payload=payload) as resp:
            check_json_type(resp, what)
            body = b"".join(read_body(resp, what, max_bytes))
        return decode_json(self._mask_key(body), what=what)
