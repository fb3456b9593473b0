"""The FHIR adapter against the fake FHIR server over real HTTP on localhost: what it sends
(Bearer token, search parameters, the cursor), how it pages, where it refuses to go, and
what it does with every kind of failure."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from labsync import config as config_mod
from labsync.config import LisConfig
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
from labsync.lis.fhir import FhirClient
from labsync.lis.registry import make_client
from labsync.model import OrderStatus, PdfKind, PdfRef
from labsync.pdfs import PdfStore
from labsync.testing.fake_fhir import DripServer, FakeFhir, Fault, Num, observation, report
from labsync.testing.pdfs import sample_pdf

TOKEN = "fhir-token-91c3e7"
SYSTEM = "http://lab.example/orders"
MSK = timezone(timedelta(hours=3))
T0 = datetime(2026, 11, 30, 9, 0, tzinfo=MSK)


@pytest.fixture
def fake() -> Iterator[FakeFhir]:
    with FakeFhir(token=TOKEN) as server:
        yield server


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _client(fake: FakeFhir | DripServer, *, sleep: Any = None, token: str | None = TOKEN,
            lis: dict[str, Any] | None = None, **options: Any) -> FhirClient:
    settings: dict[str, Any] = {"order_system": SYSTEM, **options}
    if token is not None:
        settings["token"] = token
    transport = {"connect_timeout": 2.0, "read_timeout": 5.0, "retry_attempts": 3,
                 "retry_max_seconds": 30.0, **(lis or {})}
    config = LisConfig(adapter="fhir", base_url=fake.base_url, options=settings, **transport)
    return FhirClient(config, sleep=sleep if sleep is not None else (lambda seconds: None))


def _order(fake: FakeFhir, order_id: str, *values: tuple[str, Any], status: str = "final",
           at: datetime | None = None, version: str | None = None, **more: Any) -> None:
    ids = []
    for code, value in values:
        rid = f"{order_id}-{code}"
        fake.put(observation(rid, code, value))
        ids.append(rid)
    fake.put(report(order_id, order_id, status=status, system=SYSTEM, results=ids, **more),
             last_updated=at, version=version)


def _query(target: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(target).query)


# -- one order ------------------------------------------------------------------------------


def test_an_order_is_asked_by_identifier_with_its_results_included_and_the_bearer_token(fake):
    _order(fake, "A,1", ("GLU", Num("5.40")), ("HCV", "negative"))
    client = _client(fake)

    order = client.fetch_order("A,1")

    assert [(r.code, r.value) for r in order.results] == [("GLU", "5.40"), ("HCV", "negative")]
    (seen,) = fake.requests
    assert seen.authorization == f"Bearer {TOKEN}"
    assert urlsplit(seen.target).path == "/fhir/DiagnosticReport"
    assert _query(seen.target) == {
        "identifier": [f"{SYSTEM}|A\\,1"],  # FHIR's escape: one value, not two
        "_include": ["DiagnosticReport:result"],
        "_include:iterate": ["Observation:has-member"]}


def test_the_answer_as_received_is_the_same_search_and_reads_as_fetch_order(fake):
    _order(fake, "A,1", ("GLU", Num("5.40")), conclusion=f"sent with {TOKEN}")  # an echo
    client = _client(fake)

    answer = client.answer_as_received("A,1")

    assert b'"5.40"' not in answer.body and b"5.40" in answer.body  # the literal, as sent
    assert TOKEN.encode() not in answer.body and b"sent with ***" in answer.body
    assert client.order_from_answer("A,1", answer) == client.fetch_order("A,1")
    first, second = fake.requests
    assert first.target == second.target and first.accept == "application/fhir+json"


def test_observations_the_bundle_lacks_are_read_one_by_one(fake):
    fake.include = False
    _order(fake, "O-1", ("K", Num("4.10")), ("NA", Num("140")))
    client = _client(fake)

    order = client.fetch_order("O-1")

    assert [(r.code, r.value) for r in order.results] == [("K", "4.10"), ("NA", "140")]
    assert fake.targets("observation") == ["/fhir/Observation/O-1-K", "/fhir/Observation/O-1-NA"]


def test_a_missing_observation_the_server_does_not_have_is_not_a_silent_gap(fake):
    fake.include = False
    fake.put(report("O-2", "O-2", system=SYSTEM, results=["gone"]))

    with pytest.raises(PermanentLisError):
        _client(fake).fetch_order("O-2")


def test_no_report_for_the_order_is_unknown_order(fake):
    _order(fake, "OTHER", ("GLU", "1"))

    with pytest.raises(UnknownOrder):
        _client(fake).fetch_order("NOT-THERE")


def test_a_report_with_the_id_under_another_system_is_not_the_order(fake):
    fake.put(report("X", "X-1", system="urn:someone-else"))

    with pytest.raises(UnknownOrder):
        _client(fake).fetch_order("X-1")


def test_two_live_reports_for_one_order_are_refused_and_a_replaced_one_is_passed_over(fake):
    fake.put(report("old", "D-1", system=SYSTEM, status="entered-in-error"))
    fake.put(report("new", "D-1", system=SYSTEM, status="final"))
    client = _client(fake)

    assert client.fetch_order("D-1").status is OrderStatus.COMPLETED

    fake.put(report("third", "D-1", system=SYSTEM, status="preliminary"))
    with pytest.raises(BadLisData, match="2 DiagnosticReports carry this order"):
        client.fetch_order("D-1")


def test_the_probe_passes_on_a_working_server_and_reports_a_refused_token(fake):
    _client(fake).probe()
    with pytest.raises(LisAuthError):
        _client(fake, token="wrong").probe()


def test_a_refused_token_is_an_auth_error_not_retried_and_never_in_the_message(fake):
    client = _client(fake, token="wrong-token-0000")

    with pytest.raises(LisAuthError) as caught:
        client.fetch_order("A-1")

    assert fake.request_count() == 1
    assert "wrong-token-0000" not in str(caught.value)


def test_an_error_body_echoing_the_token_is_redacted(fake):
    fake.inject("search", Fault(status=500, body=f"bad token {TOKEN}".encode(),
                                content_type="text/plain"), times=None)

    with pytest.raises(TransientLisError) as caught:
        _client(fake).fetch_order("A-1")

    assert TOKEN not in str(caught.value) and "***" in str(caught.value)


def test_bad_data_quoting_the_token_is_redacted(fake):
    fake.put(report("R", "R-1", system=SYSTEM, status=f"weird-{TOKEN}"))

    with pytest.raises(BadLisData) as caught:
        _client(fake).fetch_order("R-1")

    assert TOKEN not in str(caught.value)


def test_429_waits_as_long_as_retry_after_says_then_succeeds(fake):
    _order(fake, "B-1", ("GLU", "5"))
    fake.inject("search", Fault(status=429, headers={"Retry-After": "7"}), times=2)
    sleeps = Sleeps()

    order = _client(fake, sleep=sleeps).fetch_order("B-1")

    assert order.results[0].value == "5"
    assert sleeps == [7.0, 7.0]
    assert fake.request_count("search") == 3


def test_5xx_is_retried_and_after_the_retries_is_a_transient_error(fake):
    _order(fake, "B-2", ("GLU", "5"))
    fake.inject("search", Fault(status=503), times=None)

    with pytest.raises(TransientLisError):
        _client(fake).fetch_order("B-2")
    assert fake.request_count("search") == 3  # retry_attempts


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"resourceType": "Patient"}',
                                  b'{"resourceType": "Bundle", "entry": {"x": 1}}'])
def test_garbage_is_bad_data_and_not_retried(fake, body):
    fake.inject("search", Fault(body=body), times=None)

    with pytest.raises(BadLisData):
        _client(fake).fetch_order("G-1")
    assert fake.request_count("search") == 1


def test_an_html_page_with_200_is_bad_data(fake):
    fake.inject("search", Fault(body=b"<html>login</html>", content_type="text/html"))

    with pytest.raises(BadLisData, match="expected JSON"):
        _client(fake).fetch_order("G-2")


def test_a_slow_answer_is_a_timeout(fake):
    fake.inject("search", Fault(delay=1.0), times=None)
    client = _client(fake, lis={"read_timeout": 0.2, "retry_attempts": 2})

    with pytest.raises(TransientLisError, match="timed out"):
        client.fetch_order("S-1")
    assert fake.request_count("search") == 2


def test_a_body_that_keeps_dripping_in_meets_the_download_time_limit():
    body = b'{"resourceType": "Bundle", "type": "searchset", "entry": []}' + b" " * 400
    with DripServer(body, chunk=4, interval=0.02) as drip:
        client = _client(drip, token=None, lis={"download_timeout": 0.3, "retry_attempts": 1})

        with pytest.raises(TransientLisError, match="download time limit"):
            client.fetch_order("S-2")


# -- the feed -------------------------------------------------------------------------------


def _drain(client: FhirClient, cursor: str | None = None, since: datetime | None = None
           ) -> tuple[list[Any], str | None, int]:
    seen, pages = [], 0
    while True:
        page = client.changes(cursor, since=since if cursor is None else None)
        pages += 1
        seen += page.orders
        cursor = page.cursor or cursor
        if not page.more:
            return seen, cursor, pages


def test_the_feed_reads_on_from_the_newest_change_until_more_is_false(fake):
    for i in range(7):
        _order(fake, f"F-{i}", ("GLU", Num(f"{i}.0")), at=T0 + timedelta(minutes=i))
    client = _client(fake, page_size=3)

    seen, cursor, pages = _drain(client, since=T0 - timedelta(days=1))

    assert [(o.external_id, o.results[0].value) for o in seen] == [
        (f"F-{i}", f"{i}.0") for i in range(7)]  # oldest first, each once
    assert pages == 3 and [r.endpoint for r in fake.requests] == ["feed"] * 3
    assert [_query(r.target)["_lastUpdated"] for r in fake.requests] == [
        ["ge2026-11-29T09:00:00.000+03:00"], ["ge2026-11-30T09:02:00.000+03:00"],
        ["ge2026-11-30T09:04:00.000+03:00"]]
    first = _query(fake.requests[0].target)
    assert (first["_sort"], first["_count"]) == (["_lastUpdated"], ["3"])
    assert all(r.authorization == f"Bearer {TOKEN}" for r in fake.requests)
    assert cursor == "fhir1;2026-11-30T09:06:00.000+03:00;"  # at rest: read to the end


def test_a_report_changed_while_offset_pages_are_read_shifts_nothing_out(fake):
    fake.paging = "offset"  # as Medplum pages: the search runs again from an _offset
    for i in range(5):
        _order(fake, f"OLD-{i}", ("GLU", "1"), at=T0 + timedelta(seconds=i), version="1")
    client = _client(fake, page_size=2)
    first = client.changes(None)
    _order(fake, "OLD-0", ("GLU", "2"), status="amended", at=T0 + timedelta(hours=1),
           version="2")  # moves behind the others

    rest, _, _ = _drain(client, first.cursor)

    seen = [(o.external_id, o.version) for o in (*first.orders, *rest)]
    assert {name for name, _ in seen} == {f"OLD-{i}" for i in range(5)}
    assert ("OLD-0", "2") in seen


def test_a_page_of_reports_written_at_one_instant_follows_the_next_link(fake):
    for i in range(5):
        _order(fake, f"B-{i}", ("GLU", "1"), at=T0)  # one batch, one lastUpdated
    client = _client(fake, page_size=2)

    seen, cursor, _ = _drain(client)

    assert {o.external_id for o in seen} == {f"B-{i}" for i in range(5)}
    assert "page" in [r.endpoint for r in fake.requests]
    assert cursor == "fhir1;2026-11-30T09:00:00.000+03:00;"


def test_the_cursor_is_sent_with_milliseconds_and_an_encoded_offset_less_the_overlap(fake):
    _order(fake, "C-1", ("GLU", "1"), at=datetime(2026, 11, 30, 9, 0, 0, 123456, tzinfo=MSK))
    client = _client(fake, overlap="2m")
    _, cursor, _ = _drain(client)
    assert cursor == "fhir1;2026-11-30T09:00:00.123+03:00;"

    client.changes(cursor)

    raw = fake.requests[-1].target
    assert "_lastUpdated=gt2026-11-30T08%3A58%3A00.123%2B03%3A00" in raw  # "+" as %2B


def test_the_overlap_finds_a_report_committed_late_with_an_earlier_time(fake):
    _order(fake, "OV-1", ("GLU", "1"), at=T0, version="v1")
    client = _client(fake, overlap="2m")
    _, cursor, _ = _drain(client)
    # Committed after the read, stamped a minute before the newest change read.
    _order(fake, "LATE-1", ("GLU", "2"), at=T0 - timedelta(minutes=1), version="v1")

    again = client.changes(cursor)

    assert [(o.external_id, o.version) for o in again.orders] == [("LATE-1", "v1")]
    assert again.cursor == cursor  # the cursor never moves back


def test_the_whole_overlap_is_paged_through_when_it_holds_more_than_a_page(fake):
    for i in range(30):  # a busy minute: 30 reports, 2 s apart, up to T0
        _order(fake, f"BUSY-{i:02d}", ("GLU", "1"), at=T0 - timedelta(seconds=58 - 2 * i),
               version="v1")
    client = _client(fake, overlap="2m", page_size=5)
    _, cursor, _ = _drain(client)
    # Committed late, stamped 10 s before the newest change read: far past the first page
    # of the overlap, which holds the 5 oldest reports of the minute.
    _order(fake, "LATE-2", ("GLU", "2"), at=T0 - timedelta(seconds=10), version="v1")

    orders, rested, pages = _drain(client, cursor)

    assert [o.external_id for o in orders] == ["LATE-2"]
    assert pages >= 6  # every page of the overlap was read
    assert rested == cursor  # and the feed rests where it rested: the newest change


def test_what_the_overlap_reads_again_at_an_applied_version_is_not_handed_out_again(fake):
    _order(fake, "OV-2", ("GLU", "1"), at=T0, version="v1")
    client = _client(fake, overlap="2m")
    _, cursor, _ = _drain(client)

    quiet = client.changes(cursor)
    _order(fake, "OV-2", ("GLU", "3"), status="corrected", at=T0 + timedelta(seconds=5),
           version="v2")
    changed = client.changes(quiet.cursor)
    restarted = _client(fake, overlap="2m").changes(cursor)  # a new process remembers nothing

    assert quiet.orders == () and quiet.cursor == cursor
    assert [(o.external_id, o.version) for o in changed.orders] == [("OV-2", "v2")]
    assert [(o.external_id, o.version) for o in restarted.orders] == [("OV-2", "v2")]
    assert len(fake.requests) == 4  # each read is one request, quiet ones too


def test_a_page_read_again_from_the_older_cursor_is_handed_out_again(fake):
    _order(fake, "RE-1", ("GLU", "1"), at=T0, version="v1")
    client = _client(fake, overlap="2m")
    first = client.changes(None)

    again = client.changes(None)  # the engine did not apply the first page: same cursor

    assert [o.external_id for o in first.orders] == ["RE-1"]
    assert [o.external_id for o in again.orders] == ["RE-1"]


def test_an_update_after_the_cursor_comes_with_its_new_version(fake):
    _order(fake, "U-1", ("GLU", "1"), status="preliminary", at=T0, version="1")
    client = _client(fake, overlap=0)
    _, cursor, _ = _drain(client)
    _order(fake, "U-1", ("GLU", "2"), status="amended", at=T0 + timedelta(hours=1), version="2")

    seen, new_cursor, _ = _drain(client, cursor)

    assert [(o.status, o.results[0].value, o.version) for o in seen] == [
        (OrderStatus.COMPLETED, "2", "2")]
    assert new_cursor == "fhir1;2026-11-30T10:00:00.000+03:00;"


def test_a_crash_mid_feed_reads_the_same_changes_again_from_the_stored_cursor(fake):
    for i in range(4):
        _order(fake, f"P-{i}", ("GLU", "1"), at=T0 + timedelta(seconds=i))
    client = _client(fake, page_size=2)
    first = client.changes(None)
    # More to come: read on from the newest change, passing over the report read at it.
    assert first.more and first.cursor == "fhir1;2026-11-30T09:00:01.000+03:00;+P-1"

    once, twice = client.changes(first.cursor), client.changes(first.cursor)

    assert [o.external_id for o in once.orders] == ["P-2"]  # P-1 again, passed over
    assert [o.external_id for o in twice.orders] == ["P-2"]
    assert once.cursor == twice.cursor == "fhir1;2026-11-30T09:00:02.000+03:00;+P-2"


def test_an_expired_next_page_is_searched_again_from_its_instant(fake):
    for i in range(4):
        _order(fake, f"E-{i}", ("GLU", "1"), at=T0)
    client = _client(fake, page_size=2)
    first = client.changes(None)
    assert first.cursor is not None and ";?_getpages=" in first.cursor
    fake.forget_searches()  # the server dropped its stored search (410)

    seen, _, _ = _drain(client, first.cursor)

    assert {o.external_id for o in (*first.orders, *seen)} == {f"E-{i}" for i in range(4)}
    assert [r.endpoint for r in fake.requests][:3] == ["feed", "page", "feed"]
    assert _query(fake.requests[2].target)["_lastUpdated"] == [
        "ge2026-11-30T09:00:00.000+03:00"]


def test_a_next_link_to_another_host_is_never_followed(fake):
    with FakeFhir() as elsewhere:
        fake.next_base = elsewhere.base_url  # same address, another port: another origin
        for i in range(3):
            _order(fake, f"N-{i}", ("GLU", "1"), at=T0 + timedelta(seconds=i))
        for i in range(3):
            _order(fake, f"TIE-{i}", ("GLU", "1"), at=T0 + timedelta(hours=1))
        client = _client(fake, page_size=2)

        page = client.changes(None)  # reads on by time: the link is not needed
        page = client.changes(page.cursor)
        assert page.more and [o.external_id for o in page.orders] == ["N-2"]
        page = client.changes(page.cursor)
        assert [o.external_id for o in page.orders] == ["TIE-0"]
        # One instant fills the page: only the link goes on, and it leads off the base.
        with pytest.raises(BadLisData, match=r"not under lis\.base_url"):
            client.changes(page.cursor)
        assert elsewhere.request_count() == 0


def test_a_report_the_adapter_cannot_read_is_skipped_and_the_feed_goes_on(fake):
    fake.include = False
    fake.put(report("broken", "BROKEN-1", system=SYSTEM, results=["gone"]), last_updated=T0)
    _order(fake, "FINE-1", ("GLU", "1"), at=T0 + timedelta(seconds=1))
    fake.put(report("odd", "ODD-1", system=SYSTEM, status="finished"),
             last_updated=T0 + timedelta(seconds=2))

    page = _client(fake).changes(None)

    assert [o.external_id for o in page.orders] == ["FINE-1"]
    assert [(p.external_id, p.error.kind) for p in page.problems] == [
        ("BROKEN-1", "permanent"), ("ODD-1", "bad_data")]
    assert "status" in str(page.problems[1].error)
    assert page.cursor == "fhir1;2026-11-30T09:00:02.000+03:00;"  # past both


def test_a_transient_failure_inside_a_page_fails_the_whole_read(fake):
    fake.include = False
    _order(fake, "T-1", ("GLU", "1"), at=T0)
    fake.inject("observation", Fault(status=503), times=None)

    with pytest.raises(TransientLisError):
        _client(fake).changes(None)


def test_reports_of_no_order_of_ours_are_skipped_but_move_the_cursor(fake):
    fake.put(report("theirs", "T-9", system="urn:other"), last_updated=T0)
    client = _client(fake)

    page = client.changes(None)

    assert page.orders == ()
    assert page.cursor == "fhir1;2026-11-30T09:00:00.000+03:00;"


def test_a_first_read_that_finds_nothing_keeps_no_cursor(fake):
    page = _client(fake).changes(None, since=T0)

    assert (page.orders, page.cursor, page.more) == ((), None, False)


@pytest.mark.parametrize("cursor", ["mem:3", "fhir1;yesterday;", "fhir1;2026-11-30T09:00:00;",
                                    "fhir1;2026-11-30T09:00:00+03:00;http://evil/x"])
def test_a_cursor_the_adapter_did_not_make_is_refused(fake, cursor):
    with pytest.raises(PermanentLisError):
        _client(fake).changes(cursor)
    assert fake.request_count() == 0


def test_feed_false_turns_the_change_feed_off_and_settings_become_timedeltas(fake):
    order_only = _client(fake, feed=False)
    following = _client(fake, feed_interval=45.0, verify_every=3600.0)

    assert Capability.CHANGE_FEED not in capabilities(order_only)
    assert capabilities(following) == {Capability.ORDER_LOOKUP, Capability.CHANGE_FEED,
                                       Capability.PDF}
    with pytest.raises(PermanentLisError, match="switched off"):
        order_only.changes(None)
    assert (following.feed_interval, following.verify_every) == (
        timedelta(seconds=45), timedelta(hours=1))


# -- PDFs -----------------------------------------------------------------------------------


def test_a_relative_pdf_url_is_fetched_from_the_base_with_accept_pdf(fake):
    pdf = sample_pdf("relative", size=150_000)
    fake.put_binary("77", pdf)
    sink = io.BytesIO()

    written = _client(fake).fetch_pdf("O", sink, max_bytes=10**6, ref=PdfRef.at("Binary/77"))

    assert written == len(pdf) and sink.getvalue() == pdf
    (seen,) = fake.requests
    assert (seen.target, seen.accept, seen.authorization) == (
        "/fhir/Binary/77", "application/pdf", f"Bearer {TOKEN}")


def test_an_absolute_pdf_url_under_the_base_is_fetched(fake):
    pdf = sample_pdf("absolute")
    fake.put_binary("78", pdf)
    sink = io.BytesIO()

    _client(fake).fetch_pdf("O", sink, max_bytes=10**6, ref=PdfRef.at(f"{fake.base_url}/Binary/78"))

    assert sink.getvalue() == pdf


def test_a_binary_answered_as_json_is_decoded(fake):
    pdf = sample_pdf("as json", size=100_000)
    fake.put_binary("79", pdf)
    fake.binary_as_json = True
    sink = io.BytesIO(b"left over")

    written = _client(fake).fetch_pdf("O", sink, max_bytes=10**6, ref=PdfRef.at("Binary/79"))

    assert (written, sink.getvalue()) == (len(pdf), pdf)


def test_a_json_binary_that_is_not_a_pdf_is_bad_data(fake):
    fake.put_binary("80", b"<html/>", content_type="text/html")
    fake.binary_as_json = True

    with pytest.raises(BadLisData, match="not a PDF"):
        _client(fake).fetch_pdf("O", io.BytesIO(), max_bytes=10**6, ref=PdfRef.at("Binary/80"))


@pytest.mark.parametrize("as_json", [False, True])
def test_a_pdf_over_max_bytes_is_refused_before_the_sink_holds_more(fake, as_json):
    fake.put_binary("81", sample_pdf("big", size=300_000))
    fake.binary_as_json = as_json
    sink = io.BytesIO()

    with pytest.raises(BadLisData, match="larger than"):
        _client(fake).fetch_pdf("O", sink, max_bytes=100_000, ref=PdfRef.at("Binary/81"))
    assert len(sink.getvalue()) <= 100_000


@pytest.mark.parametrize("url", [
    "http://elsewhere.example/fhir/Binary/1",
    "https://127.0.0.1/fhir/Binary/1",  # another scheme and port
    "../other/Binary/1",
    "/other/Binary/1",
    "http://user:pw@127.0.0.1/fhir/Binary/1",
])
def test_a_pdf_url_outside_the_base_is_bad_data_and_nothing_is_sent(fake, url):
    with pytest.raises(BadLisData, match=r"not under lis\.base_url"):
        _client(fake).fetch_pdf("O", io.BytesIO(), max_bytes=10**6, ref=PdfRef.at(url))
    assert fake.request_count() == 0


def test_a_form_on_another_host_is_refused_by_the_store_and_that_host_never_asked(
        fake, tmp_path):
    with FakeFhir() as elsewhere:
        elsewhere.put_binary("1", sample_pdf())
        fake.put(report("R", "PDF-1", system=SYSTEM, presentedForm=[
            {"contentType": "application/pdf", "url": f"{elsewhere.base_url}/Binary/1"}]))
        client = _client(fake)
        order = client.fetch_order("PDF-1")
        assert order.pdf is not None and order.pdf.kind is PdfKind.URL

        with pytest.raises(BadLisData):
            PdfStore(tmp_path, max_bytes=10**6).stage(7, "PDF-1", client, order.pdf)
        assert elsewhere.request_count() == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_inline_form_is_staged_without_a_request(fake, tmp_path):
    pdf = sample_pdf("inline")
    fake.put(report("R", "IN-1", system=SYSTEM, presentedForm=[
        {"contentType": "application/pdf", "data": base64.b64encode(pdf).decode()}]))
    client = _client(fake)
    order = client.fetch_order("IN-1")
    store = PdfStore(tmp_path, max_bytes=10**6)

    path = store.publish(store.stage(7, "IN-1", client, order.pdf))

    assert path.read_bytes() == pdf
    assert fake.request_count("binary") == 0


def test_a_missing_binary_is_pdf_not_ready(fake):
    with pytest.raises(PdfNotReady):
        _client(fake).fetch_pdf("O", io.BytesIO(), max_bytes=10**6, ref=PdfRef.at("Binary/none"))


# -- configuration --------------------------------------------------------------------------


def test_the_token_comes_from_token_file_or_an_environment_variable(fake, tmp_path):
    token_file = tmp_path / "fhir_token"
    token_file.write_text(TOKEN + "\n")
    _order(fake, "CFG-1", ("GLU", "1"))

    for fhir, env in (({"token_file": str(token_file)}, {}),
                      ({"token": "${FHIR_TOKEN}"}, {"FHIR_TOKEN": TOKEN})):
        config = _site_config(tmp_path, fake, fhir, env)
        client = make_client(config.lis, sleep=lambda seconds: None)
        assert client.fetch_order("CFG-1").external_id == "CFG-1"
        assert TOKEN in config.secrets()  # the log redaction masks it
        client.close()
    assert [r.authorization for r in fake.requests] == [f"Bearer {TOKEN}"] * 2


def _site_config(tmp_path: Path, fake: FakeFhir, fhir: dict[str, Any], env: dict[str, str]
                 ) -> config_mod.Config:
    return config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path / 'x.db'}"},
        "site": {"timezone": "Europe/Moscow"},
        "lis": {"adapter": "fhir", "base_url": fake.base_url,
                "fhir": {"order_system": SYSTEM, **fhir}},
        "pdf": {"dir": str(tmp_path / "pdfs")},
        "notify": {"site_id": "s1"},
    }, env=env)


def test_the_fhir_section_is_validated_key_by_key(tmp_path, fake):
    with pytest.raises(ConfigError) as caught:
        _site_config(tmp_path, fake, {"page_size": 5000, "overlap": "soon", "feed": "yes",
                                      "code_systems": "http://loinc.org", "colour": "red"}, {})

    problems = caught.value.problems
    assert "lis.fhir.colour: unknown key" in problems
    assert any(p.startswith("lis.fhir.page_size: must be an integer from 1 to 1000")
               for p in problems)
    assert any(p.startswith("lis.fhir.overlap:") for p in problems)
    assert "lis.fhir.feed: must be true or false" in problems
    assert any(p.startswith("lis.fhir.code_systems:") for p in problems)


def test_defaults_of_the_fhir_section(tmp_path, fake):
    client = make_client(_site_config(tmp_path, fake, {}, {}).lis)

    assert client.settings.page_size == 50 and client.settings.overlap == timedelta(minutes=2)
    assert client.settings.code_systems == ("http://loinc.org",)
    assert (client.feed_interval, client.verify_every) == (timedelta(seconds=30),
                                                           timedelta(hours=24))

