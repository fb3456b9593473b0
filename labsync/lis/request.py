"""The fast request path: a GET put together by hand, as ``Session.request`` would send it.

requests 2.34 merges session and request settings through runtime-checkable Protocol
``isinstance`` tests: about a fifth of a small request's CPU, measured. labsync's sessions
(``HttpTransport``, ``http.py``) have only headers and cookies to merge, so a GET to a base
URL that requests sends as written is built directly: the base URL, a path quoted already
(``quote_id``) and the query. A POST (rare) or an unusual base URL keeps requests' full
preparation. ``tests/test_http_fastpath.py`` holds both to what ``Session.request`` sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import requests
from requests.structures import CaseInsensitiveDict

from labsync.errors import PermanentLisError
from labsync.lis.classify import excerpt


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


def sent_as_written(base_url: str) -> bool:
    """Whether requests sends ``base_url``, a quoted path and a query exactly as written.

    Then ``prepare`` may build a GET's URL by concatenation. requests rewrites some base
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


def prepare(
    session: requests.Session,
    method: str,
    url: str,
    *,
    params: Mapping[str, str] | None,
    payload: Any,
    accept: str | None,
    plain_url: bool,
) -> requests.PreparedRequest:
    """The request ``session.request`` would send to ``url``, built without its merge steps.

    ``plain_url`` is ``sent_as_written`` of the base URL that ``url`` starts with. The
    session's headers are sent without requests' per-request check: ``HttpTransport``
    checks them once when it makes the session.
    """
    headers: CaseInsensitiveDict[str | bytes] = CaseInsensitiveDict(session.headers)
    if accept:
        headers["Accept"] = accept
    request = requests.PreparedRequest()
    if method != "GET" or payload is not None or not plain_url:
        request.prepare(method=method, url=url, headers=headers, params=params,
                        json=payload, cookies=session.cookies)
        return request
    request.method = method
    request.url = f"{url}?{urlencode(params)}" if params else url
    request.headers = headers
    request.prepare_cookies(session.cookies)  # also what a redirect response needs
    return request
