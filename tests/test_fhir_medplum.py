"""labsync's FHIR adapter against a real FHIR R4 server: Medplum's FhirRouter and
MemoryRepository (``tests/fhir_medplum.py``), loaded with the official R4 examples.

The first tests pin down what the server itself does, so that a failure below them is
labsync's: search by identifier with ``_include``, paging by ``next`` links (offset paging
under ``_count=20``, Medplum's ``_cursor`` paging from 20 on), ``_lastUpdated``, Binary.
Medplum normalises decimals (``5.0`` comes back as ``5``): byte-exact values are tested
against the Python fake, not here.
"""

from __future__ import annotations

import base64
import io
import time
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from labsync import config as config_mod
from labsync.config import Config
from labsync.errors import BadLisData, PermanentLisError, UnknownOrder
from labsync.lis.fhir import FhirClient
from labsync.model import BY_ORDER, LisOrder, OrderStatus, PdfRef
from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user
from tests.fhir_medplum import (
    ORDER_SYSTEM,
    MedplumServer,
    example,
    example_resources,
    observation,
)
from tests.helpers import events, order_row, results
from tests.processes import labsync, write_config

# -- the server itself ----------------------------------------------------------------------


def _next(bundle):
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"),
                None)


def _walk(medplum: MedplumServer, first_url: str) -> tuple[list[str], list[str]]:
    """Follow ``next`` links from ``first_url``: the match ids in order, and the URLs read."""
    ids, urls, url = [], [], first_url
    while url:
        urls.append(url)
        bundle = medplum.http.get(url, timeout=10).json()
        ids += [e["resource"]["id"] for e in bundle.get("entry", [])
                if e["search"]["mode"] == "match"]
        url = _next(bundle)
    return ids, urls


def test_the_server_finds_a_report_by_identifier_with_its_results_included(medplum):
    loaded = medplum.load("Bundle-lipids.json", "ORD-LIPIDS")

    bundle = medplum.search("DiagnosticReport", identifier=f"{ORDER_SYSTEM}|ORD-LIPIDS",
                            _include="DiagnosticReport:result")

    entries = [(e["search"]["mode"], e["resource"]["resourceType"], e["resource"]["id"])
               for e in bundle["entry"]]
    assert entries[0] == ("match", "DiagnosticReport", loaded.report_id)
    assert sorted(entries[1:]) == sorted(
        ("include", "Observation", loaded.id_of(n))
        for n in ("cholesterol", "triglyceride", "hdlcholesterol", "ldlcholesterol"))
    assert all(e["fullUrl"].startswith(medplum.base_url + "/") for e in bundle["entry"])
    assert medplum.search("DiagnosticReport", identifier=f"{ORDER_SYSTEM}|ORD-OTHER").get(
        "entry") is None


def test_the_server_takes_a_transaction_bundle(medplum):
    resources = example_resources("Bundle-lri-example.json")

    answer = medplum.transaction(resources)
    bundle = medplum.search("DiagnosticReport", _id="lri-example",
                            _include="DiagnosticReport:result")

    assert answer["type"] == "transaction-response" and len(answer["entry"]) == len(resources)
    assert len([e for e in bundle["entry"] if e["search"]["mode"] == "include"]) == 7


def test_the_server_normalises_decimals_so_byte_exact_values_are_the_fakes_to_test(medplum):
    loaded = medplum.load("Bundle-ghp.json", "ORD-GHP")

    raw = medplum.http.get(medplum.url(f"Observation/{loaded.id_of('u1')}"), timeout=10).text

    assert '"value":5,' in raw.replace(" ", "")  # the example says 5.0


@pytest.mark.parametrize("count", [2, 20], ids=["offset-paging", "cursor-paging"])
def test_the_server_pages_by_absolute_next_links_under_its_base(medplum, count):
    for i in range(45):
        medplum.add_report(f"ORD-{i}", [], report_id=f"page-{i:02d}")

    ids, urls = _walk(medplum, medplum.url(
        f"DiagnosticReport?_lastUpdated=gt2020-01-01T00:00:00.000%2B03:00"
        f"&_sort=_lastUpdated&_count={count}"))

    assert ids == [f"page-{i:02d}" for i in range(45)]
    assert len(urls) == -(-45 // count)
    assert all(u.startswith(medplum.base_url + "/DiagnosticReport?") for u in urls)
    assert ("_cursor=" in urls[1]) == (count >= 20)  # Medplum's server pages by cursor from 20


def test_the_server_answers_an_unencoded_plus_in_an_offset_with_400(medplum):
    answer = medplum.http.get(
        medplum.url("DiagnosticReport?_lastUpdated=gt2020-01-01T00:00:00.000+03:00"), timeout=10)

    assert answer.status_code == 400  # '+' is a space in a query: offsets must be %2B


def test_an_update_gets_a_new_version_and_a_later_last_updated(medplum):
    first = medplum.add_report("ORD-U", [observation("obs-u", "2345-7", 5.4, "mmol/L")],
                               report_id="rep-u", status="preliminary")

    time.sleep(0.005)  # meta.lastUpdated has milliseconds: let one pass
    second = medplum.update("DiagnosticReport", "rep-u", lambda r: r.update(status="final"))
    changed = medplum.search("DiagnosticReport",
                             _lastUpdated=f"gt{first['meta']['lastUpdated']}")

    assert second["meta"]["versionId"] != first["meta"]["versionId"]
    assert second["meta"]["lastUpdated"] > first["meta"]["lastUpdated"]
    assert [e["resource"]["status"] for e in changed["entry"]] == ["final"]


def test_the_server_serves_a_binary_raw_or_as_json_by_the_accept_header(medplum):
    pdf = sample_pdf("binary test")
    medplum.put_binary("pdf-1", pdf)

    raw = requests.get(medplum.url("Binary/pdf-1"), headers={"Accept": "application/pdf"},
                       timeout=10)
    as_json = medplum.read("Binary", "pdf-1")

    assert raw.status_code == 200 and raw.headers["Content-Type"] == "application/pdf"
    assert raw.content == pdf
    assert base64.b64decode(as_json["data"]) == pdf
    assert urlsplit(medplum.base_url).path == "/fhir/R4"


# -- labsync's adapter ----------------------------------------------------------------------

DAY_AGO = datetime.now(UTC) - timedelta(days=1)
LIPIDS = [  # Bundle-lipids.json as Medplum serves it: 2.0 and 3.0 come back as 2 and 3
    ("35200-5", "Cholesterol", "6.3", "mmol/L", None, "4.5"),
    ("35217-9", "Triglyceride", "1.3", "mmol/L", None, "2"),
    ("2085-9", "Cholesterol in HDL", "1.3", "mmol/L", "1.5", None),
    ("13457-7", "LDL Chol. (Calc)", "4.6", "mmol/L", None, "3"),
]


def fhir_config(base_url: str, tmp_path, **fhir) -> Config:
    """A config of the FHIR adapter at ``base_url`` (the database is never opened)."""
    raw = {
        "database": {"url": f"sqlite:///{tmp_path / 'unused.db'}"},
        "site": {"timezone": "Europe/Moscow"},
        "lis": {"adapter": "fhir", "base_url": base_url, "connect_timeout": 2,
                "read_timeout": 10, "retry_attempts": 2, "retry_max_seconds": 5,
                "fhir": {"order_system": ORDER_SYSTEM, **fhir}},
        "pdf": {"dir": str(tmp_path / "pdfs")},
        "notify": {"site_id": "s1"},
    }
    return config_mod.from_mapping(raw, env={})


@pytest.fixture
def connect(medplum, tmp_path):
    """``connect(**lis_fhir)``: labsync's FhirClient on the server, retries without sleeping."""
    clients: list[FhirClient] = []

    def make(**fhir) -> FhirClient:
        client = FhirClient(fhir_config(medplum.base_url, tmp_path, **fhir).lis,
                            sleep=lambda _s: None)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _rows(order: LisOrder):
    return [(r.code, r.name, r.value, r.unit, r.ref_min, r.ref_max) for r in order.results]


def _gets(medplum: MedplumServer) -> list[str]:
    return [r["url"] for r in medplum.requests() if r["method"] == "GET"]


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _fhir_instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _read_feed(client: FhirClient, cursor: str | None,
               between=None) -> tuple[list[LisOrder], str | None, int]:
    """Read the feed to its last page: every order it gave, the cursor, the pages read.
    ``between(n)`` runs after page ``n`` (1-based) when there is a next one."""
    page = client.changes(cursor, since=DAY_AGO if cursor is None else None)
    orders, pages = list(page.orders), 1
    while page.more:
        if between is not None:
            between(pages)
        page = client.changes(page.cursor)
        orders += page.orders
        pages += 1
    return orders, page.cursor, pages


def _latest(orders) -> dict[str, LisOrder]:
    """The last answer the feed gave for each order (it is oldest change first)."""
    return {o.external_id: o for o in orders}


def test_fetch_order_finds_the_report_by_identifier_with_its_results_in_one_request(
        medplum, connect):
    loaded = medplum.load("Bundle-lipids.json", "ORD-LIPIDS")
    medplum.clear_requests()

    order = connect().fetch_order("ORD-LIPIDS")

    assert order.status is OrderStatus.COMPLETED
    assert _rows(order) == LIPIDS
    eleven = timezone(timedelta(hours=11))  # the report's effectiveDateTime, its offset kept
    assert {r.result_date for r in order.results} == {datetime(2011, 3, 4, 8, 30, tzinfo=eleven)}
    assert order.version == loaded.report["meta"]["versionId"]
    assert order.changed_at == _instant(loaded.report["meta"]["lastUpdated"])
    [url] = _gets(medplum)
    query = parse_qs(urlsplit(url).query)
    assert urlsplit(url).path == "/fhir/R4/DiagnosticReport"
    assert query["identifier"] == [f"{ORDER_SYSTEM}|ORD-LIPIDS"]
    assert query["_include"] == ["DiagnosticReport:result"]


def test_fetch_order_flattens_the_has_member_panels_of_a_real_general_health_profile(
        medplum, connect):
    medplum.load("Bundle-ghp.json", "ORD-GHP")
    leaves = [r for r in example_resources("Bundle-ghp.json")
              if r["resourceType"] == "Observation" and not r.get("hasMember")]
    flagged = {r["code"]["coding"][0]["code"] for r in leaves
               if {c["code"] for i in r.get("interpretation", []) for c in i.get("coding", [])}
               & {"H", "HH", "L", "LL", "A", "AA"}}
    medplum.clear_requests()

    order = connect().fetch_order("ORD-GHP")

    assert len(order.results) == len(leaves) == 48  # 3 panels, no row of their own
    assert sorted(r.code for r in order.results) == sorted(
        r["code"]["coding"][0]["code"] for r in leaves)
    assert {r.code for r in order.results if r.abnormal} == flagged and flagged
    by_code = {r.code: r for r in order.results}
    assert by_code["30391-7"].value == "<1"  # urine erythrocytes: comparator "<", value 1
    assert by_code["2756-5"].value == "5"  # urine pH: 5.0 in the example, 5 from Medplum
    assert len(_gets(medplum)) == 1  # panel members come with _include:iterate


def test_fetch_order_reads_an_observation_its_search_answer_lacks(medplum, connect):
    medplum.put(observation("glu-1", "2345-7", 7.9, "mmol/L", name="Glucose"))
    medplum.add_report("ORD-ABS", [], report_id="rep-abs",  # absolute: Medplum includes none
                       result=[{"reference": medplum.url("Observation/glu-1")}])
    medplum.clear_requests()

    order = connect().fetch_order("ORD-ABS")

    assert _rows(order) == [("2345-7", "Glucose", "7.9", "mmol/L", None, None)]
    assert _gets(medplum)[1:] == [medplum.url("Observation/glu-1")]


def test_an_order_without_a_report_is_unknown(medplum, connect):
    medplum.load("Bundle-lipids.json", "ORD-THERE")

    with pytest.raises(UnknownOrder):
        connect().fetch_order("ORD-NOT-THERE")


def test_a_report_whose_results_the_server_does_not_have_is_an_error_not_an_unknown_order(
        medplum, connect):
    # The real f001 CBC names Observation/f001..f005; the examples hold only f001 and f004.
    medplum.load("Bundle-f001.json", "ORD-F001",
                 extra=("Observation-f001.json", "Observation-f004.json"))

    with pytest.raises(PermanentLisError) as raised:
        connect().fetch_order("ORD-F001")

    assert not isinstance(raised.value, UnknownOrder)
    assert "f002" in str(raised.value)


def test_the_feed_sees_a_report_go_preliminary_then_final_then_amended(medplum, connect):
    client = connect()
    lipids = medplum.load("Bundle-lipids.json", "ORD-A", status="preliminary")
    medplum.load("Bundle-lri-example.json", "ORD-B")

    first, cursor, _ = _read_feed(client, None)
    seen = _latest(first)

    assert {k: o.status for k, o in seen.items()} == {
        "ORD-A": OrderStatus.PROCESSING, "ORD-B": OrderStatus.COMPLETED}

    final = medplum.update("DiagnosticReport", lipids.report_id,
                           lambda r: r.update(status="final"))
    second, cursor, _ = _read_feed(client, cursor)
    now = _latest(second)

    assert now["ORD-A"].status is OrderStatus.COMPLETED
    assert now["ORD-A"].version == final["meta"]["versionId"] != seen["ORD-A"].version
    assert now["ORD-A"].changed_at > seen["ORD-A"].changed_at
    # what the overlap re-reads comes at the version already applied: the engine skips it
    assert "ORD-B" not in now or now["ORD-B"].same_version_as(seen["ORD-B"])

    medplum.update("Observation", lipids.id_of("cholesterol"),
                   lambda o: o["valueQuantity"].update(value=7.1))
    amended = medplum.update("DiagnosticReport", lipids.report_id,
                             lambda r: r.update(status="amended"))
    third, _, _ = _read_feed(client, cursor)
    corrected = _latest(third)["ORD-A"]

    assert corrected.status is OrderStatus.COMPLETED
    assert corrected.version == amended["meta"]["versionId"]
    assert _rows(corrected)[0] == ("35200-5", "Cholesterol", "7.1", "mmol/L", None, "4.5")


def test_the_feed_reads_offset_paged_results_to_the_end_each_report_once(medplum, connect):
    for i in range(5):
        medplum.add_report(f"ORD-P{i}", [observation(f"obs-p{i}", "2345-7", 5 + i, "mmol/L")],
                           report_id=f"rep-p{i}")
    medplum.clear_requests()

    orders, _, pages = _read_feed(connect(page_size=2), None)

    assert pages >= 3
    assert [o.external_id for o in orders] == [f"ORD-P{i}" for i in range(5)]
    assert [r.value for o in orders for r in o.results] == ["5", "6", "7", "8", "9"]
    feed = [u for u in _gets(medplum) if "/DiagnosticReport?" in u]
    assert len(feed) == pages
    assert all(u.startswith(medplum.base_url + "/") for u in feed)  # never off the base


def test_the_feed_gives_every_report_once_across_medplums_pages(medplum, connect):
    for i in range(45):
        medplum.add_report(f"ORD-C{i:02d}", [], report_id=f"rep-c{i:02d}")
    medplum.clear_requests()

    orders, _, pages = _read_feed(connect(page_size=20), None)

    assert pages == 3
    assert [o.external_id for o in orders] == [f"ORD-C{i:02d}" for i in range(45)]


def test_a_cursor_read_again_gives_the_same_changes_again(medplum, connect):
    client = connect(page_size=2)
    for i in range(3):
        medplum.add_report(f"ORD-R{i}", [], report_id=f"rep-r{i}")
    first = client.changes(None, since=DAY_AGO)

    again = client.changes(first.cursor)  # labsync crashed before it stored this page's
    twice = client.changes(first.cursor)

    assert first.more
    assert [(o.external_id, o.version) for o in again.orders] == [
        (o.external_id, o.version) for o in twice.orders] == [
        ("ORD-R2", medplum.read("DiagnosticReport", "rep-r2")["meta"]["versionId"])]


def test_the_cursor_skips_no_change_made_while_the_feed_is_being_paged(medplum, connect):
    client = connect(page_size=20, overlap="0s")
    for i in range(45):
        medplum.add_report(f"ORD-S{i:02d}", [], report_id=f"rep-s{i:02d}", status="preliminary")
    changed = {}

    def meanwhile(page: int) -> None:
        if page == 1:  # reports already read move behind the rest; one more arrives
            for rid in ("rep-s00", "rep-s05", "rep-s19"):
                changed[rid] = medplum.update("DiagnosticReport", rid,
                                              lambda r: r.update(status="final"))
            medplum.add_report("ORD-NEW", [], report_id="rep-new")

    orders, cursor, _ = _read_feed(client, None, between=meanwhile)
    quiet, _, _ = _read_feed(client, cursor)
    latest = _latest(orders + quiet)

    assert set(latest) == {f"ORD-S{i:02d}" for i in range(45)} | {"ORD-NEW"}
    for rid, stored in changed.items():
        order = latest[rid.replace("rep-s", "ORD-S")]
        assert (order.status, order.version) == (OrderStatus.COMPLETED,
                                                 stored["meta"]["versionId"])


def test_the_cursor_skips_no_old_report_when_one_changes_while_offset_pages_are_read(
        medplum, connect):
    client = connect(page_size=2)  # the default overlap of 2 minutes
    for i in range(5):  # changed yesterday: a backlog, as after an outage
        medplum.create({"resourceType": "DiagnosticReport", "id": f"old-{i}", "status": "final",
                        "code": {"text": "CBC"},
                        "identifier": [{"system": ORDER_SYSTEM, "value": f"ORD-OLD{i}"}],
                        "meta": {"lastUpdated": _fhir_instant(DAY_AGO + timedelta(seconds=i))}})

    def meanwhile(page: int) -> None:
        if page == 1:
            medplum.update("DiagnosticReport", "old-0", lambda r: r.update(status="amended"))

    orders, cursor, _ = _read_feed(client, None, between=meanwhile)
    later, _, _ = _read_feed(client, cursor)

    assert set(_latest(orders + later)) == {f"ORD-OLD{i}" for i in range(5)}


def test_one_broken_report_does_not_stop_the_feed_for_the_others(medplum, connect):
    medplum.load("Bundle-f001.json", "ORD-BROKEN")  # names Observations that are not there
    medplum.load("Bundle-lipids.json", "ORD-FINE")

    page = connect().changes(None, since=DAY_AGO)

    assert "ORD-FINE" in _latest(page.orders) and "ORD-BROKEN" not in _latest(page.orders)
    assert [p.external_id for p in page.problems] == ["ORD-BROKEN"]


def test_a_report_of_no_order_of_the_sites_moves_the_cursor_too(medplum, connect):
    client = connect(overlap="0s")
    medplum.add_report("ORD-OWN", [], report_id="own")
    medplum.put({"resourceType": "DiagnosticReport", "id": "foreign", "status": "final",
                 "code": {"text": "X-ray"}, "identifier": [{"system": "urn:other", "value": "X"}]})
    orders, cursor, _ = _read_feed(client, None)
    medplum.clear_requests()

    again, _, _ = _read_feed(client, cursor)

    assert [o.external_id for o in orders] == ["ORD-OWN"] and again == []
    [url] = _gets(medplum)
    assert medplum.http.get(url, timeout=10).json().get("entry") is None  # nothing re-read


def test_the_pdf_of_a_presented_form_url_is_fetched_from_the_binary(medplum, connect):
    pdf = sample_pdf("ORD-PDF")
    medplum.put_binary("pdf-rel", pdf)
    medplum.add_report("ORD-PDF", [observation("obs-pdf", "2345-7", 5.4, "mmol/L")],
                       presentedForm=[{"contentType": "application/pdf", "url": "Binary/pdf-rel",
                                       "title": "report.pdf"}])
    client = connect()
    order = client.fetch_order("ORD-PDF")
    medplum.clear_requests()
    sink = io.BytesIO()

    size = client.fetch_pdf("ORD-PDF", sink, max_bytes=10_000_000, ref=order.pdf)

    assert order.pdf == PdfRef.at("Binary/pdf-rel")
    assert sink.getvalue() == pdf and size == len(pdf)
    assert [(r["url"], r["accept"]) for r in medplum.requests()] == [
        (medplum.url("Binary/pdf-rel"), "application/pdf")]


def test_the_pdf_by_order_follows_an_absolute_form_url_under_the_base(medplum, connect):
    pdf = sample_pdf("ORD-PDF-ABS")
    medplum.put_binary("pdf-abs", pdf)
    medplum.add_report("ORD-PDF-ABS", [], presentedForm=[
        {"contentType": "application/pdf", "url": medplum.url("Binary/pdf-abs")}])
    sink = io.BytesIO()

    connect().fetch_pdf("ORD-PDF-ABS", sink, max_bytes=10_000_000, ref=BY_ORDER)

    assert sink.getvalue() == pdf


def test_an_inline_pdf_of_a_real_report_comes_with_the_order(medplum, connect):
    medplum.load("DiagnosticReport-gingival-mass.json", "ORD-PATH")
    form = example("DiagnosticReport-gingival-mass.json")["presentedForm"][0]

    order = connect().fetch_order("ORD-PATH")

    assert order.pdf == PdfRef.inline(base64.b64decode(form["data"]))
    assert order.pdf.data.startswith(b"%PDF-1.7")


def test_a_form_url_outside_the_base_is_bad_data_and_never_fetched(medplum, connect):
    medplum.put_binary("pdf-out", sample_pdf("out"))
    outside = f"{medplum.origin}/elsewhere/Binary/pdf-out"
    medplum.add_report("ORD-OUT", [], presentedForm=[
        {"contentType": "application/pdf", "url": outside}])
    client = connect()
    order = client.fetch_order("ORD-OUT")
    medplum.clear_requests()

    with pytest.raises(BadLisData):
        client.fetch_pdf("ORD-OUT", io.BytesIO(), max_bytes=10_000_000, ref=order.pdf)

    assert medplum.requests() == []


# -- end to end: `labsync sync-once` against Medplum, into MariaDB ----------------------------


def _sync_once(config_path, log_path) -> None:
    process = labsync(config_path, "sync-once", log=log_path)
    try:
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, log_path.read_text(errors="replace")[-3000:]


def _site_rows(db, external_id):
    return [(r.TEST_CODE, r.TEST_NAME, r.RESULT_VALUE, r.RESULT_UNIT, r.REFERENCE_MIN,
             r.REFERENCE_MAX) for r in results(db, external_id)]


@pytest.mark.mariadb
def test_sync_once_against_medplum_writes_results_and_a_correction_into_mariadb(
        mariadb, medplum, tmp_path):
    db = mariadb
    db.clear()
    add_user(db, 7)
    add_order(db, "ORD-E2E-1", 7)
    add_order(db, "ORD-E2E-2", 7)
    pdf_1, pdf_2 = sample_pdf("ORD-E2E-1"), sample_pdf("ORD-E2E-2")
    medplum.put_binary("pdf-e2e-1", pdf_1)
    lipids = medplum.load("Bundle-lipids.json", "ORD-E2E-1", change=lambda r: r.update(
        presentedForm=[{"contentType": "application/pdf", "url": "Binary/pdf-e2e-1"}]))
    ghp = medplum.load("Bundle-ghp.json", "ORD-E2E-2", status="preliminary")
    medplum.load("Bundle-lri-example.json", "ORD-NOT-ON-THE-SITE")
    config_path = write_config(
        tmp_path / "labsync.toml", db_url=db.url, lis_url=medplum.base_url, api_key="unused",
        pdf_dir=tmp_path / "pdfs", lis={"adapter": "fhir"}, site={"timezone": "Europe/Moscow"},
        notify={"site_id": "s1"}, **{"lis.fhir": {"order_system": ORDER_SYSTEM,
                                                  "page_size": 20}})

    _sync_once(config_path, tmp_path / "first.log")

    assert order_row(db, "ORD-E2E-1").STATUS == "completed"
    assert _site_rows(db, "ORD-E2E-1") == sorted(LIPIDS)
    # 2011-03-04 08:30 at +11:00 is 00:30 in Moscow (UTC+3 then)
    assert {r.RESULT_DATE for r in results(db, "ORD-E2E-1")} == {datetime(2011, 3, 4, 0, 30)}
    assert (tmp_path / "pdfs" / "7" / "ORD-E2E-1.pdf").read_bytes() == pdf_1
    assert order_row(db, "ORD-E2E-2").STATUS == "processing"
    assert db.scalar("SELECT COUNT(*) FROM local_lab_orders") == 2  # the lab's other order
    assert [e.EVENT_NAME for e in events(db)] == ["LAB_RESULTS_READY"]
    assert db.scalar("SELECT COUNT(*) FROM labsync_cursors") == 1

    medplum.update("Observation", lipids.id_of("cholesterol"),
                   lambda o: o["valueQuantity"].update(value=7.1))
    medplum.update("DiagnosticReport", lipids.report_id, lambda r: r.update(status="corrected"))
    medplum.update("DiagnosticReport", ghp.report_id, lambda r: r.update(
        status="final", presentedForm=[{"contentType": "application/pdf",
                                        "data": base64.b64encode(pdf_2).decode()}]))
    ids_before = [r.ID for r in results(db, "ORD-E2E-1")]

    _sync_once(config_path, tmp_path / "second.log")

    rows = _site_rows(db, "ORD-E2E-1")
    assert rows[2] == ("35200-5", "Cholesterol", "7.1", "mmol/L", None, "4.5")
    assert rows[:2] + rows[3:] == [r for r in sorted(LIPIDS) if r[0] != "35200-5"]
    assert [r.ID for r in results(db, "ORD-E2E-1")] == ids_before  # updated in place
    assert order_row(db, "ORD-E2E-2").STATUS == "completed"
    assert len(results(db, "ORD-E2E-2")) == 48
    assert (tmp_path / "pdfs" / "7" / "ORD-E2E-2.pdf").read_bytes() == pdf_2
    assert sorted(e.EVENT_NAME for e in events(db)[1:]) == [
        "LAB_RESULTS_READY", "LAB_RESULTS_UPDATED"]
