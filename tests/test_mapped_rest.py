"""The mapped adapter over REST: the shared suite against a fake LIMS of each REST shape
(MedWork-like, and the nested referral with its PDF inline), mapped by the example configs
as written; then what HTTP does to it, each answer classified by ``lis/classify.py``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import date

import pytest

from labsync.app import built_problems
from labsync.errors import (
    BadLisData,
    ConfigError,
    LisAuthError,
    PdfNotReady,
    PermanentLisError,
    TransientLisError,
    UnknownOrder,
)
from labsync.lis.base import Capability, capabilities
from labsync.lis.mapped import MappedClient
from labsync.model import OrderStatus, Patient, PdfKind, TestResult
from labsync.testing.fake_rest_lims import MEDWORK, NESTED, FakeRestLims, Fault
from labsync.testing.pdfs import sample_pdf
from tests.lis_conformance import LisClientConformance
from tests.mapped_support import (
    RETRY_ATTEMPTS,
    CapabilitiesByConfig,
    LimsGlue,
    client_for,
    config_with,
    lis_config,
    lis_table,
    no_sleep,
)

TOKEN = "rest-token-4d1e9b"
GLU = TestResult(code="GLU", name="Глюкоза", value="6.30", unit="ммоль/л", ref_min="3.9",
                 ref_max="6.1", abnormal=True)
CAPABILITIES = {"medwork": frozenset({Capability.ORDER_LOOKUP, Capability.PDF,
                                      Capability.PATIENT_SEARCH}),
                "nested": frozenset({Capability.ORDER_LOOKUP, Capability.PATIENT_SEARCH})}


@pytest.fixture(params=[MEDWORK, NESTED], ids=lambda shape: shape.name)
def lims(request: pytest.FixtureRequest) -> Iterator[FakeRestLims]:
    with FakeRestLims(request.param, token=TOKEN) as fake:
        yield fake


@pytest.fixture
def medwork() -> Iterator[FakeRestLims]:
    with FakeRestLims(MEDWORK, token=TOKEN) as fake:
        yield fake


@pytest.fixture
def lis_client(lims: FakeRestLims) -> Iterator[MappedClient]:
    client = client_for(lims)
    yield client
    client.close()


@pytest.fixture
def lis_server(lims: FakeRestLims) -> LimsGlue:
    return LimsGlue(lims, CAPABILITIES[lims.shape.name])


class TestMappedRestConformance(CapabilitiesByConfig, LisClientConformance):
    """The shared suite, run against the mapped adapter and a fake REST LIMS."""


# -- what the configuration decides ------------------------------------------------------------


def test_the_nested_lims_gives_its_pdf_inline_and_needs_no_pdf_source() -> None:
    with FakeRestLims(NESTED, token=TOKEN) as fake:
        pdf = sample_pdf("inline")
        fake.add_order("N-1", results=[GLU], pdf=pdf)
        client = client_for(fake)

        order = client.fetch_order("N-1")

        assert order.pdf is not None and order.pdf.kind is PdfKind.INLINE
        assert order.pdf.data == pdf
        assert Capability.PDF not in capabilities(client)
        with pytest.raises(PermanentLisError, match="no PDF source"):
            client.fetch_pdf("N-1", io.BytesIO(), max_bytes=10**6)
        assert fake.request_count() == 1


def test_without_find_url_there_is_no_patient_search(medwork: FakeRestLims) -> None:
    client = client_for(medwork, find_url=None, find_each=None, find=None)

    assert capabilities(client) == {Capability.ORDER_LOOKUP, Capability.PDF}
    with pytest.raises(PermanentLisError, match="find_url is not set"):
        client.find_orders("+79991234567", date(2024, 1, 1))


def test_rest_without_base_url_is_a_config_error_naming_the_key(medwork: FakeRestLims) -> None:
    lis = lis_table(medwork)
    del lis["base_url"]

    with pytest.raises(ConfigError) as caught:
        MappedClient(config_with(lis).lis)

    assert caught.value.problems == ['lis.base_url: required with lis.mapped.transport = '
                                     '"rest"']


# -- requests -------------------------------------------------------------------------------


def test_the_order_id_is_one_percent_encoded_path_segment(medwork: FakeRestLims) -> None:
    medwork.add_order("A/1 ?x", results=[GLU])
    client = client_for(medwork)

    assert client.fetch_order("A/1 ?x").results == (GLU,)
    assert medwork.request_count("order", "A/1 ?x") == 1


def test_the_credential_goes_in_its_header_and_a_wrong_one_is_an_auth_error_not_retried(
        medwork: FakeRestLims) -> None:
    medwork.add_order("A-1", results=[GLU])
    client = client_for(medwork, auth_value="Token wrong-token-77")

    with pytest.raises(LisAuthError) as caught:
        client.fetch_order("A-1")

    assert "wrong-token-77" not in str(caught.value)
    assert medwork.request_count("order", "A-1") == 1
    assert client_for(medwork).fetch_order("A-1").results == (GLU,)


@pytest.mark.parametrize(("fault", "error", "tries"), [
    (Fault(status=403), LisAuthError, 1),
    (Fault(status=404), UnknownOrder, 1),
    (Fault(status=429, headers={"Retry-After": "0"}), TransientLisError, RETRY_ATTEMPTS),
    (Fault(status=502), TransientLisError, RETRY_ATTEMPTS),
    (Fault(status=400), PermanentLisError, 1),
    (Fault(body=b"<html>maintenance</html>", content_type="text/html"), BadLisData, 1),
    (Fault(body=b'{"order": {"status": "DONE"}, "tests": {"code": "GLU"}}'), BadLisData, 1),
])
def test_http_answers_are_classified_by_the_one_classifier(
        medwork: FakeRestLims, fault: Fault, error: type[Exception], tries: int) -> None:
    medwork.add_order("C-1", results=[GLU])
    medwork.inject("C-1", "order", fault, times=None)

    with pytest.raises(error):
        client_for(medwork).fetch_order("C-1")
    assert medwork.request_count("order", "C-1") == tries


def test_a_pdf_not_there_yet_is_pdf_not_ready(medwork: FakeRestLims) -> None:
    medwork.add_order("P-1", status=OrderStatus.PROCESSING)

    with pytest.raises(PdfNotReady):
        client_for(medwork).fetch_pdf("P-1", io.BytesIO(), max_bytes=10**6)


def test_the_search_sends_the_phone_percent_encoded_and_the_date(
        medwork: FakeRestLims) -> None:
    patient = Patient(phone="+79991234567", last_name="Ли")
    medwork.add_order("F-1", patient=patient, order_date=date(2024, 5, 10))
    medwork.add_order("F-0", patient=patient, order_date=date(2024, 4, 1))

    found = client_for(medwork).find_orders("+79991234567", date(2024, 5, 1))

    assert [ref.external_id for ref in found] == ["F-1"]
    assert found[0].patient == patient


def test_a_probe_url_is_asked_instead_of_an_unknown_order(medwork: FakeRestLims) -> None:
    client = client_for(medwork, probe_url="/orders")  # the search, without a phone: 200

    client.probe()

    assert medwork.request_count("find") == 1 and medwork.request_count("order") == 0


def test_an_lis_echoing_the_credential_never_shows_it(medwork: FakeRestLims) -> None:
    medwork.add_order("E-1", results=[TestResult(code="X", name="x", value=TOKEN)],
                      raw_status=f"Token {TOKEN}")
    client = client_for(medwork)

    answer = client.answer_as_received("E-1")
    with pytest.raises(BadLisData) as caught:
        client.order_from_answer("E-1", answer)

    assert TOKEN.encode() not in answer.body and b"***" in answer.body
    assert TOKEN not in str(caught.value)


def test_retries_wait_through_the_injected_sleep(medwork: FakeRestLims) -> None:
    waits: list[float] = []
    medwork.add_order("S-1", results=[GLU])
    medwork.inject("S-1", "order", Fault(status=503), times=2)
    client = MappedClient(lis_config(medwork), sleep=waits.append)

    assert client.fetch_order("S-1").results == (GLU,)
    assert len(waits) == 2 and all(0 < wait <= 10.5 for wait in waits)


def test_discovery_with_a_mapping_without_find_url_is_refused_naming_the_key(
        medwork: FakeRestLims) -> None:
    lis = lis_table(medwork, find_url=None, find_each=None, find=None)
    config = config_with(lis, discovery={"enabled": True})
    client = MappedClient(config.lis, sleep=no_sleep)
    try:
        [problem] = built_problems(config, client)
    finally:
        client.close()

    assert problem.startswith('discovery.enabled: the "mapped" adapter, as configured, cannot '
                              "search orders by patient")
    with_find = config_with(lis_table(medwork), discovery={"enabled": True})
    assert built_problems(with_find, MappedClient(with_find.lis, sleep=no_sleep)) == []
