"""The QLAB adapter and its HTTP edge, against every class of response (requests-mock).

Time is fake throughout: the client gets ``FakeTime.sleep``/``FakeTime.clock``, so retry
waits are recorded, not slept, and the retry budget runs on the fake clock.
"""

from __future__ import annotations

import io
import json
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests_mock import ANY
from structlog.testing import capture_logs

from labsync.config import LisConfig, Secret
from labsync.errors import (
    BadLisData,
    LisAuthError,
    LisError,
    PdfNotReady,
    PermanentLisError,
    TransientLisError,
    UnknownOrder,
)
from labsync.lis.classify import parse_retry_after
from labsync.lis.http import JsonNumber
from labsync.lis.qlab import QlabClient
from labsync.model import OrderStatus, Patient
from labsync.pdfs import PdfStore
from labsync.testing.pdfs import sample_pdf

KEY = "sk-live-7c1d9e0a4b"
BASE = "https://lis.example.test/v2"
RESULTS_URL = f"{BASE}/orders/A1/results"
PDF_URL = f"{BASE}/orders/A1/pdf"
JSON_TYPE = {"Content-Type": "application/json; charset=utf-8"}
PDF = sample_pdf("A1")


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def make_client(fake_time: FakeTime, **settings: Any) -> QlabClient:
    config = LisConfig(adapter="qlab", base_url=BASE, api_key=Secret(KEY), **settings)
    return QlabClient(config, sleep=fake_time.sleep, clock=fake_time.clock)


@pytest.fixture
def client(fake_time: FakeTime) -> Any:
    lis = make_client(fake_time)
    yield lis
    lis.close()


def order_json(*results: Any, **fields: Any) -> str:
    return json.dumps({"status": "completed", "results": list(results), **fields})


def ok(text: str) -> dict[str, Any]:
    """A requests-mock response spec: 200 with a JSON body."""
    return {"text": text, "headers": JSON_TYPE}


def glu(**fields: Any) -> dict[str, Any]:
    return {"code": "GLU", "name": "Glucose", "value": "5.1", **fields}


# -- good answers ---------------------------------------------------------------------------


def test_completed_order_is_returned_with_its_results(client, requests_mock) -> None:
    requests_mock.get(
        RESULTS_URL,
        **ok(
            order_json(
                glu(
                    value=6.3,
                    unit="mmol/l",
                    ref_min=3.9,
                    ref_max="6.1",
                    abnormal=True,
                    result_date="2024-05-14T10:30:00+03:00",
                ),
                id="A1",
            )
        ),
    )

    order = client.fetch_order("A1")

    assert order.external_id == "A1"
    assert order.status is OrderStatus.COMPLETED
    (result,) = order.results
    assert (result.code, result.name, result.value, result.unit) == (
        "GLU",
        "Glucose",
        "6.3",
        "mmol/l",
    )
    assert (result.ref_min, result.ref_max, result.abnormal) == ("3.9", "6.1", True)
    assert result.result_date == datetime(2024, 5, 14, 10, 30, tzinfo=timezone(timedelta(hours=3)))


@pytest.mark.parametrize("literal", ["5.40", "12", "1e308", "-0", "0.000100", "1E-7", "-3.50e+2"])
def test_number_literals_are_kept_exactly(client, requests_mock, literal) -> None:
    text = (
        f'{{"status": "completed", "results": [{{"code": "K", "value": {literal},'
        f' "ref_min": {literal}}}]}}'
    )
    requests_mock.get(RESULTS_URL, **ok(text))

    (result,) = client.fetch_order("A1").results

    assert result.value == literal and result.ref_min == literal
    assert type(result.value) is str  # not JsonNumber: the model holds plain text


@pytest.mark.parametrize("value", ["positive", "<5", "", "5,4"])
def test_string_values_are_kept_as_sent(client, requests_mock, value) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json(glu(value=value))))

    assert client.fetch_order("A1").results[0].value == value


def test_missing_optional_fields_become_none_or_false(client, requests_mock) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json({"code": "GLU", "value": None})))

    (result,) = client.fetch_order("A1").results

    assert (result.name, result.value, result.unit, result.ref_min, result.ref_max) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert result.abnormal is False and result.result_date is None


@pytest.mark.parametrize(
    "body", ['{"status": "processing"}', '{"status": "received", "results": null}']
)
def test_missing_or_null_results_mean_no_results(client, requests_mock, body) -> None:
    requests_mock.get(RESULTS_URL, **ok(body))

    assert client.fetch_order("A1").results == ()


@pytest.mark.parametrize(("abnormal", "expected"), [(True, True), (False, False), (None, False)])
def test_abnormal_is_true_only_where_the_lis_says_true(
    client, requests_mock, abnormal, expected
) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json(glu(abnormal=abnormal))))

    assert client.fetch_order("A1").results[0].abnormal is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "2024-05-14T10:30:00+03:00",
            datetime(2024, 5, 14, 10, 30, tzinfo=timezone(timedelta(hours=3))),
        ),
        ("2024-05-14T07:30:00Z", datetime(2024, 5, 14, 7, 30, tzinfo=UTC)),
        ("2024-05-14T10:30:00", datetime(2024, 5, 14, 10, 30)),
        ("2024-05-14 10:30", datetime(2024, 5, 14, 10, 30)),
        ("", None),
        (None, None),
    ],
)
def test_result_date_is_aware_only_when_the_lis_gives_an_offset(
    client, requests_mock, text, expected
) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json(glu(result_date=text))))

    got = client.fetch_order("A1").results[0].result_date

    assert got == expected
    assert (got is None) or (got.tzinfo is None) == (expected.tzinfo is None)


def test_json_number_keeps_its_literal_text() -> None:
    assert JsonNumber("5.40") == "5.40" and isinstance(JsonNumber("1"), str)


# -- refused data ---------------------------------------------------------------------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(client, requests_mock, constant) -> None:
    text = f'{{"status": "completed", "results": [{{"code": "K", "value": {constant}}}]}}'
    requests_mock.get(RESULTS_URL, **ok(text))

    with pytest.raises(BadLisData, match="not valid JSON"):
        client.fetch_order("A1")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[]", "order A1: expected a JSON object, got an array"),
        ('"completed"', "order A1: expected a JSON object, got a string"),
        (order_json(results=None, status="done"), "order A1: status: 'done' is not one of"),
        ('{"results": []}', "order A1: status: None is not one of"),
        ('{"status": 1, "results": []}', "order A1: status:"),
        (
            '{"status": "completed", "results": {"code": "GLU"}}',
            "order A1: results: expected a JSON array, got an object",
        ),
        (order_json("GLU"), "order A1: results[0]: expected a JSON object, got a string"),
        (
            order_json(glu(), glu(), glu(value=True)),
            "order A1: results[2] (GLU).value: must be a number, a string or null",
        ),
        (order_json(glu(value={"v": 1})), "results[0] (GLU).value: must be a number, a string"),
        (order_json(glu(value=[1])), "results[0] (GLU).value: must be a number, a string or null"),
        (order_json(glu(unit=["mmol"])), "results[0] (GLU).unit: must be"),
        (order_json(glu(ref_min=False)), "results[0] (GLU).ref_min: must be"),
        (order_json(glu(ref_max={})), "results[0] (GLU).ref_max: must be"),
        (order_json(glu(code=True)), "results[0].code: must be"),
        (order_json(glu(name=[])), "results[0].name: must be"),
        (
            order_json({"code": None, "name": None, "value": "1"}),
            "results[0]: has neither a code nor a name",
        ),
        (order_json({"code": "", "value": "1"}), "results[0]: has neither a code nor a name"),
        (order_json(glu(abnormal="Y")), "results[0] (GLU).abnormal: must be true, false or null"),
        (order_json(glu(abnormal=1)), "results[0] (GLU).abnormal: must be true, false or null"),
        (order_json(glu(abnormal="true")), "results[0] (GLU).abnormal"),
        (
            order_json(glu(result_date="2026-02-30")),
            "results[0] (GLU).result_date: '2026-02-30' is not an ISO 8601 date-time",
        ),
        (order_json(glu(result_date="yesterday")), "(GLU).result_date"),
        (order_json(glu(result_date=20240514)), "(GLU).result_date: must be an ISO 8601"),
        (order_json(glu(name="Glu\u0000cose")), "results[0].name: contains a NUL character"),
        (order_json(glu(value="5\u0000")), "(GLU).value: contains a NUL character"),
        (
            '{"status": "completed", "results": [{"code": "K", "value": "\\ud800"}]}',
            "(K).value: not valid Unicode text",
        ),
    ],
)
def test_wrong_shapes_and_types_are_refused_naming_the_field(
    client, requests_mock, body, message
) -> None:
    requests_mock.get(RESULTS_URL, **ok(body))

    with pytest.raises(BadLisData) as caught:
        client.fetch_order("A1")

    assert message in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [{"id": "A2"}, {"order_id": "A2"}, {"id": 1}, {"id": ""}, {"id": "A1", "order_id": "B7"}],
)
def test_results_of_a_different_order_are_refused(client, requests_mock, fields) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json(glu(), **fields)))

    with pytest.raises(BadLisData, match="results of a different order"):
        client.fetch_order("A1")


def test_numeric_id_equal_to_the_asked_one_is_accepted(fake_time, requests_mock) -> None:
    client = make_client(fake_time)
    requests_mock.get(f"{BASE}/orders/123/results", **ok(order_json(id=123, order_id="123")))

    assert client.fetch_order("123").external_id == "123"


def test_html_page_with_status_200_is_bad_data(client, requests_mock) -> None:
    requests_mock.get(
        RESULTS_URL,
        text="<html><body>Maintenance</body></html>",
        headers={"Content-Type": "text/html"},
    )

    with pytest.raises(BadLisData, match="expected JSON, got text/html"):
        client.fetch_order("A1")
    assert requests_mock.call_count == 1


@pytest.mark.parametrize(
    "text",
    [
        '{"status": "completed", "results": [',
        "not json",
        "",
        '{"status": "completed"} trailing',
        "[" * 100_000,
    ],
)
def test_garbage_json_is_bad_data(client, requests_mock, text) -> None:
    requests_mock.get(RESULTS_URL, **ok(text))

    with pytest.raises(BadLisData, match=r"not valid JSON|nested too deeply"):
        client.fetch_order("A1")
    assert requests_mock.call_count == 1  # refused data is not retried


def test_invalid_utf8_is_bad_data(client, requests_mock) -> None:
    requests_mock.get(RESULTS_URL, content=b'{"status": "completed\xff"}', headers=JSON_TYPE)

    with pytest.raises(BadLisData, match="not valid JSON"):
        client.fetch_order("A1")


def test_oversize_json_is_bad_data(client, requests_mock) -> None:
    padding = "x" * (10 * 1024 * 1024)
    requests_mock.get(RESULTS_URL, **ok(order_json(pad=padding)))

    with pytest.raises(BadLisData, match="larger than 10485760 bytes"):
        client.fetch_order("A1")


def test_declared_oversize_json_is_refused_before_reading(client, requests_mock) -> None:
    requests_mock.get(RESULTS_URL, text="{}", headers={**JSON_TYPE, "Content-Length": "99999999"})

    with pytest.raises(BadLisData, match="larger than"):
        client.fetch_order("A1")


def test_json_body_shorter_than_content_length_is_retried(client, requests_mock) -> None:
    good = order_json(glu())
    requests_mock.get(
        RESULTS_URL,
        [
            {"text": good[:20], "headers": {**JSON_TYPE, "Content-Length": str(len(good))}},
            ok(good),
        ],
    )

    assert client.fetch_order("A1").results[0].code == "GLU"
    assert requests_mock.call_count == 2


# -- HTTP status classes --------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_auth_errors_and_not_retried(client, requests_mock, status) -> None:
    requests_mock.get(RESULTS_URL, status_code=status, json={"error": "bad key"})

    with pytest.raises(LisAuthError, match=f"the LIS refused the API key \\(HTTP {status}\\)"):
        client.fetch_order("A1")
    assert requests_mock.call_count == 1


def test_404_on_results_is_unknown_order(client, requests_mock) -> None:
    requests_mock.get(RESULTS_URL, status_code=404, json={"error": "order not found"})

    with pytest.raises(UnknownOrder) as caught:
        client.fetch_order("A1")
    assert caught.value.status == 404 and requests_mock.call_count == 1
    assert str(caught.value) == "results of order A1: the order is unknown to the LIS (HTTP 404)"


def test_404_on_pdf_is_pdf_not_ready(client, requests_mock) -> None:
    requests_mock.get(PDF_URL, status_code=404, json={"error": "pdf not ready"})

    with pytest.raises(PdfNotReady, match="PDF of order A1: the PDF is not ready yet"):
        client.fetch_pdf("A1", io.BytesIO(), max_bytes=10**6)


@pytest.mark.parametrize("status", [400, 405, 409, 410, 422])
def test_other_4xx_is_permanent_and_not_retried(client, requests_mock, status) -> None:
    requests_mock.get(RESULTS_URL, status_code=status, json={"error": "bad request"})

    with pytest.raises(PermanentLisError) as caught:
        client.fetch_order("A1")
    assert type(caught.value) is PermanentLisError
    assert f"HTTP {status}" in str(caught.value) and "bad request" in str(caught.value)
    assert requests_mock.call_count == 1 and client is not None


def test_redirect_is_not_followed(client, requests_mock) -> None:
    requests_mock.get(RESULTS_URL, status_code=302, headers={"Location": "https://evil.test/"})
    evil = requests_mock.get("https://evil.test/", json={})

    with pytest.raises(PermanentLisError, match="unexpected redirect"):
        client.fetch_order("A1")
    assert not evil.called


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried_then_succeeds(client, requests_mock, fake_time, status) -> None:
    requests_mock.get(
        RESULTS_URL, [{"status_code": status}, {"status_code": status}, ok(order_json(glu()))]
    )

    assert client.fetch_order("A1").results[0].code == "GLU"
    assert requests_mock.call_count == 3
    assert len(fake_time.sleeps) == 2


def test_backoff_doubles_with_jitter(fake_time, requests_mock) -> None:
    client = make_client(fake_time, retry_attempts=5)
    requests_mock.get(RESULTS_URL, status_code=503)

    with pytest.raises(TransientLisError):
        client.fetch_order("A1")

    assert len(fake_time.sleeps) == 4
    for sleep, base in zip(fake_time.sleeps, [0.5, 1.0, 2.0, 4.0], strict=True):
        assert base <= sleep <= base + 0.5


def test_429_retry_after_seconds_is_honoured(client, requests_mock, fake_time) -> None:
    requests_mock.get(
        RESULTS_URL, [{"status_code": 429, "headers": {"Retry-After": "3"}}, ok(order_json())]
    )

    client.fetch_order("A1")

    assert fake_time.sleeps == [3.0]


def test_429_retry_after_http_date_is_honoured(client, requests_mock, fake_time) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    requests_mock.get(
        RESULTS_URL, [{"status_code": 429, "headers": {"Retry-After": when}}, ok(order_json())]
    )

    client.fetch_order("A1")

    (slept,) = fake_time.sleeps
    assert 28.0 <= slept <= 30.0  # the date has whole seconds; the test takes a moment


def test_503_retry_after_is_honoured_too(client, requests_mock, fake_time) -> None:
    requests_mock.get(
        RESULTS_URL, [{"status_code": 503, "headers": {"Retry-After": "7"}}, ok(order_json())]
    )

    client.fetch_order("A1")

    assert fake_time.sleeps == [7.0]


def test_retry_after_beyond_the_budget_gives_up_without_sleeping(fake_time, requests_mock) -> None:
    client = make_client(fake_time, retry_max_seconds=60.0)
    requests_mock.get(RESULTS_URL, status_code=429, headers={"Retry-After": "120"})

    with pytest.raises(TransientLisError) as caught:
        client.fetch_order("A1")

    assert fake_time.sleeps == []
    assert requests_mock.call_count == 1
    assert caught.value.status == 429 and caught.value.retry_after == 120.0


def test_retries_are_bounded_by_attempts(fake_time, requests_mock) -> None:
    client = make_client(fake_time, retry_attempts=3)
    requests_mock.get(RESULTS_URL, status_code=500, text="db down")

    with pytest.raises(TransientLisError) as caught:
        client.fetch_order("A1")

    assert requests_mock.call_count == 3 and len(fake_time.sleeps) == 2
    assert caught.value.status == 500 and "db down" in str(caught.value)


def test_retries_are_bounded_by_total_time(fake_time, requests_mock) -> None:
    client = make_client(fake_time, retry_attempts=100, retry_max_seconds=5.0)
    requests_mock.get(RESULTS_URL, status_code=503)
    start = fake_time.now

    with pytest.raises(TransientLisError):
        client.fetch_order("A1")

    assert fake_time.now - start <= 5.0
    assert 2 <= requests_mock.call_count <= 4


def test_each_retry_wait_is_logged(client, requests_mock) -> None:
    requests_mock.get(
        RESULTS_URL, [{"status_code": 429, "headers": {"Retry-After": "2"}}, ok(order_json())]
    )

    with capture_logs() as logs:
        client.fetch_order("A1")

    (entry,) = [e for e in logs if e["event"] == "lis.retry"]
    assert entry["log_level"] == "warning"
    assert (entry["what"], entry["attempt"], entry["wait"]) == ("results of order A1", 1, 2.0)
    assert (entry["error"], entry["status"]) == ("transient", 429)
    assert KEY not in repr(logs)


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ConnectTimeout,
        requests.exceptions.ReadTimeout,
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
    ],
)
def test_connection_failures_are_transient_and_retried(client, requests_mock, exc) -> None:
    requests_mock.get(RESULTS_URL, [{"exc": exc}, ok(order_json())])

    assert client.fetch_order("A1").status is OrderStatus.COMPLETED
    assert requests_mock.call_count == 2


@pytest.mark.parametrize(
    "exc", [requests.exceptions.ConnectTimeout, requests.exceptions.ConnectionError]
)
def test_persistent_connection_failure_ends_as_transient_error(client, requests_mock, exc) -> None:
    requests_mock.get(
        RESULTS_URL,
        exc=exc(
            "HTTPSConnectionPool(host='lis', port=443): "
            "Max retries exceeded with url: /v2/orders?phone=+7"
        ),
    )

    with pytest.raises(TransientLisError) as caught:
        client.fetch_order("A1")
    assert requests_mock.call_count == 4  # the default retry_attempts
    assert exc.__name__ in str(caught.value) and "url" not in str(caught.value)
    assert caught.value.__cause__ is None  # the requests text (with the URL) is not chained


def test_untrusted_tls_certificate_is_permanent(client, requests_mock) -> None:
    error = requests.exceptions.SSLError(ssl.SSLCertVerificationError("self-signed"))
    requests_mock.get(RESULTS_URL, exc=error)

    with pytest.raises(PermanentLisError, match="certificate is not trusted"):
        client.fetch_order("A1")
    assert requests_mock.call_count == 1


# -- PDF ------------------------------------------------------------------------------------


def test_pdf_is_streamed_into_the_sink(client, requests_mock) -> None:
    pdf = sample_pdf("A1", size=200_000)
    requests_mock.get(PDF_URL, content=pdf, headers={"Content-Type": "application/pdf"})
    sink = io.BytesIO(b"stale bytes from an earlier try")

    assert client.fetch_pdf("A1", sink, max_bytes=10**6) == len(pdf)
    assert sink.getvalue() == pdf
    assert requests_mock.last_request.headers["Accept"] == "application/pdf"


def test_pdf_with_padding_after_eof_marker_is_accepted(client, requests_mock) -> None:
    requests_mock.get(PDF_URL, content=PDF + b"\r\n\x00\x00")

    assert client.fetch_pdf("A1", io.BytesIO(), max_bytes=10**6) == len(PDF) + 4


# The PDF checks live in labsync.pdfs, the same for every adapter: these go through it.


def test_html_instead_of_pdf_is_bad_data(client, requests_mock, tmp_path) -> None:
    requests_mock.get(PDF_URL, text="<html>error</html>", headers={"Content-Type": "text/html"})

    with pytest.raises(BadLisData, match="not a PDF \\(starts with '<htm'\\)"):
        PdfStore(tmp_path, 10**6).stage(7, "A1", client)


def test_empty_pdf_is_bad_data(client, requests_mock, tmp_path) -> None:
    requests_mock.get(PDF_URL, content=b"")

    with pytest.raises(BadLisData, match="not a PDF \\(empty body\\)"):
        PdfStore(tmp_path, 10**6).stage(7, "A1", client)


def test_pdf_without_eof_marker_is_cut_short(client, requests_mock, tmp_path) -> None:
    requests_mock.get(PDF_URL, content=PDF[: len(PDF) // 2])

    with pytest.raises(BadLisData, match="PDF cut short"):
        PdfStore(tmp_path, 10**6).stage(7, "A1", client)
    assert requests_mock.call_count == 1


def test_pdf_over_max_bytes_is_bad_data(client, requests_mock) -> None:
    requests_mock.get(PDF_URL, content=sample_pdf("big", size=300_000))

    with pytest.raises(BadLisData, match="larger than 100000 bytes"):
        client.fetch_pdf("A1", io.BytesIO(), max_bytes=100_000)


def test_pdf_shorter_than_content_length_is_retried_into_a_clean_sink(
    client, requests_mock
) -> None:
    pdf = sample_pdf("A1", size=150_000)
    requests_mock.get(
        PDF_URL,
        [
            {"content": pdf[:70_000], "headers": {"Content-Length": str(len(pdf))}},
            {"content": pdf},
        ],
    )
    sink = io.BytesIO()

    assert client.fetch_pdf("A1", sink, max_bytes=10**6) == len(pdf)
    assert sink.getvalue() == pdf  # the partial first attempt was truncated away


class _ResetMidBody(io.BytesIO):
    """A body whose connection is reset after the first read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, *args: Any) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(1000)

    read1 = read  # urllib3 reads a streamed body with read1, as a socket file offers it


def test_pdf_connection_reset_mid_body_is_retried(client, requests_mock) -> None:
    requests_mock.get(PDF_URL, [{"body": _ResetMidBody(PDF)}, {"content": PDF}])
    sink = io.BytesIO()

    assert client.fetch_pdf("A1", sink, max_bytes=10**6) == len(PDF)
    assert sink.getvalue() == PDF and requests_mock.call_count == 2


# -- secrets, headers, paths, rate --------------------------------------------------------------


ERROR_CASES = [
    ("results", {"status_code": 401, "text": f"invalid key {KEY}"}),
    ("results", {"status_code": 403, "text": f"key {KEY} is disabled"}),
    ("results", {"status_code": 400, "text": f"bad request, X-Api-Key: {KEY}"}),
    ("results", {"status_code": 404, "text": KEY}),
    ("results", {"status_code": 500, "text": f"Traceback: api_key={KEY}"}),
    ("results", {"status_code": 429, "text": KEY, "headers": {"Retry-After": "999"}}),
    ("results", {"text": f"<html>{KEY}</html>", "headers": {"Content-Type": "text/html"}}),
    ("results", {"text": f'{{"status": "{KEY}"}}', "headers": JSON_TYPE}),
    ("results", {"text": f"{KEY} not json", "headers": JSON_TYPE}),
    ("results", {"exc": requests.exceptions.ConnectionError(f"X-Api-Key: {KEY}")}),
    ("results", {"exc": requests.exceptions.ReadTimeout(f"{KEY}")}),
    ("pdf", {"text": f"<html>{KEY}</html>"}),
    ("pdf", {"status_code": 502, "text": KEY}),
]


@pytest.mark.parametrize(("endpoint", "response"), ERROR_CASES)
def test_api_key_never_appears_in_an_error_message(
    client, requests_mock, endpoint, response, tmp_path
) -> None:
    requests_mock.get(f"{BASE}/orders/A1/{endpoint}", **response)

    with pytest.raises(LisError) as caught, capture_logs() as logs:
        if endpoint == "pdf":  # through the PDF checks, as the engine fetches a PDF
            PdfStore(tmp_path, 10**6).stage(7, "A1", client)
        else:
            client.fetch_order("A1")

    assert KEY not in str(caught.value) and KEY not in repr(caught.value.args)
    assert KEY not in repr(logs)


def test_error_excerpt_is_short_and_one_line(client, requests_mock) -> None:
    requests_mock.get(
        RESULTS_URL, status_code=400, text="line one\nline\x1b[31m two\u202e" + "x" * 5000
    )

    with pytest.raises(PermanentLisError) as caught:
        client.fetch_order("A1")

    message = str(caught.value)
    assert len(message) < 300
    assert "\n" not in message and "\x1b" not in message and "\u202e" not in message
    assert "line one?line?[31m two?" in message


def test_requests_carry_the_api_key_header_and_user_agent(client, requests_mock) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json()))

    client.fetch_order("A1")

    headers = requests_mock.last_request.headers
    assert headers["X-Api-Key"] == KEY
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"].startswith("labsync/")


def test_ca_file_is_used_even_when_requests_ca_bundle_is_set(
    fake_time, requests_mock, monkeypatch, tmp_path
) -> None:
    ca_file = tmp_path / "lis-ca.pem"
    ca_file.write_text("not read by requests-mock")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    client = make_client(fake_time, ca_file=ca_file)
    requests_mock.get(RESULTS_URL, **ok(order_json()))

    client.fetch_order("A1")

    assert requests_mock.last_request.verify == str(ca_file)


def test_tls_is_verified_without_a_ca_file(client, requests_mock) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json()))

    client.fetch_order("A1")

    # True, or the system bundle REQUESTS_CA_BUNDLE names: verified either way.
    assert requests_mock.last_request.verify not in (False, None, "")


@pytest.mark.parametrize(
    ("external_id", "segment"),
    [
        ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd"),
        ("a/b", "a%2Fb"),
        ("A 1?x=1#f", "A%201%3Fx%3D1%23f"),
        ("Заказ-1", "%D0%97%D0%B0%D0%BA%D0%B0%D0%B7-1"),
    ],
)
def test_order_id_is_quoted_into_one_path_segment(
    client, requests_mock, external_id, segment
) -> None:
    requests_mock.get(ANY, status_code=404)

    with pytest.raises(UnknownOrder):
        client.fetch_order(external_id)

    assert urlsplit(requests_mock.last_request.url).path == f"/v2/orders/{segment}/results"


@pytest.mark.parametrize("external_id", ["", ".", ".."])
def test_order_id_that_would_be_a_dot_segment_is_refused_unsent(
    client, requests_mock, external_id
) -> None:
    requests_mock.get(ANY, status_code=404)

    with pytest.raises(PermanentLisError, match="cannot be used in a URL"):
        client.fetch_order(external_id)
    assert requests_mock.call_count == 0


def test_max_rps_spaces_requests_across_calls(fake_time, requests_mock) -> None:
    client = make_client(fake_time, max_rps=2.0)
    seen: list[float] = []

    def answer(request: Any, context: Any) -> str:
        seen.append(fake_time.now)
        return order_json()

    requests_mock.get(RESULTS_URL, text=answer, headers=JSON_TYPE)

    for _ in range(4):
        client.fetch_order("A1")

    assert seen == [1000.0, 1000.5, 1001.0, 1001.5]


def test_max_rps_applies_to_each_retry_attempt(fake_time, requests_mock) -> None:
    client = make_client(fake_time, max_rps=1.0)
    seen: list[float] = []

    def answer(request: Any, context: Any) -> str:
        seen.append(fake_time.now)
        context.status_code = 503 if len(seen) == 1 else 200
        context.headers["Retry-After"] = "0"
        return order_json()

    requests_mock.get(RESULTS_URL, text=answer, headers=JSON_TYPE)

    client.fetch_order("A1")

    assert seen == [1000.0, 1001.0]


def test_without_max_rps_nothing_waits(client, requests_mock, fake_time) -> None:
    requests_mock.get(RESULTS_URL, **ok(order_json()))

    for _ in range(5):
        client.fetch_order("A1")

    assert fake_time.sleeps == []


# -- find_orders and create_order ---------------------------------------------------------------


ORDERS = [
    {
        "id": "Q-1",
        "order_date": "2024-05-10",
        "status": "completed",
        "patient": {
            "phone": "+79991234567",
            "last_name": "Иванова",
            "first_name": "Анна",
            "birth_date": "1985-03-21",
        },
    },
    {"id": 77, "order_date": "2024-05-12T09:15:00+03:00", "status": "received", "patient": None},
]


def test_find_orders_asks_by_phone_and_date_without_status(client, requests_mock) -> None:
    requests_mock.get(f"{BASE}/orders", **ok(json.dumps(ORDERS)))

    refs = client.find_orders("+79991234567", date(2024, 5, 1))

    query = parse_qs(urlsplit(requests_mock.last_request.url).query)
    assert query == {"patient_phone": ["+79991234567"], "date_from": ["2024-05-01"]}
    assert [r.external_id for r in refs] == ["Q-1", "77"]
    assert refs[0].patient == Patient("+79991234567", "Иванова", "Анна", date(1985, 3, 21))
    assert refs[0].order_date == date(2024, 5, 10) and refs[0].status is OrderStatus.COMPLETED
    assert refs[1].patient == Patient() and refs[1].order_date == date(2024, 5, 12)


@pytest.mark.parametrize(
    ("orders", "message"),
    [
        ({"orders": []}, "expected a JSON array, got an object"),
        ([{"status": "completed"}], "[0].id: missing or empty"),
        ([{"id": "Q", "status": "lost"}], "(order Q).status: 'lost' is not one of"),
        ([{"id": "Q", "status": "completed", "order_date": "2024-13-01"}], "(order Q).order_date"),
        (
            [{"id": "Q", "status": "completed", "patient": {"birth_date": "1985-02-30"}}],
            "(order Q).patient.birth_date: '1985-02-30' is not an ISO 8601 date",
        ),
        (
            [{"id": "Q", "status": "completed", "patient": {"phone": 79991234567}}],
            "(order Q).patient.phone: must be a string or null",
        ),
        (
            [{"id": "Q", "status": "completed", "patient": "Иванова"}],
            "(order Q).patient: expected a JSON object",
        ),
    ],
)
def test_find_orders_refuses_bad_entries(client, requests_mock, orders, message) -> None:
    requests_mock.get(f"{BASE}/orders", **ok(json.dumps(orders)))

    with pytest.raises(BadLisData) as caught:
        client.find_orders("+79991234567", date(2024, 5, 1))

    assert message in str(caught.value)
    assert "+79991234567" not in str(caught.value)  # a phone number is masked in messages


def test_create_order_posts_patient_tests_and_source(client, requests_mock) -> None:
    requests_mock.post(
        f"{BASE}/orders", status_code=201, **ok('{"id": "QL0000042", "status": "received"}')
    )
    patient = Patient("+79991234567", "Иванова", "Анна", date(1985, 3, 21))

    ref = client.create_order(patient, ["GLU", "HGB"])

    assert requests_mock.last_request.json() == {
        "patient": {
            "phone": "+79991234567",
            "last_name": "Иванова",
            "first_name": "Анна",
            "birth_date": "1985-03-21",
        },
        "tests": ["GLU", "HGB"],
        "source": "website",
    }
    assert (ref.external_id, ref.status, ref.patient) == (
        "QL0000042",
        OrderStatus.RECEIVED,
        patient,
    )


@pytest.mark.parametrize(
    "response",
    [
        {"status_code": 503},
        {"status_code": 429, "headers": {"Retry-After": "1"}},
        {"exc": requests.exceptions.ReadTimeout},
    ],
)
def test_create_order_is_never_retried(client, requests_mock, fake_time, response) -> None:
    requests_mock.post(f"{BASE}/orders", [response, ok('{"id": "X", "status": "received"}')])

    with pytest.raises(TransientLisError):
        client.create_order(Patient(phone="+79991234567"), ["GLU"])
    assert requests_mock.call_count == 1 and fake_time.sleeps == []


def test_create_order_refuses_an_answer_without_id(client, requests_mock) -> None:
    requests_mock.post(f"{BASE}/orders", **ok('{"status": "received"}'))

    with pytest.raises(BadLisData, match="new order: id: missing or empty"):
        client.create_order(Patient(phone="+79991234567"), ["GLU"])


# -- Retry-After parsing --------------------------------------------------------------------


NOW = datetime(2024, 5, 14, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Tue, 14 May 2024 12:00:30 GMT", 30.0),
        ("Tue, 14 May 2024 11:00:00 GMT", 0.0),  # in the past
        ("Tue, 14 May 2024 12:00:10 -0000", 10.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("Tue, 99 Foo 2024 12:00:30 GMT", None),
    ],
)
def test_retry_after_is_parsed_as_seconds_or_http_date(header, seconds) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_lis_sent_order_id_is_sanitised_in_messages(client, requests_mock) -> None:
    orders = [{"id": "Q\n2024-01-01 fake log line\x1b[0m", "status": "lost"}]
    requests_mock.get(f"{BASE}/orders", **ok(json.dumps(orders)))

    with pytest.raises(BadLisData) as caught:
        client.find_orders("+79991234567", date(2024, 5, 1))

    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_order_id_with_a_lone_surrogate_is_refused_unsent(client, requests_mock) -> None:
    requests_mock.get(ANY, status_code=404)

    with pytest.raises(PermanentLisError, match="not valid text"):
        client.fetch_order("A\ud800")
    assert requests_mock.call_count == 0


def test_close_closes_the_session_of_every_thread(fake_time, requests_mock, monkeypatch) -> None:
    closed: list[requests.Session] = []
    monkeypatch.setattr(requests.Session, "close", lambda self: closed.append(self))
    client = make_client(fake_time)
    requests_mock.get(RESULTS_URL, **ok(order_json()))

    with ThreadPoolExecutor(max_workers=3) as pool:
        barrier = threading.Barrier(3)

        def fetch(_: int) -> None:
            barrier.wait()  # three threads at once, so three sessions
            client.fetch_order("A1")

        list(pool.map(fetch, range(3)))
    client.close()

    assert len(set(map(id, closed))) == 3


def test_a_pdf_dripping_in_past_the_download_timeout_is_given_up(fake_time, requests_mock) -> None:
    """read_timeout bounds each read; the download as a whole has its own deadline."""
    pdf = sample_pdf("A1", size=300_000)  # five 64 KiB chunks

    class Dripping(FakeTime):
        def clock(self) -> float:  # every look at the clock: another 100 s have gone by
            self.now += 100
            return self.now

    slow = Dripping()
    lis = QlabClient(LisConfig(adapter="qlab", base_url=BASE, api_key=Secret(KEY),
                               download_timeout=250, retry_attempts=1),
                     sleep=slow.sleep, clock=slow.clock)
    requests_mock.get(PDF_URL, content=pdf, headers={"Content-Type": "application/pdf"})
    with pytest.raises(TransientLisError, match="download time limit"):
        lis.fetch_pdf("A1", io.BytesIO(), max_bytes=10**6)
    lis.close()
