"""The one place that says what an LIS answer or a transport failure means.

``classify_response`` turns a non-2xx response into the ``labsync.errors`` tree and
``classify_exception`` does the same for a requests/urllib3 failure: transient (timeouts,
resets, 5xx, 429 with its ``Retry-After``), permanent (other 4xx; 401/403 is a bad key),
or bad data. Messages carry the caller's label, the status and a short, sanitised excerpt of
the body: never headers, URLs (queries carry phone numbers) or the API key.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
import urllib3.exceptions

from labsync.errors import (
    BadLisData,
    LisAuthError,
    LisError,
    PdfNotReady,
    PermanentLisError,
    TransientLisError,
    UnknownOrder,
)

EXCERPT_CHARS = 200
# C0/C1 controls, zero-width and bidi-override characters: they could forge log lines or
# reorder an operator's terminal, so an excerpt shows "?" instead.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_DELTA_SECONDS = re.compile(r"^\s*(\d+)\s*$")

NotFound = type[PermanentLisError]
# What a failure of the transport itself raises: ``classify_exception`` says what each means.
TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    A date in the past gives 0; a missing or unparseable value gives None.
    """
    if not value:
        return None
    match = _DELTA_SECONDS.match(value)
    if match:
        return float(match.group(1))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with unknown origin (RFC 5322)
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, delta)


def excerpt(text: str, *, redact: Sequence[str] = ()) -> str:
    """At most ``EXCERPT_CHARS`` of ``text``, one line, secrets and control characters removed."""
    for secret in redact:
        if secret:
            text = text.replace(secret, "***")
    text = _UNPRINTABLE.sub("?", text).strip()
    if len(text) > EXCERPT_CHARS:
        text = text[:EXCERPT_CHARS] + "…"
    return text


def _body_excerpt(response: requests.Response, redact: Sequence[str]) -> str:
    """The start of an error response's body; never reads more than a few KiB of it."""
    data = bytearray()
    try:
        for chunk in response.iter_content(1024):
            data += chunk
            if len(data) >= 4096:
                break
    except TRANSPORT_ERRORS:
        pass  # the status alone is enough to classify; a broken body adds nothing
    return excerpt(data.decode("utf-8", errors="replace"), redact=redact)


# What a 404 means, in words an admin reads in the site's event log.
_NOT_FOUND_WORDS: dict[type[PermanentLisError], str] = {
    UnknownOrder: "the order is unknown to the LIS",
    PdfNotReady: "the PDF is not ready yet",
}


def classify_response(
    response: requests.Response,
    *,
    what: str,
    not_found: NotFound = PermanentLisError,
    redact: Sequence[str] = (),
) -> None:
    """Raise the ``LisError`` a non-2xx response means; return quietly on 2xx.

    ``not_found`` is what a 404 means to the caller (``UnknownOrder``, ``PdfNotReady``): only
    the adapter knows which endpoint it asked. ``redact`` lists strings (the API key) that
    must not appear even if the LIS echoes them in its error body.
    """
    status = response.status_code
    if status < 300:
        return
    if status in (401, 403):
        raise LisAuthError(f"{what}: the LIS refused the API key (HTTP {status})", status=status)
    if status == 404:
        meaning = _NOT_FOUND_WORDS.get(not_found, "not found")
        raise not_found(f"{what}: {meaning} (HTTP 404)", status=status)
    if status < 400:
        # Redirects are not followed: requests would forward X-Api-Key to any other host.
        raise PermanentLisError(f"{what}: unexpected redirect (HTTP {status})", status=status)
    detail = _body_excerpt(response, redact)
    suffix = f": {detail}" if detail else ""
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise TransientLisError(
            f"{what}: HTTP {status}{suffix}", status=status, retry_after=retry_after
        )
    raise PermanentLisError(f"{what}: HTTP {status}{suffix}", status=status)


def _caused_by(exc: BaseException, kind: type[BaseException], depth: int = 0) -> bool:
    """Whether ``kind`` is somewhere in the wrapped chain requests/urllib3 build."""
    if isinstance(exc, kind):
        return True
    if depth > 6:
        return False
    inner = [getattr(exc, "reason", None), exc.__cause__, exc.__context__, *exc.args]
    return any(isinstance(e, BaseException) and _caused_by(e, kind, depth + 1) for e in inner)


def classify_exception(exc: Exception, what: str) -> LisError:
    """The ``LisError`` for a transport failure, naming only its type: its text has the URL."""
    name = type(exc).__name__
    if isinstance(exc, requests.exceptions.SSLError):
        if _caused_by(exc, ssl.SSLCertVerificationError):
            return PermanentLisError(
                f"{what}: the LIS's TLS certificate is not trusted (check lis.ca_file)"
            )
        return TransientLisError(f"{what}: TLS failed ({name})")
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError):
        return TransientLisError(f"{what}: timed out ({name})")
    if isinstance(
        exc,
        requests.ConnectionError
        | requests.exceptions.ChunkedEncodingError
        | urllib3.exceptions.ProtocolError,
    ):
        return TransientLisError(f"{what}: connection failed ({name})")
    if isinstance(exc, requests.exceptions.ContentDecodingError | urllib3.exceptions.DecodeError):
        return BadLisData(f"{what}: the body could not be decompressed ({name})")
    return PermanentLisError(f"{what}: request failed ({name})")
