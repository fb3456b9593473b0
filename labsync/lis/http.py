"""The HTTP edge every HTTP-based LIS adapter shares: sessions, classification, retries.

Adapters build paths and validate what comes back; this module does everything between:
one ``requests.Session`` per thread, an optional request-rate cap, every response and
transport failure put through ``labsync.lis.classify``, and bounded retries of idempotent
GETs.

Error messages are built from a caller's label (``what``), the HTTP status and a short,
sanitised excerpt of the body: never from headers, URLs (queries carry phone numbers) or
the API key, and the original requests exception is not chained, because its text holds
the URL.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO, NoReturn
from urllib.parse import quote, urlencode

import requests
import structlog
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import check_header_validity
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential, wait_random

from labsync import __version__
from labsync.config import LisConfig
from labsync.errors import BadLisData, LisError, PermanentLisError, TransientLisError
from labsync.lis.classify import (
    NotFound,
    classify_exception,
    classify_response,
    excerpt,
)

log = structlog.get_logger("labsync.lis")

CHUNK_BYTES = 64 * 1024
JSON_MAX_BYTES = 10 * 1024 * 1024
EDGE_BYTES = 1024  # how much of a download's start and end ``stream_to`` hands to ``check``

_MEDIA_TYPE = re.compile(r"^[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}$")

#: ``check(head, tail)`` of a finished download: its first and last ``EDGE_BYTES`` bytes.
BodyCheck = Callable[[bytes, bytes], None]
Sleep = Callable[[float], None]
Clock = Callable[[], float]


class JsonNumber(str):
    """A JSON number as its literal text, exactly as sent: ``5.40`` stays ``"5.40"``.

    Lab values are shown as the lab wrote them; a float would turn ``5.40`` into ``5.4``
    and ``1e308`` into ``1e+308``.
    """

    __slots__ = ()


def quote_id(external_id: str) -> str:
    """``external_id`` as one URL path segment: ``a/b`` and ``../x`` cannot change the path."""
    # "." and ".." survive quoting and would be resolved as dot segments by urllib3.
    if not isinstance(external_id, str) or external_id in ("", ".", ".."):
        raise PermanentLisError(f"order id {excerpt(repr(external_id))} cannot be used in a URL")
    try:
        return quote(external_id, safe="")
    except UnicodeEncodeError:  # a lone surrogate
        raise PermanentLisError(
            f"order id {excerpt(repr(external_id))} is not valid text"
        ) from None


_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)


def _sent_as_written(base_url: str) -> bool:
    """Whether requests sends ``base_url``, a quoted path and a query exactly as written.

    Then ``_request`` may build a GET's URL by concatenation. requests rewrites some base
    URLs (an IDNA host, ``..`` segments, a space, ``%41``, ``user:pass@`` turned into an
    Authorization header) and refuses others; those keep requests' full preparation on
    every request, its errors included.
    """
    probe = requests.PreparedRequest()
    try:
        probe.prepare(method="GET", url=base_url + "/x", params={"a": "b"})
    except (requests.RequestException, ValueError):  # a UnicodeError too: left to each request
        return False
    return probe.url == base_url + "/x?a=b" and "Authorization" not in probe.headers


def _body(response: requests.Response, what: str, max_bytes: int, *,
          deadline: float | None = None, clock: Clock = time.monotonic) -> Iterator[bytes]:
    """The body in chunks of up to 64 KiB, refused past ``max_bytes`` without reading on.

    A reset mid-body, fewer bytes than Content-Length promised, or a body still coming in at
    ``deadline`` (a ``clock`` value) is a ``TransientLisError``. Reads return whatever has
    arrived (``read1``), so a server dripping bytes meets the deadline too, not just one
    that stops: ``read_timeout`` bounds each read, the deadline the whole body.
    """
    # Content-Length counts the bytes on the wire; with compression we count decoded bytes.
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    length = response.headers.get("Content-Length", "")
    declared = int(length) if encoding == "identity" and length.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise BadLisData(f"{what}: the body is larger than {max_bytes} bytes")
    received = 0
    try:
        for chunk in _reads(response):
            if deadline is not None and clock() > deadline:
                raise TransientLisError(f"{what}: the body was still coming in after the "
                                        "download time limit (lis.download_timeout)")
            received += len(chunk)
            if received > max_bytes:
                raise BadLisData(f"{what}: the body is larger than {max_bytes} bytes")
            yield chunk
    except _TRANSPORT_ERRORS as exc:
        raise classify_exception(exc, what) from None
    # urllib3 notices a short body on real sockets; this also covers transports that do not.
    if declared is not None and received < declared:
        raise TransientLisError(f"{what}: the body was cut short ({received} of {declared} bytes)")


def _reads(response: requests.Response) -> Iterator[bytes]:
    """Chunks of the body as they arrive (decoded), at most ``CHUNK_BYTES`` each."""
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # a transport without urllib3 underneath
        yield from response.iter_content(CHUNK_BYTES)
        return
    while chunk := read1(CHUNK_BYTES, decode_content=True):
        yield chunk


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number")


def decode_json(body: bytes, *, what: str) -> Any:
    """Parse ``body``, numbers as ``JsonNumber``; NaN, Infinity and bad JSON are ``BadLisData``."""
    try:
        return json.loads(
            body, parse_float=JsonNumber, parse_int=JsonNumber, parse_constant=_reject_constant
        )
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadLisData(f"{what}: not valid JSON ({excerpt(str(exc))})") from None
    except RecursionError:
        raise BadLisData(f"{what}: JSON nested too deeply") from None


def _check_json_type(response: requests.Response, what: str) -> None:
    """A 200 HTML error page from a proxy must not reach the JSON parser as data."""
    content_type = response.headers.get("Content-Type")
    if content_type is None:
        return  # some servers omit it; the parser still refuses anything that is not JSON
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        shown = media if _MEDIA_TYPE.match(media) else "an unreadable media type"
        raise BadLisData(f"{what}: expected JSON, got {shown}")


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
        self._plain_url = _sent_as_written(self._base_url)
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
            # ``_request`` sends these without requests' per-request check: check them once
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

    def _request(
        self,
        session: requests.Session,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        payload: Any,
        accept: str | None,
    ) -> requests.PreparedRequest:
        """The request ``session.request`` would send, built without its merge steps.

        requests 2.34 merges session and request settings through runtime-checkable
        Protocol ``isinstance`` tests: about a fifth of a small request's CPU, measured.
        This session has only headers and cookies to merge. A GET is put together directly
        (its path is quoted already, see ``quote_id``); a POST (rare) or an unusual base URL
        keeps requests' full preparation.
        """
        headers: CaseInsensitiveDict[str | bytes] = CaseInsensitiveDict(session.headers)
        if accept:
            headers["Accept"] = accept
        url = self._base_url + path
        request = requests.PreparedRequest()
        if method != "GET" or payload is not None or not self._plain_url:
            request.prepare(method=method, url=url, headers=headers, params=params,
                            json=payload, cookies=session.cookies)
            return request
        request.method = method
        request.url = f"{url}?{urlencode(params)}" if params else url
        request.headers = headers
        request.prepare_cookies(session.cookies)  # also what a redirect response needs
        return request

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
            response = session.send(
                self._request(session, method, path, params, payload, accept),
                timeout=self._timeout,
                # Per request, never left to requests: Session.request lets REQUESTS_CA_BUNDLE
                # override session.verify (psf/requests#3829), which would drop lis.ca_file.
                verify=self._verify,
                proxies=self._proxies,
                stream=True,
                allow_redirects=False,
            )
        except _TRANSPORT_ERRORS as exc:
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
                _check_json_type(resp, what)
                body = b"".join(_body(resp, what, max_bytes, deadline=deadline,
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
                head, tail, total = b"", b"", 0
                for chunk in _body(resp, what, max_bytes, deadline=deadline,
                                   clock=self._clock):
                    total += len(chunk)
                    if len(head) < EDGE_BYTES:
                        head += chunk[: EDGE_BYTES - len(head)]
                    tail = (tail + chunk[-EDGE_BYTES:])[-EDGE_BYTES:]
                    sink.write(chunk)
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
            _check_json_type(resp, what)
            body = b"".join(_body(resp, what, max_bytes))
        return decode_json(self._mask_key(body), what=what)
