"""The FHIR adapter against the fake FHIR server over real HTTP: the shared suite.

The glue writes each order as a DiagnosticReport (its identifier in ``ORDER_SYSTEM``) with
one Observation per result, number-like values as JSON numbers with their literal text
(``5.40``), and the PDF as a ``Binary`` the report's ``presentedForm.url`` names. The feed
is read with ``overlap = 0s``: the suite's "nothing new after the cursor" is then exact
(the overlap's re-reads are tested in ``test_fhir_client.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from typing import Any

import pytest

from labsync.config import LisConfig
from labsync.lis.base import Capability
from labsync.lis.fhir import FhirClient
from labsync.model import OrderStatus, Patient, TestResult
from labsync.testing.fake_fhir import FakeFhir, Fault, Num
from tests.lis_conformance import LisClientConformance

TOKEN = "conformance-token-7d2a"
ORDER_SYSTEM = "http://lab.example/orders"
RETRY_ATTEMPTS = 3
_JSON_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_STATUS = {OrderStatus.RECEIVED: "registered", OrderStatus.PROCESSING: "partial",
           OrderStatus.COMPLETED: "final", OrderStatus.CANCELLED: "cancelled"}


def _literal(text: str | None) -> Any:
    return Num(text) if text is not None and _JSON_NUMBER.fullmatch(text) else text


def _observation(rid: str, result: TestResult) -> dict[str, Any]:
    code: dict[str, Any] = {"text": result.name} if result.name else {}
    if result.code:
        code["coding"] = [{"system": "http://loinc.org", "code": result.code}]
    item: dict[str, Any] = {"resourceType": "Observation", "id": rid, "status": "final",
                            "code": code,
                            "interpretation": [{"coding": [{"code": "H" if result.abnormal
                                                            else "N"}]}]}
    value = _literal(result.value)
    if isinstance(value, Num):
        item["valueQuantity"] = {"value": value, **({"unit": result.unit} if result.unit
                                                    else {})}
    elif value is not None:
        item["valueString"] = value
    if result.ref_min is not None or result.ref_max is not None:
        item["referenceRange"] = [{
            **({"low": {"value": _literal(result.ref_min)}} if result.ref_min else {}),
            **({"high": {"value": _literal(result.ref_max)}} if result.ref_max else {})}]
    if result.result_date is not None:
        item["effectiveDateTime"] = result.result_date.isoformat()
    return item


class FhirServer:
    """``lis_server`` for the conformance suite: model objects in, FHIR resources out."""

    capabilities = frozenset({Capability.ORDER_LOOKUP, Capability.CHANGE_FEED, Capability.PDF})
    retry_attempts = RETRY_ATTEMPTS
    says_changed_at = True  # meta.lastUpdated and meta.versionId

    def __init__(self, fake: FakeFhir) -> None:
        self.fake = fake
        self._pdfs: dict[str, bool] = {}

    def add_order(self, external_id: str, *, status: OrderStatus,
                  results: Sequence[TestResult], pdf: bytes | None, patient: Patient,
                  order_date: date, changed_at: datetime | None = None,
                  version: str | None = None) -> None:
        self.fake.put_binary(f"{external_id}-pdf", pdf)
        self._pdfs[external_id] = pdf is not None
        self._write(external_id, status, results, changed_at, version)

    def update_order(self, external_id: str, *, status: OrderStatus,
                     results: Sequence[TestResult], changed_at: datetime | None = None,
                     version: str | None = None) -> None:
        self._write(external_id, status, results, changed_at, version)

    def _write(self, external_id: str, status: OrderStatus, results: Sequence[TestResult],
               changed_at: datetime | None, version: str | None) -> None:
        ids = []
        for i, result in enumerate(results):
            rid = f"{external_id}-{i}"
            self.fake.put(_observation(rid, result))
            ids.append(rid)
        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport", "id": external_id,
            "identifier": [{"system": ORDER_SYSTEM, "value": external_id}],
            "status": _STATUS[status], "code": {"text": "Lab report"},
            "result": [{"reference": f"Observation/{rid}"} for rid in ids]}
        if self._pdfs.get(external_id):
            report["presentedForm"] = [{"contentType": "application/pdf",
                                        "url": f"Binary/{external_id}-pdf"}]
        self.fake.put(report, last_updated=changed_at, version=version)

    def set_pdf(self, external_id: str, pdf: bytes | None) -> None:
        self.fake.put_binary(f"{external_id}-pdf", pdf)
        if pdf is not None and not self._pdfs.get(external_id):
            self._pdfs[external_id] = True
            stored = self.fake.get("DiagnosticReport", external_id)
            assert stored is not None
            stored["presentedForm"] = [{"contentType": "application/pdf",
                                        "url": f"Binary/{external_id}-pdf"}]
            self.fake.put(stored)

    def fail(self, external_id: str | None, fault: str, *, on: str = "order",
             times: int | None = 1) -> None:
        endpoint = "search" if on == "order" else "binary"
        key = None if external_id is None else (
            external_id if on == "order" else f"{external_id}-pdf")
        if external_id is None:
            endpoint = "*"
        self.fake.inject(endpoint, _spoiled(fault, on, external_id), key=key, times=times)

    def requests(self, external_id: str, on: str) -> int:
        if on == "order":
            return self.fake.request_count("search", external_id)
        return self.fake.request_count("binary", f"{external_id}-pdf")


def _spoiled(fault: str, on: str, external_id: str | None) -> Fault:
    if fault == "unknown":  # FHIR's "no such order" is an empty search answer
        return Fault(body=b'{"resourceType": "Bundle", "type": "searchset", "total": 0}')
    if fault == "bad_data":
        if on == "order":  # a report in a status FHIR does not have
            return Fault(body=(b'{"resourceType": "Bundle", "type": "searchset", "entry": ['
                               b'{"resource": {"resourceType": "DiagnosticReport", '
                               b'"identifier": [{"system": "' + ORDER_SYSTEM.encode()
                               + b'", "value": "' + (external_id or "").encode()
                               + b'"}], "status": "finished"}}]}'))
        return Fault(body=b"<html>502 Bad Gateway</html>", content_type="text/html")
    status = {"auth": 401, "pdf_not_ready": 404, "transient": 503}[fault]
    return Fault(status=status)


def make_client(fake: FakeFhir, *, token: str = TOKEN, **options: Any) -> FhirClient:
    config = LisConfig(adapter="fhir", base_url=fake.base_url, connect_timeout=2.0,
                       read_timeout=5.0, retry_attempts=RETRY_ATTEMPTS, retry_max_seconds=10.0,
                       options={"token": token, "order_system": ORDER_SYSTEM, "overlap": 0,
                                **options})
    return FhirClient(config, sleep=lambda seconds: None)


@pytest.fixture
def fake_fhir() -> Iterator[FakeFhir]:
    with FakeFhir(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def lis_client(fake_fhir: FakeFhir) -> Iterator[FhirClient]:
    client = make_client(fake_fhir)
    yield client
    client.close()


@pytest.fixture
def lis_server(fake_fhir: FakeFhir) -> FhirServer:
    return FhirServer(fake_fhir)


class TestFhirConformance(LisClientConformance):
    """The shared suite, run against the FHIR adapter and the fake FHIR server."""
