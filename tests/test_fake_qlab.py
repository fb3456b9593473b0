"""The fake QLAB LIS, exercised over real HTTP with plain ``requests``."""

from __future__ import annotations

import http.client
import logging
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from labsync.testing.fake_qlab import FakeQlab, Fault, sample_results, seed_orders
from labsync.testing.pdfs import sample_pdf

KEY = "test-key"
BROKEN = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)


@pytest.fixture(autouse=True)
def _no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A request the fake failed to serve is a bug in the fake, whatever the test asserts."""
    caplog.set_level(logging.DEBUG, logger="labsync.fake_qlab")
    yield
    errors = [r for r in caplog.records if r.name.startswith("labsync") and r.levelno >= 40]
    assert errors == []


@pytest.fixture
def qlab() -> Iterator[FakeQlab]:
    with FakeQlab(KEY) as fake:
        yield fake


@pytest.fixture
def api() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["X-Api-Key"] = KEY
        yield session


def url(qlab: FakeQlab, external_id: str, endpoint: str = "results") -> str:
    return f"{qlab.base_url}/orders/{quote(external_id, safe='')}/{endpoint}"


# -- routes ---------------------------------------------------------------------------------


def test_results_route_answers_status_and_results(qlab: FakeQlab, api: requests.Session) -> None:
    results = sample_results(3)
    qlab.add_order("A-1", status="processing", results=results)

    response = api.get(url(qlab, "A-1"))

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"id": "A-1", "status": "processing", "results": results}


def test_results_of_unknown_order_is_404_json(qlab: FakeQlab, api: requests.Session) -> None:
    response = api.get(url(qlab, "nope"))

    assert response.status_code == 404
    assert response.json() == {"error": "order not found"}


def test_results_body_is_served_verbatim(qlab: FakeQlab, api: requests.Session) -> None:
    raw = b'{"status": "completed", "results": [{"code": "K", "value": 5.40}]}'
    qlab.add_order("A-1", results_body=raw)

    assert api.get(url(qlab, "A-1")).content == raw

    qlab.set_results("A-1", [{"code": "K", "value": 5.4}])
    assert api.get(url(qlab, "A-1")).json()["results"] == [{"code": "K", "value": 5.4}]


def test_set_status_changes_what_the_next_poll_sees(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1", status="processing")
    qlab.set_status("A-1", "completed", results=sample_results(2))

    body = api.get(url(qlab, "A-1")).json()

    assert body["status"] == "completed"
    assert len(body["results"]) == 2


def test_pdf_route_serves_pdf_bytes_with_length(qlab: FakeQlab, api: requests.Session) -> None:
    pdf = sample_pdf("Order A-1")
    qlab.add_order("A-1", pdf=pdf)

    response = api.get(url(qlab, "A-1", "pdf"))

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/pdf"
    assert response.headers["Content-Length"] == str(len(pdf))
    assert response.content == pdf


def test_pdf_is_404_until_ready_and_for_unknown_orders(
    qlab: FakeQlab, api: requests.Session
) -> None:
    qlab.add_order("A-1", status="processing", pdf=None)

    assert api.get(url(qlab, "A-1", "pdf")).status_code == 404
    assert api.get(url(qlab, "nope", "pdf")).status_code == 404
    qlab.set_pdf("A-1", sample_pdf())
    assert api.get(url(qlab, "A-1", "pdf")).status_code == 200


def test_removed_order_is_404(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    qlab.remove_order("A-1")

    assert api.get(url(qlab, "A-1")).status_code == 404


def test_orders_are_filtered_by_phone_date_and_status(
    qlab: FakeQlab, api: requests.Session
) -> None:
    ann = {"phone": "+79990000001", "last_name": "Иванова", "first_name": "Анна"}
    qlab.add_order("A-1", patient=ann, order_date="2024-05-01")
    qlab.add_order("A-2", patient=ann, order_date="2024-05-10", status="processing")
    qlab.add_order("B-1", patient={"phone": "+79990000002"}, order_date="2024-05-10")

    def ids(**params: str) -> list[str]:
        response = api.get(f"{qlab.base_url}/orders", params=params)
        assert response.status_code == 200
        return sorted(order["id"] for order in response.json())

    assert ids() == ["A-1", "A-2", "B-1"]
    assert ids(patient_phone="+79990000001") == ["A-1", "A-2"]
    assert ids(patient_phone="+79990000001", date_from="2024-05-10") == ["A-2"]
    assert ids(patient_phone="+79990000001", status="completed") == ["A-1"]
    assert ids(patient_phone="79990000001") == []
    listed = api.get(f"{qlab.base_url}/orders", params={"patient_phone": "+79990000002"}).json()
    assert listed == [
        {
            "id": "B-1",
            "order_date": "2024-05-10",
            "status": "completed",
            "patient": {
                "phone": "+79990000002",
                "last_name": None,
                "first_name": None,
                "birth_date": None,
            },
        }
    ]


def test_create_order_answers_201_and_the_order_exists(
    qlab: FakeQlab, api: requests.Session
) -> None:
    payload: dict[str, Any] = {
        "patient": {"phone": "+79990000001"},
        "tests": ["HGB"],
        "source": "website",
    }

    response = api.post(f"{qlab.base_url}/orders", json=payload)

    assert response.status_code == 201
    created = response.json()
    assert created["status"] == "received"
    assert api.get(url(qlab, created["id"])).json()["status"] == "received"
    assert api.get(url(qlab, created["id"], "pdf")).status_code == 404
    assert qlab.created == [payload]
    assert qlab.request_count("create") == 1


def test_create_order_rejects_a_body_without_tests(qlab: FakeQlab, api: requests.Session) -> None:
    response = api.post(f"{qlab.base_url}/orders", json={"patient": {}, "tests": []})

    assert response.status_code == 400
    assert qlab.created == []


@pytest.mark.parametrize("headers", [{}, {"X-Api-Key": "wrong-secret-key"}])
def test_a_missing_or_wrong_key_is_401_without_echo(
    qlab: FakeQlab, headers: dict[str, str]
) -> None:
    qlab.add_order("A-1")

    response = requests.get(url(qlab, "A-1"), headers=headers, timeout=5)

    assert response.status_code == 401
    assert response.json() == {"error": "invalid api key"}
    assert "wrong-secret-key" not in response.text
    assert qlab.request_count("results", "A-1") == 1


def test_unknown_routes_are_404(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")

    assert api.get(f"{qlab.base_url}/nothing").status_code == 404
    assert api.get(f"{qlab.base_url}/orders/A-1/other").status_code == 404
    assert api.post(url(qlab, "A-1")).status_code == 404
    assert api.get(url(qlab, "A-1").replace("/v2/", "/v1/")).status_code == 404
    assert qlab.request_count("unknown") == 4


@pytest.mark.parametrize("external_id", ["a/b", "../../etc/passwd", "x y+z", "ЛАБ-1", "%2F"])
def test_quoted_ids_are_matched_decoded(
    qlab: FakeQlab, api: requests.Session, external_id: str
) -> None:
    qlab.add_order(external_id)

    response = api.get(url(qlab, external_id))

    assert response.status_code == 200
    assert response.json()["id"] == external_id
    assert qlab.requests == [("results", "GET", external_id)]


# -- faults ---------------------------------------------------------------------------------


def test_status_fault_with_retry_after(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    qlab.inject("A-1", "results", Fault(status=429, headers={"Retry-After": "2"}))

    response = api.get(url(qlab, "A-1"))

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.json() == {"error": "too many requests"}
    assert api.get(url(qlab, "A-1")).status_code == 200


def test_garbage_body_fault_keeps_status_and_type(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    qlab.inject("A-1", "results", Fault(body=b'{"status": "compl'))

    response = api.get(url(qlab, "A-1"))

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError):
        response.json()


def test_html_fault_overrides_content_type(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    page = b"<html><body>502 Bad Gateway</body></html>"
    qlab.inject(None, "pdf", Fault(status=502, body=page, content_type="text/html"))

    response = api.get(url(qlab, "A-1", "pdf"))

    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html"
    assert response.content == page


def test_delay_fault_exceeds_a_read_timeout(qlab: FakeQlab) -> None:
    qlab.add_order("A-1")
    qlab.inject("A-1", "results", Fault(delay=1.0))

    with pytest.raises(requests.ReadTimeout):
        requests.get(url(qlab, "A-1"), headers={"X-Api-Key": KEY}, timeout=(2, 0.2))


def test_latency_is_added_to_every_response() -> None:
    with FakeQlab(KEY, latency=0.2) as fake:
        fake.add_order("A-1")
        started = time.monotonic()
        response = requests.get(url(fake, "A-1"), headers={"X-Api-Key": KEY}, timeout=5)
        assert response.status_code == 200
        assert time.monotonic() - started >= 0.2


def test_truncated_body_breaks_the_download(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1", pdf=sample_pdf(size=50_000))
    qlab.inject("A-1", "pdf", Fault(truncate_at=1000))

    with pytest.raises(BROKEN):
        api.get(url(qlab, "A-1", "pdf"))
    assert len(api.get(url(qlab, "A-1", "pdf")).content) == 50_000


def test_reset_connection_breaks_the_download(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1", pdf=sample_pdf(size=50_000))
    qlab.inject("A-1", "pdf", Fault(reset_after=100))

    with pytest.raises(BROKEN):
        api.get(url(qlab, "A-1", "pdf"))
    assert api.get(url(qlab, "A-1", "pdf")).status_code == 200


def test_fault_applies_times_then_answers_normally(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    qlab.inject("A-1", "results", Fault(status=503), times=2)

    codes = [api.get(url(qlab, "A-1")).status_code for _ in range(3)]

    assert codes == [503, 503, 200]


def test_forever_fault_lasts_until_cleared(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    qlab.inject(None, "*", Fault(status=500), times=None)

    assert [api.get(url(qlab, "A-1")).status_code for _ in range(5)] == [500] * 5
    assert api.get(f"{qlab.base_url}/orders").status_code == 500
    qlab.clear_faults()
    assert api.get(url(qlab, "A-1")).status_code == 200


def test_fault_without_id_matches_any_order(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    qlab.add_order("A-2")
    qlab.inject(None, "results", Fault(status=500), times=2)

    assert api.get(url(qlab, "A-2")).status_code == 500
    assert api.get(url(qlab, "A-1")).status_code == 500
    assert api.get(url(qlab, "A-1")).status_code == 200


def test_fault_with_id_spares_other_orders_and_endpoints(
    qlab: FakeQlab, api: requests.Session
) -> None:
    qlab.add_order("A-1")
    qlab.add_order("A-2")
    qlab.inject("A-1", "results", Fault(status=500))

    assert api.get(url(qlab, "A-2")).status_code == 200
    assert api.get(url(qlab, "A-1", "pdf")).status_code == 200
    assert api.get(url(qlab, "A-1")).status_code == 500


def test_faults_are_consumed_in_fifo_order(qlab: FakeQlab, api: requests.Session) -> None:
    qlab.add_order("A-1")
    qlab.inject("A-1", "results", Fault(status=502))
    qlab.inject(None, "*", Fault(status=503))

    codes = [api.get(url(qlab, "A-1")).status_code for _ in range(3)]

    assert codes == [502, 503, 200]


def test_fault_arguments_are_checked(qlab: FakeQlab) -> None:
    with pytest.raises(ValueError):
        Fault(truncate_at=1, reset_after=1)
    with pytest.raises(ValueError):
        qlab.inject(None, "result", Fault(status=500))
    with pytest.raises(ValueError):
        qlab.inject(None, "results", Fault(status=500), times=0)


# -- connections, concurrency, life cycle ---------------------------------------------------


def test_max_in_flight_reaches_the_number_of_concurrent_requests(qlab: FakeQlab) -> None:
    clients = 8
    qlab.add_order("A-1")
    qlab.inject(None, "results", Fault(delay=0.5), times=None)

    def fetch(_: int) -> int:
        response = requests.get(url(qlab, "A-1"), headers={"X-Api-Key": KEY}, timeout=10)
        return response.status_code

    with ThreadPoolExecutor(max_workers=clients) as pool:
        codes = list(pool.map(fetch, range(clients)))

    assert codes == [200] * clients
    assert qlab.max_in_flight == clients
    assert qlab.in_flight == 0
    qlab.reset_counters()
    assert (qlab.max_in_flight, qlab.requests) == (0, [])


def test_thousands_of_requests_over_many_connections(qlab: FakeQlab) -> None:
    ids = seed_orders(qlab, 20)
    per_client, clients = 100, 24

    def client(n: int) -> list[int]:
        with requests.Session() as session:
            session.headers["X-Api-Key"] = KEY
            return [
                session.get(url(qlab, ids[(n + i) % len(ids)]), timeout=10).status_code
                for i in range(per_client)
            ]

    with ThreadPoolExecutor(max_workers=clients) as pool:
        codes = [code for batch in pool.map(client, range(clients)) for code in batch]

    assert codes == [200] * (clients * per_client)
    assert qlab.request_count("results") == clients * per_client


def test_connections_are_kept_alive(qlab: FakeQlab) -> None:
    qlab.add_order("A-1")
    connection = http.client.HTTPConnection("127.0.0.1", qlab.port, timeout=5)
    try:
        connection.connect()
        first_socket = connection.sock
        for _ in range(20):
            connection.request("GET", "/v2/orders/A-1/results", headers={"X-Api-Key": KEY})
            response = connection.getresponse()
            assert response.status == 200
            response.read()
            assert connection.sock is first_socket
    finally:
        connection.close()


def test_stop_is_prompt_with_an_open_keep_alive_session(api: requests.Session) -> None:
    fake = FakeQlab(KEY).start()
    fake.add_order("A-1")
    assert api.get(url(fake, "A-1")).status_code == 200

    started = time.monotonic()
    fake.stop()

    assert time.monotonic() - started < 2
    with pytest.raises(requests.ConnectionError):
        api.get(url(fake, "A-1"), timeout=2)


def test_stop_is_prompt_while_a_request_waits_out_a_delay() -> None:
    fake = FakeQlab(KEY).start()
    fake.add_order("A-1")
    fake.inject(None, "results", Fault(delay=30))
    errors: list[Exception] = []

    def call() -> None:
        try:
            requests.get(url(fake, "A-1"), headers={"X-Api-Key": KEY}, timeout=10)
        except requests.RequestException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    while fake.in_flight == 0:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    caller.join(timeout=5)

    assert time.monotonic() - started < 2
    assert not caller.is_alive()
    assert len(errors) == 1


def test_restart_serves_the_same_orders_on_the_same_port(api: requests.Session) -> None:
    fake = FakeQlab(KEY).start()
    try:
        fake.add_order("A-1")
        base_url = fake.base_url
        fake.stop()
        with pytest.raises(requests.ConnectionError):
            api.get(url(fake, "A-1"), timeout=2)
        fake.start()
        assert fake.base_url == base_url
        assert api.get(url(fake, "A-1")).status_code == 200
    finally:
        fake.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    with FakeQlab(KEY, ssl_context=context) as fake:
        fake.add_order("A-1")
        assert fake.base_url.startswith("https://")
        response = requests.get(url(fake, "A-1"), headers={"X-Api-Key": KEY}, verify=str(cert))
        assert response.status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url(fake, "A-1"), headers={"X-Api-Key": KEY}, timeout=5)
        with requests.Session() as session:  # stop() drops an idle TLS keep-alive connection
            session.headers["X-Api-Key"] = KEY
            assert session.get(url(fake, "A-1"), verify=str(cert)).status_code == 200
            started = time.monotonic()
            fake.stop()
            assert time.monotonic() - started < 2


def test_command_line_serves_seeded_orders_until_interrupted() -> None:
    command = [sys.executable, "-m", "labsync.testing.fake_qlab", "--port", "0",
               "--api-key", "K", "--orders", "4", "--latency", "0.01"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v2", base_url)
        listed = requests.get(f"{base_url}/orders", headers={"X-Api-Key": "K"}, timeout=5).json()
        assert sorted(order["status"] for order in listed) == ["completed"] * 2 + ["processing"] * 2
        first = requests.get(f"{base_url}/orders/{listed[0]['id']}/results",
                             headers={"X-Api-Key": "K"}, timeout=5).json()  # fmt: skip
        assert len(first["results"]) == 10
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0
        if process.stdout is not None:
            process.stdout.close()


# -- sample PDFs ----------------------------------------------------------------------------


def _check_xref(pdf: bytes) -> None:
    """Every xref entry points at its object, and startxref at the xref."""
    startxref = int(re.search(rb"startxref\n(\d+)\n%%EOF\n$", pdf)[1])  # type: ignore[index]
    assert pdf[startxref:].startswith(b"xref\n")
    entries = re.findall(rb"(\d{10}) 00000 n \n", pdf[startxref:])
    assert entries
    for number, offset in enumerate(entries, start=1):
        assert pdf[int(offset) :].startswith(b"%d 0 obj\n" % number)
    for length, stream in re.findall(rb"/Length (\d+) >>\nstream\n(.*?)\nendstream", pdf, re.S):
        assert int(length) == len(stream)


@pytest.mark.parametrize("size", [None, 2_000, 200_000])
def test_sample_pdf_is_well_formed(size: int | None) -> None:
    pdf = sample_pdf("Результаты (lab) \\ results\nsecond line", size=size)

    assert pdf.startswith(b"%PDF-1.4\n")
    assert pdf.endswith(b"%%EOF\n")
    if size is not None:
        assert len(pdf) == size
    _check_xref(pdf)


def test_sample_pdf_opens_in_a_pdf_tool(tmp_path: Path) -> None:
    path = tmp_path / "sample.pdf"
    path.write_bytes(sample_pdf("Lab results 42", size=20_000))
    if shutil.which("pdftotext"):
        out = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, check=True)
        assert "Lab results 42" in out.stdout.decode()
    elif shutil.which("qpdf"):
        subprocess.run(["qpdf", "--check", str(path)], capture_output=True, check=True)
    else:
        pytest.skip("neither pdftotext nor qpdf is installed")


def test_sample_results_have_the_contract_fields() -> None:
    fields = {"code", "name", "value", "unit", "ref_min", "ref_max", "abnormal", "result_date"}

    results = sample_results(12)

    assert len({r["code"] for r in results}) == 12
    assert all(set(r) == fields for r in results)
    assert any(r["abnormal"] for r in results)
    assert any(isinstance(r["value"], str) for r in results)
