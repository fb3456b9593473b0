"""``HttpTransport`` builds its GETs itself: they must go out as ``Session.request`` sent them.

The transport skips ``Session.request``'s merge steps for CPU (labsync.lis.request, ``prepare``).
These tests hold it to what ``Session.request`` would have sent, URL and headers byte for
byte, for ordinary and for unusual base URLs, and check what a hand-built request could
get wrong over a real socket: cookies the LIS sets, a redirect, a header requests refuses.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import requests_mock as requests_mock_module
from requests_mock import ANY

from labsync import __version__
from labsync.config import LisConfig, Secret
from labsync.errors import PermanentLisError
from labsync.lis.http import HttpTransport
from labsync.lis.qlab import QlabClient
from labsync.lis.request import sent_as_written

KEY = "sk-live-7c1d9e0a4b"
ORDER = json.dumps({"status": "completed", "results": []})

PLAIN_BASES = [
    "https://lis.example.test/v2",
    "http://127.0.0.1:8080/v2",
    "https://lis.example.test:8443/api/qlab/v2",
    "https://lis.example.test/~lab/v2",
    "https://lis.example.test",
]
# Base URLs requests rewrites or turns into an Authorization header: sent through
# requests' own preparation, so they must come out the same too.
UNUSUAL_BASES = [
    "https://LIS.Example.TEST/v2",
    "https://lis.example.test/a b/v2",
    "https://lis.example.test/v2/../v3",
    "https://lis.example.test/%7Elab/v2",
    "https://lis.example.test/v2?tenant=7",
    "https://user:pa%20ss@lis.example.test/v2",
    "https://лаборатория.example.test/v2",
]

CALLS = [
    # (path, params, accept) as QlabClient asks them
    ("/orders/A1/results", None, None),
    ("/orders/%D0%97%D0%B0%D0%BA%D0%B0%D0%B7-1/results", None, None),
    ("/orders/A%201%3Fx%3D1%23f/pdf", None, "application/pdf"),
    ("/orders", {"patient_phone": "+7 (900) 123-45-67", "date_from": "2026-01-31"}, None),
    ("/orders", {"patient_phone": "тел. 8&9=10%", "date_from": "2026-01-31"}, None),
]


def config(base_url: str, api_key: str = KEY) -> LisConfig:
    return LisConfig(adapter="qlab", base_url=base_url, api_key=Secret(api_key),
                     retry_attempts=1)


def sent_by_transport(base_url: str, path: str, params: Any, accept: str | None) -> Any:
    transport = HttpTransport(config(base_url))
    try:
        with requests_mock_module.Mocker() as mock:
            mock.get(ANY, text=ORDER, headers={"Content-Type": "application/json"})
            transport._send("GET", path, what="test", params=params, accept=accept).close()
            return mock.last_request
    finally:
        transport.close()


def sent_by_session_request(base_url: str, path: str, params: Any, accept: str | None) -> Any:
    """What labsync sent before: the same session settings, through ``Session.request``."""
    session = requests.Session()
    session.headers["X-Api-Key"] = KEY
    session.headers["Accept"] = "application/json"
    session.headers["User-Agent"] = f"labsync/{__version__}"
    session.trust_env = False
    with session, requests_mock_module.Mocker() as mock:
        mock.get(ANY, text=ORDER, headers={"Content-Type": "application/json"})
        session.request("GET", base_url + path, params=params,
                        headers={"Accept": accept} if accept else None,
                        timeout=(5, 30), verify=True, stream=True, allow_redirects=False).close()
        return mock.last_request


@pytest.mark.parametrize("base_url", PLAIN_BASES + UNUSUAL_BASES)
@pytest.mark.parametrize(("path", "params", "accept"), CALLS)
def test_get_is_sent_exactly_as_session_request_sent_it(
    base_url: str, path: str, params: Any, accept: str | None
) -> None:
    ours = sent_by_transport(base_url, path, params, accept)
    theirs = sent_by_session_request(base_url, path, params, accept)

    assert ours.url == theirs.url
    assert list(ours.headers.items()) == list(theirs.headers.items())
    assert ours.body is None and theirs.body is None


@pytest.mark.parametrize("base_url", PLAIN_BASES)
def test_ordinary_base_urls_take_the_short_way(base_url: str) -> None:
    assert sent_as_written(base_url)


@pytest.mark.parametrize("base_url", [*UNUSUAL_BASES, "lis.example.test/v2", "https://"])
def test_unusual_base_urls_keep_requests_preparation(base_url: str) -> None:
    assert not sent_as_written(base_url)


def test_post_still_sends_its_json_body(requests_mock: Any) -> None:
    requests_mock.post(ANY, json={"id": "N1", "status": "received"})
    transport = HttpTransport(config(PLAIN_BASES[0]))

    transport.post_json("/orders", {"tests": ["GLU"], "source": "website"}, what="new order")

    sent = requests_mock.last_request
    assert sent.json() == {"tests": ["GLU"], "source": "website"}
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["X-Api-Key"] == KEY
    transport.close()


def test_api_key_requests_would_refuse_is_refused_unsent(requests_mock: Any) -> None:
    requests_mock.get(ANY, text=ORDER, headers={"Content-Type": "application/json"})
    transport = HttpTransport(config(PLAIN_BASES[0], api_key="key\r\nX-Injected: 1"))

    for _ in range(2):  # every request, not only the first on a thread
        with pytest.raises(PermanentLisError, match=r"^test: request failed \(InvalidHeader\)$"):
            transport.get_json("/orders/A1/results", what="test")

    assert requests_mock.call_count == 0
    transport.close()


# -- over a real socket ---------------------------------------------------------------------


class _Lis(BaseHTTPRequestHandler):
    """Sets a cookie on ``C1``, redirects ``R1`` elsewhere, records every request's headers."""

    seen: list[dict[str, str]]

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers.items()))
        if self.path.startswith("/v2/orders/R1/"):
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = ORDER.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.path.startswith("/v2/orders/C1/"):
            self.send_header("Set-Cookie", "lb=node-2; Path=/")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lis() -> Iterator[tuple[QlabClient, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []
    handler = type("Handler", (_Lis,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = QlabClient(config(f"http://127.0.0.1:{server.server_port}/v2"))
    try:
        yield client, seen
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join()


def test_cookies_the_lis_sets_are_sent_back(lis: tuple[QlabClient, list[dict[str, str]]]) -> None:
    client, seen = lis

    client.fetch_order("C1")
    client.fetch_order("A1")

    assert "Cookie" not in seen[0]
    assert seen[1]["Cookie"] == "lb=node-2"


def test_redirect_over_a_socket_is_refused_not_followed(
    lis: tuple[QlabClient, list[dict[str, str]]],
) -> None:
    client, seen = lis

    with pytest.raises(PermanentLisError, match="unexpected redirect"):
        client.fetch_order("R1")

    assert len(seen) == 1
