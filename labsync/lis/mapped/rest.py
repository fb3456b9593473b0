"""REST for the mapped adapter: GETs relative to ``lis.base_url``, through ``HttpTransport``.

Every request goes through ``lis/http.py`` (sessions, the rate cap, classification by
``lis/classify.py``, retries); this module only fills in the URL templates and keeps the
body as received for the dry run. ``{id}`` is percent-encoded as one path segment
(``quote_id``), as are ``{phone}``, ``{phone_digits}`` and ``{date_from}`` in ``find_url``.
A JSON body is decoded with its numbers as their literal text (``JsonNumber``).
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from datetime import date
from typing import BinaryIO
from urllib.parse import quote

from labsync.config import LisConfig
from labsync.errors import PdfNotReady, PermanentLisError, UnknownOrder
from labsync.lis.body import JSON_MAX_BYTES, decode_json
from labsync.lis.classify import NotFound
from labsync.lis.http import HttpTransport, quote_id
from labsync.lis.mapped.mapper import Answer
from labsync.lis.mapped.spec import Spec

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
PROBE_ID = "labsync-probe-0"


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced by its value (already encoded)."""
    return _PLACEHOLDER.sub(lambda m: values[m[1]], template)


class RestLims:
    """A REST LIS at ``lis.base_url``; safe for many threads at once."""

    def __init__(self, config: LisConfig, spec: Spec, *, answer_max_bytes: int,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._spec = spec
        self._answer_max = answer_max_bytes
        self.http = HttpTransport(config, sleep=sleep, clock=clock)
        self._secrets = sorted(config.secret_values(), key=len, reverse=True)

    def close(self) -> None:
        self.http.close()

    def redact(self, text: str) -> str:
        return self.http.redact(text)

    def order(self, external_id: str, *, what: str) -> Answer:
        """``GET order_url``; 404 is ``UnknownOrder``."""
        assert self._spec.order_url is not None
        path = fill(self._spec.order_url, id=quote_id(external_id))
        return self._json(path, what=what, not_found=UnknownOrder, max_bytes=self._answer_max)

    def pdf(self, external_id: str, sink: BinaryIO, *, what: str, max_bytes: int) -> int:
        """``GET pdf_url`` streamed into ``sink``; 404 is ``PdfNotReady``."""
        assert self._spec.pdf_url is not None
        path = fill(self._spec.pdf_url, id=quote_id(external_id))
        return self.http.stream_to(path, sink, what=what, not_found=PdfNotReady,
                                   max_bytes=max_bytes, accept="application/pdf")

    def find(self, phone: str, date_from: date, *, what: str) -> Answer:
        """``GET find_url`` with the patient's phone and the first date filled in."""
        assert self._spec.find_url is not None
        path = fill(self._spec.find_url, phone=quote(phone, safe=""),
                    phone_digits=quote("".join(c for c in phone if c.isdigit()), safe=""),
                    date_from=f"{date_from:%Y-%m-%d}")
        return self._json(path, what=what, not_found=PermanentLisError,
                          max_bytes=JSON_MAX_BYTES)

    def probe(self) -> None:
        """``probe_url`` answers 2xx; without one, ``order_url`` for an id no LIS has answers
        (404 means reached and the credential accepted)."""
        if self._spec.probe_url is None:
            try:
                self.order(PROBE_ID, what="probe (lis.mapped.order_url)")
            except UnknownOrder:
                pass
            return
        self.http.stream_to(self._spec.probe_url, io.BytesIO(), what="probe (lis.mapped."
                            "probe_url)", max_bytes=JSON_MAX_BYTES)

    def _json(self, path: str, *, what: str, not_found: NotFound, max_bytes: int) -> Answer:
        sink = io.BytesIO()
        self.http.stream_to(path, sink, what=what, not_found=not_found, max_bytes=max_bytes,
                            accept="application/json")
        body = sink.getvalue()
        for secret in self._secrets:  # an LIS echoing the key: never quoted, never shown
            body = body.replace(secret.encode("utf-8"), b"***")
        return Answer(body, decode_json(body, what=what))
