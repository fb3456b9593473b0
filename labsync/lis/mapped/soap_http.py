"""zeep's HTTP, kept to labsync's rules: one session per thread, TLS always verified, no
redirects, bodies read within a size cap and a deadline, every failure classified by
``labsync.lis.classify``, and the same retries as every other HTTP adapter.

zeep sends through a ``Transport``; ``LabsyncTransport`` is one whose ``post_xml`` and
``load`` go through the sessions and checks here. What an HTTP status or a transport
failure means is decided by ``classify_response`` / ``classify_exception``; a SOAP fault
(an answer, whatever its HTTP status) is left for zeep to parse and ``soap.py`` to map.
The body of each answer, secrets masked, is kept per thread for the caller (``exchange``):
the dry run shows it as received.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import requests
import structlog
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential, wait_random
from zeep.transports import Transport
from zeep.wsdl.utils import etree_to_string

from labsync import __version__
from labsync.config import LisConfig
from labsync.errors import TransientLisError
from labsync.lis.body import read_body
from labsync.lis.classify import TRANSPORT_ERRORS, classify_exception, classify_response
from labsync.lis.http import RateLimiter

log = structlog.get_logger("labsync.lis")

WSDL_MAX_BYTES = 10 * 1024 * 1024
_FAULT_STATUSES = (400, 500)  # SOAP 1.1 sends faults with 500, SOAP 1.2 sender faults 400


@dataclass
class Exchange:
    """One SOAP call's HTTP side, as the calling thread sees it."""

    what: str
    max_bytes: int
    body: bytes = b""  # the answer as received, secrets masked


class LabsyncTransport(Transport):
    """A zeep transport over labsync's HTTP rules; safe for many threads at once."""

    def __init__(self, config: LisConfig, headers: dict[str, str], secrets: Sequence[str], *,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(timeout=config.read_timeout, operation_timeout=config.read_timeout)
        self._config = config
        self._headers = headers
        self._secrets = tuple(sorted((s for s in secrets if s), key=len, reverse=True))
        self._timeout = (config.connect_timeout, config.read_timeout)
        self._verify: str | bool = str(config.ca_file) if config.ca_file else True
        self._sleep, self._clock = sleep, clock
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._limiter = (RateLimiter(config.max_rps, sleep=sleep, clock=clock)
                         if config.max_rps > 0 else None)
        self._backoff = wait_exponential(multiplier=0.5, max=10.0) + wait_random(0, 0.5)

    # -- sessions ---------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            session.headers["User-Agent"] = f"labsync/{__version__}"
            session.verify = self._verify
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._config.max_concurrency)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            with self._lock:
                self._sessions.append(session)
            self._local.session = session
        return session

    def close(self) -> None:
        """Close every thread's session."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    def mask(self, data: bytes) -> bytes:
        """``data`` with every secret masked, before anything quotes from it."""
        for secret in self._secrets:
            data = data.replace(secret.encode("utf-8"), b"***")
        return data

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- one call ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def exchange(self, what: str, max_bytes: int) -> Iterator[Exchange]:
        """The context of one SOAP call in this thread: its label for messages, its body cap;
        afterwards, the body as received."""
        exchange = Exchange(what, max_bytes)
        self._local.exchange = exchange
        try:
            yield exchange
        finally:
            self._local.exchange = None

    def post_xml(self, address: str, envelope: Any, headers: dict[str, str]) -> Any:
        """POST the envelope once; an answer that is not a SOAP answer or fault is classified
        here, and the body is read within the cap, then handed to zeep."""
        exchange: Exchange = getattr(self._local, "exchange", None) or Exchange("SOAP call",
                                                                                 WSDL_MAX_BYTES)
        if self._limiter is not None:
            self._limiter.acquire()
        message = etree_to_string(envelope)
        try:
            response = self._session().post(
                address, data=message, headers=headers, timeout=self._timeout,
                verify=self._verify, stream=True, allow_redirects=False)
        except TRANSPORT_ERRORS as exc:
            raise classify_exception(exc, exchange.what) from None
        with response:
            deadline = self._clock() + self._config.download_timeout
            body = self.mask(b"".join(read_body(response, exchange.what, exchange.max_bytes,
                                                deadline=deadline, clock=self._clock)))
        exchange.body = body
        response._content, response._content_consumed = body, True
        if response.status_code != 200 and not (
                response.status_code in _FAULT_STATUSES and _is_fault(body)):
            # 401/403 (even with a fault), 404 (a wrong endpoint), 429, 5xx, redirects
            classify_response(response, what=exchange.what, redact=self._secrets)
        return response

    def load(self, url: str) -> bytes:
        """A WSDL or schema document: a file, or a GET classified like any LIS request."""
        if not url.startswith(("http://", "https://")):
            return bytes(super().load(url))
        what = f"WSDL document {url.split('?', 1)[0]}"
        try:
            response = self._session().get(url, timeout=self._timeout, verify=self._verify,
                                           stream=True, allow_redirects=False)
        except TRANSPORT_ERRORS as exc:
            raise classify_exception(exc, what) from None
        with response:
            classify_response(response, what=what, redact=self._secrets)
            return b"".join(read_body(response, what, WSDL_MAX_BYTES,
                                      deadline=self._clock() + self._config.download_timeout,
                                      clock=self._clock))

    # -- retries ----------------------------------------------------------------------------

    def retrying(self, what: str) -> Retrying:
        """Retries of what is transient, as ``lis/http.py`` does them: ``lis.retry_attempts``
        tries within ``lis.retry_max_seconds``, 0.5 s doubling to 10 s with jitter, or the
        LIS's ``Retry-After``; each wait logged as ``lis.retry``."""

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, TransientLisError) and exc.retry_after is not None:
                return exc.retry_after
            return float(self._backoff(state))

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("lis.retry", what=what, attempt=state.attempt_number,
                        wait=round(state.upcoming_sleep, 3), error=getattr(exc, "kind", None),
                        status=getattr(exc, "status", None), detail=str(exc))

        return Retrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self._config.retry_attempts)
            | _BudgetSpent(self._clock, self._config.retry_max_seconds),
            wait=wait, retry=retry_if_exception_type(TransientLisError),
            before_sleep=before_sleep, reraise=True)


class _BudgetSpent(stop_base):
    """Stop once the time budget is spent, or when the next wait would overrun it (the
    injected clock, so tests control time)."""

    def __init__(self, clock: Callable[[], float], budget: float) -> None:
        self._clock = clock
        self._deadline = clock() + budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return bool(self._clock() + retry_state.upcoming_sleep > self._deadline)


def _is_fault(body: bytes) -> bool:
    """Whether ``body`` looks like a SOAP envelope holding a Fault (zeep parses it properly)."""
    head = body[:4096]
    return b"Envelope" in head and b"Fault" in body[:65536]
