"""The mapped adapter over SOAP: the shared suite against a real SOAP server (spyne serving
a WSDL on localhost, CaLab-like), mapped by ``config/examples/calab-soap.toml`` as written;
then faults and HTTP through the one classifier, the WSDL's life, numbers as the XML wrote
them, and a PDF too big for libxml2 without ``xml_huge_tree``."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zeep
import zeep.helpers

from labsync.errors import (
    BadLisData,
    LisAuthError,
    PermanentLisError,
    TransientLisError,
    UnknownOrder,
)
from labsync.lis.base import Capability
from labsync.lis.mapped import MappedClient
from labsync.model import OrderStatus, TestResult
from labsync.testing._faultserver import FaultServer, Request, Response
from labsync.testing.pdfs import sample_pdf
from labsync.testing.soap_lims import Fault, LisFault, SoapLims
from tests.lis_conformance import LisClientConformance
from tests.mapped_support import (
    RETRY_ATTEMPTS,
    CapabilitiesByConfig,
    LimsGlue,
    client_for,
    config_with,
    lis_table,
    no_sleep,
)

TOKEN = "soap-token-8c2f51"
GLU = TestResult(code="GLU", name="Глюкоза", value="6.30", unit="ммоль/л", ref_min="3.90",
                 ref_max="6.10", abnormal=True)


@pytest.fixture
def lims() -> Iterator[SoapLims]:
    with SoapLims(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def lis_client(lims: SoapLims) -> Iterator[MappedClient]:
    client = client_for(lims)
    yield client
    client.close()


@pytest.fixture
def lis_server(lims: SoapLims) -> LimsGlue:
    return LimsGlue(lims, frozenset({Capability.ORDER_LOOKUP, Capability.PDF}))


class TestMappedSoapConformance(CapabilitiesByConfig, LisClientConformance):
    """The shared suite, run against the mapped adapter and the spyne SOAP LIMS."""


# -- faults and HTTP, through lis/classify.py ---------------------------------------------------


def test_decimals_keep_their_text_and_the_status_code_its_literal(lims: SoapLims) -> None:
    lims.add_order("D-1", results=[GLU])

    answer = client_for(lims).answer_as_received("D-1")

    assert answer.data["StateCode"] == "3"  # an xs:int, as the XML wrote it
    result = answer.data["Results"]["Result"][0]
    assert (result["RefLow"], result["RefHigh"]) == ("3.90", "6.10")
    assert b"<tns:RefLow>3.90</tns:RefLow>" in answer.body


def test_without_a_not_found_fault_an_unknown_order_is_a_permanent_error(
        lims: SoapLims) -> None:
    client = client_for(lims, not_found_fault=None)

    with pytest.raises(PermanentLisError) as caught:
        client.fetch_order("NO-SUCH")

    assert not isinstance(caught.value, UnknownOrder)
    assert "SOAP fault Client.OrderNotFound" in str(caught.value)
    assert lims.request_count("order", "NO-SUCH") == 1


def test_a_server_fault_is_transient_and_retried_then_seen(lims: SoapLims) -> None:
    lims.add_order("B-1", results=[GLU])
    lims.inject("B-1", "order", LisFault("transient"), times=None)

    with pytest.raises(TransientLisError, match=r"SOAP fault Server\.Busy"):
        client_for(lims).fetch_order("B-1")
    assert lims.request_count("order", "B-1") == RETRY_ATTEMPTS


@pytest.mark.parametrize(("fault", "error", "tries"), [
    (Fault(status=401), LisAuthError, 1),
    (Fault(status=503), TransientLisError, RETRY_ATTEMPTS),
    (Fault(status=429, headers={"Retry-After": "0"}), TransientLisError, RETRY_ATTEMPTS),
    # a 404 from a SOAP endpoint is a wrong address, not an unknown order
    (Fault(status=404), PermanentLisError, 1),
    (Fault(body=b"<html>maintenance</html>", content_type="text/html"), BadLisData, 1),
])
def test_http_answers_that_are_no_soap_answer_are_classified(
        lims: SoapLims, fault: Fault, error: type[Exception], tries: int) -> None:
    lims.add_order("H-1", results=[GLU])
    lims.inject("H-1", "order", fault, times=None)

    with pytest.raises(error) as caught:
        client_for(lims).fetch_order("H-1")
    assert type(caught.value) is not UnknownOrder
    assert lims.request_count("order", "H-1") == tries


def test_the_token_never_shows_in_an_answer_or_a_message(lims: SoapLims) -> None:
    lims.add_order("T-1", results=[TestResult(code="X", name=TOKEN, value=TOKEN)],
                   raw_status="55")
    client = client_for(lims)

    answer = client.answer_as_received("T-1")
    with pytest.raises(BadLisData, match=r"status '55' is not in lis\.mapped\.status_map"):
        client.order_from_answer("T-1", answer)

    assert TOKEN.encode() not in answer.body and b"***" in answer.body


# -- the WSDL ---------------------------------------------------------------------------------


def test_the_wsdl_is_loaded_on_first_use_and_again_after_a_failure(lims: SoapLims) -> None:
    lims.add_order("W-1", results=[GLU])
    lims.inject(None, "wsdl", Fault(status=503))
    client = client_for(lims)
    assert lims.request_count() == 0  # built without asking anything

    with pytest.raises(TransientLisError, match="WSDL"):
        client.fetch_order("W-1")
    assert client.fetch_order("W-1").results == (GLU,)
    assert client.fetch_order("W-1").results == (GLU,)
    assert lims.request_count("wsdl") == 2


def test_an_operation_the_wsdl_lacks_is_named_with_the_key(lims: SoapLims) -> None:
    client = client_for(lims, pdf_operation="GetForm")

    with pytest.raises(PermanentLisError, match=r"lis\.mapped\.pdf_operation: the WSDL has no "
                                                r"operation 'GetForm'.*GetOrderForm"):
        client.fetch_order("A-1")


def test_arguments_the_operation_does_not_take_are_named_with_the_key(lims: SoapLims) -> None:
    client = client_for(lims, order_args={"OrderNo": "{id}", "Token": "{auth}"})

    with pytest.raises(PermanentLisError, match=r"lis\.mapped\.order_args do not fit"):
        client.fetch_order("A-1")
    assert lims.request_count("order") == 0


def test_a_wsdl_file_and_base_url_as_the_endpoint(lims: SoapLims, tmp_path: Path) -> None:
    import requests

    text = requests.get(lims.wsdl_url, timeout=5).text
    wsdl = tmp_path / "calab.wsdl"
    wsdl.write_text(text.replace(lims.endpoint, "http://127.0.0.1:9/nowhere"))
    lims.add_order("F-1", results=[GLU])
    lis = lis_table(lims, wsdl=str(wsdl))
    lis["base_url"] = lims.endpoint

    assert MappedClient(config_with(lis).lis, sleep=no_sleep).fetch_order("F-1").results == (
        GLU,)


# -- big PDFs -----------------------------------------------------------------------------------


def test_a_pdf_bigger_than_libxml2s_text_limit_arrives_whole(lims: SoapLims) -> None:
    pdf = sample_pdf("big", size=12 * 1024 * 1024)  # 16 MB of base64 in one text node
    lims.add_order("BIG-1", results=[GLU], pdf=pdf)
    sink = io.BytesIO()

    assert client_for(lims).fetch_pdf("BIG-1", sink, max_bytes=20 * 1024 * 1024) == len(pdf)
    assert sink.getvalue() == pdf


def test_an_empty_form_is_not_ready_yet(lims: SoapLims) -> None:
    from labsync.errors import PdfNotReady

    lims.add_order("E-1", status=OrderStatus.PROCESSING)

    with pytest.raises(PdfNotReady, match="gave nothing"):
        client_for(lims).fetch_pdf("E-1", io.BytesIO(), max_bytes=10**6)


# -- numbers as the XML wrote them ---------------------------------------------------------------

_WSDL = """<?xml version="1.0" encoding="UTF-8"?>
<definitions xmlns="http://schemas.xmlsoap.org/wsdl/"
  xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/"
  xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:tns="urn:lit" targetNamespace="urn:lit">
 <types><xs:schema targetNamespace="urn:lit" elementFormDefault="qualified">
  <xs:simpleType name="Level"><xs:restriction base="xs:float">
   <xs:minInclusive value="0"/></xs:restriction></xs:simpleType>
  <xs:element name="GetOrder"><xs:complexType><xs:sequence>
   <xs:element name="Id" type="xs:string"/></xs:sequence></xs:complexType></xs:element>
  <xs:element name="GetOrderResponse"><xs:complexType><xs:sequence>
   <xs:element name="State" type="xs:int"/>
   <xs:element name="Result" maxOccurs="unbounded"><xs:complexType><xs:sequence>
    <xs:element name="Code" type="xs:string"/>
    <xs:element name="Double" type="xs:double" minOccurs="0"/>
    <xs:element name="Decimal" type="xs:decimal" minOccurs="0"/>
    <xs:element name="Integer" type="xs:integer" minOccurs="0"/>
    <xs:element name="Level" type="tns:Level" minOccurs="0"/>
   </xs:sequence></xs:complexType></xs:element>
  </xs:sequence></xs:complexType></xs:element>
 </xs:schema></types>
 <message name="In"><part name="parameters" element="tns:GetOrder"/></message>
 <message name="Out"><part name="parameters" element="tns:GetOrderResponse"/></message>
 <portType name="Lab"><operation name="GetOrder"><input message="tns:In"/>
  <output message="tns:Out"/></operation></portType>
 <binding name="LabSoap" type="tns:Lab">
  <soap:binding transport="http://schemas.xmlsoap.org/soap/http" style="document"/>
  <operation name="GetOrder"><soap:operation soapAction="GetOrder"/>
   <input><soap:body use="literal"/></input><output><soap:body use="literal"/></output>
  </operation></binding>
 <service name="Lab"><port name="LabPort" binding="tns:LabSoap">
  <soap:address location="http://127.0.0.1:9/lab"/></port></service>
</definitions>
"""
_ANSWER = b"""<?xml version="1.0" encoding="UTF-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<GetOrderResponse xmlns="urn:lit"><State>3</State>
<Result><Code>A</Code><Double>5.40</Double><Decimal>3.90</Decimal><Integer>007</Integer>
<Level> 1.50E+3 </Level></Result>
<Result><Code>B</Code><Double>1e308</Double><Decimal>-0.50</Decimal><Integer>+12</Integer>
</Result></GetOrderResponse></s:Body></s:Envelope>"""


class _StaticSoap:
    """A SOAP endpoint that always gives ``_ANSWER``."""

    def handle(self, request: Request, stopping: threading.Event
               ) -> tuple[Response, None]:
        return Response(200, _ANSWER, "text/xml; charset=utf-8"), None


@pytest.fixture
def static_soap(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    server = FaultServer(_StaticSoap(), "127.0.0.1", 0, None)
    server.start()
    wsdl = tmp_path / "lit.wsdl"
    wsdl.write_text(_WSDL)
    try:
        yield f"http://127.0.0.1:{server.port}/lab", wsdl
    finally:
        server.stop()


def test_every_numeric_type_keeps_the_text_the_xml_gave(static_soap: tuple[str, Path]) -> None:
    endpoint, wsdl = static_soap
    lis = {"adapter": "mapped", "base_url": endpoint, "mapped": {
        "transport": "soap", "wsdl": str(wsdl), "order_operation": "GetOrder",
        "order_args": {"Id": "{id}"}, "status": "State",
        "status_map": {"3": "completed"},
        "results": {"each": "Result[]", "code": "Code", "value": "Double",
                    "ref_min": "Decimal", "ref_max": "Integer", "unit": "Level"}}}
    client = MappedClient(config_with(lis).lis, sleep=no_sleep)

    results = client.fetch_order("A").results

    assert [(r.value, r.ref_min, r.ref_max, r.unit) for r in results] == [
        ("5.40", "3.90", "007", "1.50E+3"), ("1e308", "-0.50", "+12", None)]
    # Only this adapter's zeep client parses numbers so: another one in the process does not.
    plain = zeep.Client(str(wsdl))
    service = plain.create_service("{urn:lit}LabSoap", endpoint)
    assert zeep.helpers.serialize_object(service.GetOrder(Id="A"), dict)["Result"][0][
        "Double"] == 5.4
