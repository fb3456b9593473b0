"""``lis.auth`` on the wire and in the logs: the headers each mode really sends, and every
secret header masked wherever a log line shows it."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from typing import Any

import pytest
import structlog

from labsync import config as config_mod
from labsync import logs
from labsync.config import Config
from labsync.errors import BadLisData, LisAuthError
from labsync.lis.registry import make_client
from labsync.testing.fake_qlab import FakeQlab
from tests.helpers import restored_logging

KEY = "qlab-key-5e1f0c77"
TOKEN = "bearer-token-3a9d61"
PASSWORD = "basic-pass-7b2c40"
VALUE = "Token hdr-value-0c4e19"
BASIC = "Basic " + base64.b64encode(f"lab:{PASSWORD}".encode()).decode()

# lis keys → the one credential header that must arrive
MODES = {
    "api-key": ({"api_key": KEY}, "X-Api-Key", KEY),
    "api-key, own header": ({"api_key": KEY, "auth_header": "X-Lab-Key"}, "X-Lab-Key", KEY),
    "bearer": ({"auth": "bearer", "token": TOKEN}, "Authorization", f"Bearer {TOKEN}"),
    "basic": ({"auth": "basic", "username": "lab", "password": PASSWORD}, "Authorization",
              BASIC),
    "header": ({"auth": "header", "auth_header": "X-Token", "auth_value": VALUE}, "X-Token",
               VALUE),
}


def config_for(base_url: str, **lis: Any) -> Config:
    return config_mod.from_mapping({
        "database": {"url": "sqlite:////var/lib/labsync/site.db"},
        "lis": {"base_url": base_url, "retry_attempts": 1, **lis},
        "pdf": {"dir": "/var/lib/labsync/lab-results"},
    }, env={})


class _Recorder(ThreadingHTTPServer):
    """A tiny LIS that keeps the headers of every request and answers one JSON body."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict[str, str]] = []
        self.body: dict[str, Any] = {"status": "processing", "results": []}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v2"


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def do_GET(self) -> None:
        headers = dict(self.headers.items())
        self.server.seen.append(headers)
        body = json.dumps(self.server.body).replace("$ECHO", headers.get("Authorization", ""))
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# -- on the wire ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_each_auth_mode_sends_its_header_and_no_other_credential(recorder, mode):
    lis, name, value = MODES[mode]
    client = make_client(config_for(recorder.base_url, **lis).lis)
    try:
        client.fetch_order("A-1")
    finally:
        client.close()

    [headers] = recorder.seen
    assert headers[name] == value
    others = {"X-Api-Key", "Authorization", "X-Lab-Key", "X-Token"} - {name}
    assert not others & set(headers), headers


def test_the_fake_qlab_accepts_the_api_key_in_x_api_key_and_only_there():
    with FakeQlab(api_key=KEY) as lis:
        lis.add_order("A-1", status="processing")
        good = make_client(config_for(lis.base_url, api_key=KEY).lis)
        moved = make_client(config_for(lis.base_url, api_key=KEY, auth_header="X-Lab-Key").lis)
        try:
            assert good.fetch_order("A-1").status.value == "processing"
            with pytest.raises(LisAuthError):
                moved.fetch_order("A-1")  # the key went in X-Lab-Key, which QLAB ignores
        finally:
            good.close()
            moved.close()


def test_a_token_the_lis_echoes_back_is_masked_in_the_error(recorder):
    recorder.body = {"status": "$ECHO", "results": []}
    client = make_client(config_for(recorder.base_url, auth="bearer", token=TOKEN).lis)
    try:
        with pytest.raises(BadLisData) as info:
            client.fetch_order("A-1")
    finally:
        client.close()

    assert "status: '***'" in str(info.value)  # the echo is quoted, masked
    assert TOKEN not in str(info.value)


# -- in the logs ---------------------------------------------------------------------------


def log_text(config: Config | None, *events: tuple[str, Any]) -> str:
    """What the log shows for ``events`` (name → a header mapping or a text) under ``config``."""
    stream = StringIO()
    with restored_logging():
        logs.REDACTOR.secrets.clear()
        logs.setup("info", "json", config.secrets() if config else (), stream=stream,
                   headers=config.secret_headers() if config else ())
        for event, shown in events:
            structlog.get_logger("labsync.test").warning(event, shown=shown)
            logging.getLogger("urllib3").warning("%s %s", event, shown)
    return stream.getvalue()


@pytest.mark.parametrize("mode", list(MODES))
def test_each_configured_secret_header_is_masked_in_log_output(mode):
    lis, name, value = MODES[mode]
    config = config_for("https://api.qlab.ru/v2", **lis)

    text = log_text(config, ("headers", {name: value, "Accept": "application/json"}),
                    ("text", f"{name}: {value}"), ("repr", repr({name: value})))

    assert value not in text
    scheme, _, credential = value.partition(" ")
    assert (credential or scheme) not in text  # Basic's base64, Bearer's token, or the key
    assert "application/json" in text and name in text  # the rest of the line stays


def test_a_configured_header_is_masked_by_its_name_whatever_its_value():
    config = config_for("https://api.qlab.ru/v2", api_key=KEY, auth_header="X-Lab-Key")
    other = "stale-key-6f02a1"  # not the configured key: masked for the header it is in

    text = log_text(config, ("headers", {"X-Lab-Key": other}), ("text", f"X-Lab-Key: {other}"))
    assert other not in text
    # Without that config, X-Lab-Key is just a header.
    assert other in log_text(None, ("text", f"X-Lab-Key: {other}"))


@pytest.mark.parametrize("shown", [
    "Authorization: Bearer unknown-tok-41c2", "authorization=Basic dW5rbm93bjp0b2s0MWMy",
    {"Authorization": "Bearer unknown-tok-41c2"}, "{'Proxy-Authorization': 'unknown-tok-41c2'}",
])
def test_authorization_is_masked_without_being_configured(shown):
    text = log_text(None, ("request", shown))

    assert "unknown-tok-41c2" not in text and "dW5rbm93bjp0b2s0MWMy" not in text
    assert "***" in text


# -- labsync check -------------------------------------------------------------------------


def test_check_names_the_key_of_the_credential_the_lis_refused(db, fake_lis, tmp_path):
    from labsync.checks import run_checks
    from tests.conftest import API_KEY

    def lis_findings(**lis: Any) -> list[str]:
        config = config_mod.from_mapping({
            "database": {"url": db.url},
            "lis": {"base_url": fake_lis.base_url, "retry_attempts": 1, **lis},
            "pdf": {"dir": str(tmp_path / "lab-results")},
        }, env={})
        problems, notes = run_checks(config)
        return [line for line in problems + notes if "LIS" in line]

    # The fake QLAB knows X-Api-Key only: a token is refused, and the line says which key.
    assert lis_findings(auth="bearer", token=TOKEN) == ["lis.token: the LIS refused the token"]
    assert lis_findings(api_key=API_KEY) == [f"LIS reachable at {fake_lis.base_url}, API key "
                                             "accepted"]
