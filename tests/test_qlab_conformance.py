"""The QLAB adapter against the fake QLAB over real HTTP on localhost: the shared suite,
plus what only a real socket shows (short bodies, resets, keep-alive after errors)."""

from __future__ import annotations

import io
import json
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from labsync.config import LisConfig, Secret
from labsync.errors import BadLisData, LisAuthError, PermanentLisError, TransientLisError
from labsync.lis.base import Capability
from labsync.lis.qlab import QlabClient
from labsync.model import OrderStatus, Patient, TestResult
from labsync.testing.fake_qlab import FakeQlab, Fault
from labsync.testing.pdfs import sample_pdf
from tests.lis_conformance import LisClientConformance

API_KEY = "conformance-key-5f1e"
RETRY_ATTEMPTS = 3
# What a JSON number looks like: such values go over the wire as numbers, the hard case.
_JSON_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_ENDPOINT = {"order": "results", "pdf": "pdf"}


def _spoiled(fault: str, on: str) -> Fault:
    """A conformance fault in QLAB's terms (CONTRACT.md, "The QLAB API": errors)."""
    if fault == "bad_data":  # a 200 whose body is not what was asked for
        return (Fault(body=b'{"status": "finished", "results": []}') if on == "order"
                else Fault(body=b"<html>502 Bad Gateway</html>", content_type="text/html"))
    status = {"auth": 401, "unknown": 404, "pdf_not_ready": 404, "transient": 503}[fault]
    return Fault(status=status)


class QlabServer:
    """``lis_server`` for the conformance suite: model objects in, QLAB JSON out."""

    capabilities = frozenset({Capability.ORDER_LOOKUP, Capability.PDF,
                              Capability.PATIENT_SEARCH, Capability.ORDER_PLACEMENT})
    retry_attempts = RETRY_ATTEMPTS
    says_changed_at = False  # QLAB's answers carry neither a change time nor a version

    def __init__(self, fake: FakeQlab) -> None:
        self.fake = fake

    def add_order(
        self,
        external_id: str,
        *,
        status: OrderStatus,
        results: Sequence[TestResult],
        pdf: bytes | None,
        patient: Patient,
        order_date: date,
        changed_at: datetime | None = None,
        version: str | None = None,
    ) -> None:
        payload = {"id": external_id, "status": status.value,
                   "results": [_result_json(r) for r in results]}
        self.fake.add_order(
            external_id,
            status=status.value,
            results=payload["results"],
            results_body=_with_literal_numbers(payload),
            pdf=pdf,
            patient={
                "phone": patient.phone,
                "last_name": patient.last_name,
                "first_name": patient.first_name,
                "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
            },
            order_date=order_date.isoformat(),
        )

    def set_pdf(self, external_id: str, pdf: bytes | None) -> None:
        self.fake.set_pdf(external_id, pdf)

    def fail(self, external_id: str | None, fault: str, *, on: str = "order",
             times: int | None = 1) -> None:
        self.fake.inject(external_id, _ENDPOINT[on], _spoiled(fault, on), times=times)

    def requests(self, external_id: str, on: str) -> int:
        return self.fake.request_count(_ENDPOINT[on], external_id)


def _with_literal_numbers(payload: dict[str, Any]) -> bytes:
    """``payload`` as JSON, with every text that reads as a number sent as a JSON number."""
    literals: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, str) and _JSON_NUMBER.fullmatch(value):
            token = f"@@number{len(literals)}@@"
            literals[f'"{token}"'] = value
            return token
        return value

    marked = {**payload, "results": [{k: mark(v) if k in ("value", "ref_min", "ref_max")
                                      else v for k, v in r.items()}
                                     for r in payload["results"]]}
    text = json.dumps(marked, ensure_ascii=False)
    for token, literal in literals.items():
        text = text.replace(token, literal)
    return text.encode()


def _result_json(result: TestResult) -> dict[str, Any]:
    return {
        "code": result.code,
        "name": result.name,
        "value": result.value,
        "unit": result.unit,
        "ref_min": result.ref_min,
        "ref_max": result.ref_max,
        "abnormal": result.abnormal,
        "result_date": result.result_date.isoformat() if result.result_date else None,
    }


@pytest.fixture
def fake_qlab() -> Iterator[FakeQlab]:
    with FakeQlab(api_key=API_KEY) as fake:
        yield fake


def _client(fake: FakeQlab, api_key: str = API_KEY) -> QlabClient:
    config = LisConfig(
        adapter="qlab",
        base_url=fake.base_url,
        api_key=Secret(api_key),
        connect_timeout=2.0,
        read_timeout=5.0,
        retry_attempts=RETRY_ATTEMPTS,
        retry_max_seconds=10.0,
    )
    # Retries wait for nothing: the fake's faults are immediate, and no test should sleep.
    return QlabClient(config, sleep=lambda seconds: None)


@pytest.fixture
def lis_client(fake_qlab: FakeQlab) -> Iterator[QlabClient]:
    client = _client(fake_qlab)
    yield client
    client.close()


@pytest.fixture
def lis_server(fake_qlab: FakeQlab) -> QlabServer:
    return QlabServer(fake_qlab)


class TestQlabConformance(LisClientConformance):
    """The shared suite, run against the QLAB adapter and the fake QLAB."""


# -- what a real socket adds ----------------------------------------------------------------


def test_number_literals_survive_the_wire(lis_client: QlabClient, fake_qlab: FakeQlab) -> None:
    body = b'{"status": "completed", "results": [{"code": "K", "value": 5.40, "ref_max": 1e308}]}'
    fake_qlab.add_order("N-1", results_body=body)

    (result,) = lis_client.fetch_order("N-1").results

    assert (result.value, result.ref_max) == ("5.40", "1e308")


def test_wrong_api_key_is_an_auth_error(fake_qlab: FakeQlab) -> None:
    client = _client(fake_qlab, api_key="wrong-key")
    fake_qlab.add_order("A-1")

    with pytest.raises(LisAuthError) as caught:
        client.fetch_order("A-1")

    assert "wrong-key" not in str(caught.value)
    assert fake_qlab.request_count("results") == 1  # not retried
    client.close()


def test_5xx_then_success_is_retried_on_the_same_client(
    lis_client: QlabClient, fake_qlab: FakeQlab
) -> None:
    fake_qlab.add_order("R-1", results=[{"code": "HGB", "value": 142}])
    fake_qlab.inject("R-1", "results", Fault(status=503), times=2)

    order = lis_client.fetch_order("R-1")

    assert order.results[0].value == "142"
    assert fake_qlab.request_count("results", "R-1") == 3


def test_pdf_cut_short_of_its_content_length_is_retried(
    lis_client: QlabClient, fake_qlab: FakeQlab
) -> None:
    pdf = sample_pdf("cut", size=200_000)
    fake_qlab.add_order("P-1", pdf=pdf)
    fake_qlab.inject("P-1", "pdf", Fault(truncate_at=100_000))
    sink = io.BytesIO()

    assert lis_client.fetch_pdf("P-1", sink, max_bytes=10**6) == len(pdf)
    assert sink.getvalue() == pdf
    assert fake_qlab.request_count("pdf", "P-1") == 2


def test_pdf_connection_reset_mid_body_is_retried(
    lis_client: QlabClient, fake_qlab: FakeQlab
) -> None:
    pdf = sample_pdf("reset", size=200_000)
    fake_qlab.add_order("P-2", pdf=pdf)
    fake_qlab.inject("P-2", "pdf", Fault(reset_after=70_000))
    sink = io.BytesIO()

    assert lis_client.fetch_pdf("P-2", sink, max_bytes=10**6) == len(pdf)
    assert sink.getvalue() == pdf


def test_persistent_reset_ends_as_transient_error(
    lis_client: QlabClient, fake_qlab: FakeQlab
) -> None:
    fake_qlab.add_order("P-3", pdf=sample_pdf("x", size=100_000))
    fake_qlab.inject("P-3", "pdf", Fault(reset_after=10), times=None)

    with pytest.raises(TransientLisError):
        lis_client.fetch_pdf("P-3", io.BytesIO(), max_bytes=10**6)
    assert fake_qlab.request_count("pdf", "P-3") == 3  # retry_attempts


def test_read_timeout_is_transient(fake_qlab: FakeQlab) -> None:
    config = LisConfig(
        adapter="qlab",
        base_url=fake_qlab.base_url,
        api_key=Secret(API_KEY),
        read_timeout=0.2,
        retry_attempts=2,
    )
    client = QlabClient(config, sleep=lambda seconds: None)
    fake_qlab.add_order("T-1")
    fake_qlab.inject("T-1", "results", Fault(delay=1.0), times=None)

    with pytest.raises(TransientLisError, match="timed out"):
        client.fetch_order("T-1")
    client.close()


def test_html_error_page_with_200_is_bad_data(lis_client: QlabClient, fake_qlab: FakeQlab) -> None:
    fake_qlab.add_order("H-1")
    fake_qlab.inject(
        "H-1", "results", Fault(body=b"<html>maintenance</html>", content_type="text/html")
    )

    with pytest.raises(BadLisData, match="expected JSON"):
        lis_client.fetch_order("H-1")


def test_create_order_sends_the_website_source(lis_client: QlabClient, fake_qlab: FakeQlab) -> None:
    patient = Patient(phone="+79991112233", last_name="Ли", first_name="Ким")

    lis_client.create_order(patient, ["GLU"])

    (payload,) = fake_qlab.created
    assert payload["source"] == "website"
    assert payload["tests"] == ["GLU"]
    assert json.dumps(payload["patient"], ensure_ascii=False).count("+79991112233") == 1


def test_concurrent_calls_share_one_client_safely(fake_qlab: FakeQlab) -> None:
    fake_qlab.latency = 0.02  # long enough for requests to overlap
    client = _client(fake_qlab)
    for i in range(24):
        fake_qlab.add_order(f"C-{i}", results=[{"code": "HGB", "value": i}])

    with ThreadPoolExecutor(max_workers=6) as pool:
        orders = list(pool.map(client.fetch_order, [f"C-{i}" for i in range(24)]))

    assert [o.results[0].value for o in orders] == [str(i) for i in range(24)]
    assert fake_qlab.max_in_flight > 1
    client.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _tls_fake(tls_files: tuple[Path, Path]) -> FakeQlab:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return FakeQlab(api_key=API_KEY, ssl_context=context)


def test_tls_with_the_configured_ca_file_works(tls_files: tuple[Path, Path]) -> None:
    with _tls_fake(tls_files) as fake:
        fake.add_order("S-1", results=[{"code": "HGB", "value": 140}])
        config = LisConfig(
            adapter="qlab", base_url=fake.base_url, api_key=Secret(API_KEY), ca_file=tls_files[0]
        )
        client = QlabClient(config, sleep=lambda seconds: None)

        assert client.fetch_order("S-1").results[0].value == "140"
        client.close()


def test_tls_certificate_not_trusted_is_permanent(tls_files: tuple[Path, Path]) -> None:
    with _tls_fake(tls_files) as fake:
        fake.add_order("S-1")
        client = _client(fake)  # no ca_file: the self-signed certificate is not trusted

        with pytest.raises(PermanentLisError, match="certificate is not trusted"):
            client.fetch_order("S-1")
        assert fake.request_count() == 0  # refused in the handshake, never retried
        client.close()
