"""What every LIS adapter must do, whatever its vendor: one suite, applied to each adapter.

A test module subclasses ``LisClientConformance`` (the name has no ``Test`` prefix, so pytest
collects it only through subclasses) and provides two fixtures:

- ``lis_client``: the adapter under test, a ``LisClient``.
- ``lis_server``: its LIS, scriptable in LIS-neutral terms (``labsync.model`` types). Each
  adapter's test module translates these into its vendor's format, so the suite itself
  never names a vendor:

  - ``capabilities``: what the adapter is expected to declare (a test checks it, so a lost
    capability fails instead of silently skipping its tests);
  - ``add_order(external_id, *, status, results, pdf, patient, order_date, changed_at=None,
    version=None)`` and ``set_pdf(external_id, pdf_bytes_or_None)``;
  - ``fail(external_id_or_None, fault, *, on="order" | "pdf", times=1 | None)``: the LIS
    misbehaves on the next ``times`` requests (None: all); ``fault`` is one of ``FAULTS``;
  - ``requests(external_id, on)``: how many requests of that kind the LIS has had;
  - ``retry_attempts``: the tries the client under test makes of a transient failure;
  - ``says_changed_at``: whether the LIS can tell ``changed_at``/``version`` in a lookup;
  - change feed: ``update_order(external_id, *, status, results, changed_at=None,
    version=None)``;
  - inbox: ``deliver(delivery_id, orders)``, ``deliver_unreadable(delivery_id)``,
    ``inbox_state(delivery_id)`` (``waiting``, ``done``, ``failed: <reason>``) and
    ``restarted_client()``: a new adapter over the same inbox, as after a crash.

Tests of a capability the adapter does not declare skip, saying so (``-ra`` lists them).
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from labsync.errors import (
    BadLisData,
    LisAuthError,
    PdfNotReady,
    PermanentLisError,
    TransientLisError,
    UnknownOrder,
)
from labsync.lis.base import Capability, LisClient, capabilities
from labsync.model import LisOrder, LisOrderRef, OrderStatus, Patient, TestResult
from labsync.pdfs import PdfStore
from labsync.testing.pdfs import sample_pdf

PATIENT = Patient(
    phone="+79991234567", last_name="Иванова", first_name="Анна", birth_date=date(1985, 3, 21)
)
RESULTS = (
    TestResult(
        code="GLU",
        name="Глюкоза",
        value="6.30",
        unit="ммоль/л",
        ref_min="3.9",
        ref_max="6.1",
        abnormal=True,
        result_date=datetime(2024, 5, 14, 10, 30, tzinfo=timezone(timedelta(hours=3))),
    ),
    TestResult(code="HCV", name="Антитела к HCV", value="negative"),
    TestResult(code=None, name="Комментарий", value="<5", result_date=datetime(2024, 5, 14, 11)),
)
PDF_MAX = 50 * 1024 * 1024
FAULTS = ("auth", "unknown", "pdf_not_ready", "transient", "bad_data")
MSK = timezone(timedelta(hours=3))


def _require(client: LisClient, capability: Capability) -> None:
    """Skip the test, saying why, unless ``client`` declares ``capability``."""
    if capability not in capabilities(client):
        pytest.skip(f"{type(client).__name__} declares no {capability.label}")


def _add(server: Any, external_id: str, *, status: OrderStatus = OrderStatus.COMPLETED,
         results: tuple[TestResult, ...] = (), pdf: bytes | None = None,
         **more: Any) -> None:
    server.add_order(external_id, status=status, results=results, pdf=pdf, patient=PATIENT,
                     order_date=date(2024, 5, 14), **more)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


class LisClientConformance:
    """Tests every ``LisClient`` passes; see the module docstring for the fixtures."""

    def test_adapter_declares_the_capabilities_its_lis_has(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        # What the built adapter can do is what its class declares, less what its
        # configuration switched off (FHIR's feed = false, a mapping without find_url).
        assert capabilities(lis_client) == frozenset(lis_server.capabilities)
        assert capabilities(lis_client) == (capabilities(type(lis_client))
                                            - lis_client.disabled_capabilities())

    def test_probe_passes_against_a_working_lis(self, lis_client: LisClient) -> None:
        lis_client.probe()

    # -- order lookup ---------------------------------------------------------------------

    def test_known_order_round_trips_status_and_results(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        lis_server.add_order(
            "ORD-1",
            status=OrderStatus.COMPLETED,
            results=RESULTS,
            pdf=None,
            patient=PATIENT,
            order_date=date(2024, 5, 14),
        )

        order = lis_client.fetch_order("ORD-1")

        assert order.external_id == "ORD-1"
        assert order.status is OrderStatus.COMPLETED
        assert order.results == RESULTS

    @pytest.mark.parametrize("status", list(OrderStatus))
    def test_every_status_round_trips(
        self, lis_client: LisClient, lis_server: Any, status: OrderStatus
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        lis_server.add_order(
            "ORD-S",
            status=status,
            results=(),
            pdf=None,
            patient=PATIENT,
            order_date=date(2024, 5, 14),
        )

        assert lis_client.fetch_order("ORD-S").status is status

    def test_order_without_results_has_none(self, lis_client: LisClient, lis_server: Any) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        lis_server.add_order(
            "ORD-2",
            status=OrderStatus.PROCESSING,
            results=(),
            pdf=None,
            patient=PATIENT,
            order_date=date(2024, 5, 14),
        )

        assert lis_client.fetch_order("ORD-2").results == ()

    def test_unknown_order_raises_unknown_order(self, lis_client: LisClient) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        with pytest.raises(UnknownOrder):
            lis_client.fetch_order("NO-SUCH-ORDER")

    def test_pdf_is_streamed_into_the_sink_byte_for_byte(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        pdf = sample_pdf("Результаты ORD-3", size=300_000)  # several chunks
        lis_server.add_order(
            "ORD-3",
            status=OrderStatus.COMPLETED,
            results=RESULTS,
            pdf=pdf,
            patient=PATIENT,
            order_date=date(2024, 5, 14),
        )
        sink = io.BytesIO(b"left over from an earlier attempt that must go")

        written = lis_client.fetch_pdf("ORD-3", sink, max_bytes=PDF_MAX)

        assert written == len(pdf)
        assert sink.getvalue() == pdf

    def test_pdf_not_ready_raises_pdf_not_ready(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        lis_server.add_order(
            "ORD-4",
            status=OrderStatus.COMPLETED,
            results=RESULTS,
            pdf=sample_pdf(),
            patient=PATIENT,
            order_date=date(2024, 5, 14),
        )
        lis_server.set_pdf("ORD-4", None)

        with pytest.raises(PdfNotReady):
            lis_client.fetch_pdf("ORD-4", io.BytesIO(), max_bytes=PDF_MAX)

    def test_pdf_that_becomes_ready_is_fetched(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        lis_server.add_order(
            "ORD-5",
            status=OrderStatus.PROCESSING,
            results=(),
            pdf=None,
            patient=PATIENT,
            order_date=date(2024, 5, 14),
        )
        with pytest.raises(PdfNotReady):
            lis_client.fetch_pdf("ORD-5", io.BytesIO(), max_bytes=PDF_MAX)
        pdf = sample_pdf("now ready")
        lis_server.set_pdf("ORD-5", pdf)

        sink = io.BytesIO()
        lis_client.fetch_pdf("ORD-5", sink, max_bytes=PDF_MAX)

        assert sink.getvalue() == pdf

    def test_find_orders_returns_the_patients_orders_since_a_date(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PATIENT_SEARCH)
        other = Patient(phone="+79990000000", last_name="Петров", first_name="Пётр")
        for external_id, patient, day, status in (
            ("F-1", PATIENT, date(2024, 5, 10), OrderStatus.COMPLETED),
            ("F-2", PATIENT, date(2024, 5, 12), OrderStatus.PROCESSING),
            ("F-OLD", PATIENT, date(2024, 4, 1), OrderStatus.COMPLETED),
            ("F-OTHER", other, date(2024, 5, 11), OrderStatus.COMPLETED),
        ):
            lis_server.add_order(
                external_id,
                status=status,
                results=(),
                pdf=None,
                patient=patient,
                order_date=day,
            )

        found = lis_client.find_orders(PATIENT.phone or "", date(2024, 5, 1))

        by_id = {ref.external_id: ref for ref in found}
        assert set(by_id) == {"F-1", "F-2"}
        assert by_id["F-1"] == LisOrderRef(
            external_id="F-1",
            status=OrderStatus.COMPLETED,
            order_date=date(2024, 5, 10),
            patient=PATIENT,
        )
        assert by_id["F-2"].status is OrderStatus.PROCESSING

    def test_find_orders_of_an_unknown_phone_is_empty(self, lis_client: LisClient) -> None:
        _require(lis_client, Capability.PATIENT_SEARCH)
        assert list(lis_client.find_orders("+70000000000", date(2024, 1, 1))) == []

    def test_create_order_returns_a_ref_the_lis_then_knows(self, lis_client: LisClient) -> None:
        _require(lis_client, Capability.ORDER_PLACEMENT)
        _require(lis_client, Capability.ORDER_LOOKUP)
        ref = lis_client.create_order(PATIENT, ["GLU", "HGB"])

        assert ref.external_id
        assert ref.status in OrderStatus
        assert lis_client.fetch_order(ref.external_id).external_id == ref.external_id

    # -- order lookup: values, flags, dates, errors, threads ------------------------------

    def test_values_keep_their_literal_text_byte_for_byte(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        literal = (
            TestResult(code="K", name="Калий", value="5.40", unit="ммоль/л", ref_min="3.50",
                       ref_max="5.10"),
            TestResult(code="HGB", name="Гемоглобин", value="142", ref_min="120", ref_max="160"),
            TestResult(code="BIG", name="Big", value="1e308"),
            TestResult(code="EXP", name="Exp", value="1.50E+3"),
            TestResult(code="NEG", name="Neg", value="-0.50"),
            TestResult(code="ZERO", name="Zero", value="0.0"),
            TestResult(code="TXT", name="Текст", value="Отрицательно\nповтор через 2 нед."),
        )
        _add(lis_server, "V-1", results=literal)

        got = lis_client.fetch_order("V-1").results

        assert [(r.value, r.ref_min, r.ref_max) for r in got] == [
            (r.value, r.ref_min, r.ref_max) for r in literal]
        assert got == literal

    def test_abnormal_flag_round_trips_both_ways(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        flagged = (TestResult(code="H", name="High", value="9.9", abnormal=True),
                   TestResult(code="N", name="Normal", value="5.0", abnormal=False))
        _add(lis_server, "AB-1", results=flagged)

        got = lis_client.fetch_order("AB-1").results

        assert [(r.code, r.abnormal) for r in got] == [("H", True), ("N", False)]

    def test_result_dates_keep_their_offset_or_lack_of_one(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        moments = [
            datetime(2024, 5, 14, 10, 30, tzinfo=MSK),
            datetime(2024, 5, 14, 7, 30, 15, tzinfo=UTC),
            datetime(2024, 5, 13, 23, 5, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
            datetime(2024, 5, 14, 9, 0),  # no offset: site time, converted by the engine
            None,
        ]
        dated = tuple(TestResult(code=f"D{i}", name=f"Date {i}", value="1", result_date=m)
                      for i, m in enumerate(moments))
        _add(lis_server, "DT-1", results=dated)

        got = [r.result_date for r in lis_client.fetch_order("DT-1").results]

        assert got == moments
        assert [m.utcoffset() if m else "none" for m in got] == [
            m.utcoffset() if m else "none" for m in moments]

    def test_changed_at_and_version_are_passed_on_as_the_lis_says_them(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        if not lis_server.says_changed_at:
            pytest.skip("this LIS tells neither when an order changed nor its version")
        changed = datetime(2024, 5, 14, 12, 0, 0, 250000, tzinfo=MSK)
        _add(lis_server, "CV-1", results=RESULTS, changed_at=changed, version="v7")

        order = lis_client.fetch_order("CV-1")

        assert (order.changed_at, order.version) == (changed, "v7")
        assert order.changed_at is not None and order.changed_at.utcoffset() is not None

    def test_refused_credentials_are_an_auth_error_and_not_retried(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        _add(lis_server, "E-AUTH", results=RESULTS)
        lis_server.fail("E-AUTH", "auth", times=None)

        with pytest.raises(LisAuthError):
            lis_client.fetch_order("E-AUTH")
        assert lis_server.requests("E-AUTH", "order") == 1

    def test_probe_reports_refused_credentials(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        lis_server.fail(None, "auth", times=None)

        with pytest.raises(LisAuthError):
            lis_client.probe()

    def test_unknown_order_is_not_retried(self, lis_client: LisClient, lis_server: Any) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        _add(lis_server, "E-GONE", results=RESULTS)
        lis_server.fail("E-GONE", "unknown")

        with pytest.raises(UnknownOrder):
            lis_client.fetch_order("E-GONE")
        assert lis_server.requests("E-GONE", "order") == 1
        assert lis_client.fetch_order("E-GONE").results == RESULTS  # the LIS knows it again

    def test_transient_failures_within_the_retries_are_not_seen(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        attempts = lis_server.retry_attempts
        _add(lis_server, "E-BUSY", results=RESULTS)
        lis_server.fail("E-BUSY", "transient", times=attempts - 1)

        assert lis_client.fetch_order("E-BUSY").results == RESULTS
        assert lis_server.requests("E-BUSY", "order") == attempts

    def test_transient_failure_after_the_retries_is_a_transient_error(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        _add(lis_server, "E-DOWN", results=RESULTS)
        lis_server.fail("E-DOWN", "transient", times=None)

        with pytest.raises(TransientLisError):
            lis_client.fetch_order("E-DOWN")
        assert lis_server.requests("E-DOWN", "order") == lis_server.retry_attempts

    def test_bad_data_is_refused_and_not_retried(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        _add(lis_server, "E-BAD", results=RESULTS)
        lis_server.fail("E-BAD", "bad_data", times=None)

        with pytest.raises(BadLisData):
            lis_client.fetch_order("E-BAD")
        assert lis_server.requests("E-BAD", "order") == 1

    def test_many_threads_asking_at_once_each_get_their_own_order(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        ids = [f"T-{i}" for i in range(40)]
        for i, external_id in enumerate(ids):
            _add(lis_server, external_id, results=(TestResult(code="N", name="n", value=str(i)),))

        def ask(external_id: str) -> tuple[str, str | None]:
            order = lis_client.fetch_order(external_id)
            return order.external_id, order.results[0].value

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(ask, ids * 3))

        assert answers == [(external_id, str(i % 40)) for i, external_id in enumerate(ids * 3)]

    # -- PDF --------------------------------------------------------------------------------

    def test_a_completed_orders_pdf_handle_stages_its_pdf(
        self, lis_client: LisClient, lis_server: Any, tmp_path: Path
    ) -> None:
        _require(lis_client, Capability.ORDER_LOOKUP)
        pdf = sample_pdf("handle", size=150_000)
        _add(lis_server, "H-1", results=RESULTS, pdf=pdf)
        order = lis_client.fetch_order("H-1")
        assert order.pdf is not None
        store = PdfStore(tmp_path, max_bytes=PDF_MAX)

        path = store.publish(store.stage(7, "H-1", lis_client, order.pdf))

        assert path.read_bytes() == pdf

    def test_pdf_over_max_bytes_is_bad_data_and_the_sink_stays_under_the_cap(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        pdf = sample_pdf("big", size=300_000)
        _add(lis_server, "M-1", results=RESULTS, pdf=pdf)
        sink = io.BytesIO()

        with pytest.raises(BadLisData):
            lis_client.fetch_pdf("M-1", sink, max_bytes=100_000)
        assert len(sink.getvalue()) <= 100_000

    def test_pdf_of_exactly_max_bytes_is_accepted(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        pdf = sample_pdf("edge", size=100_000)
        _add(lis_server, "M-2", results=RESULTS, pdf=pdf)
        sink = io.BytesIO()

        assert lis_client.fetch_pdf("M-2", sink, max_bytes=len(pdf)) == len(pdf)
        assert sink.getvalue() == pdf

    def test_pdf_over_the_stores_cap_leaves_no_file(
        self, lis_client: LisClient, lis_server: Any, tmp_path: Path
    ) -> None:
        _require(lis_client, Capability.PDF)
        _add(lis_server, "M-3", results=RESULTS, pdf=sample_pdf("big", size=300_000))

        with pytest.raises(BadLisData):
            PdfStore(tmp_path, max_bytes=100_000).stage(7, "M-3", lis_client)
        assert _files(tmp_path) == []

    def test_a_body_that_is_not_a_pdf_is_refused_and_leaves_no_file(
        self, lis_client: LisClient, lis_server: Any, tmp_path: Path
    ) -> None:
        _require(lis_client, Capability.PDF)
        _add(lis_server, "NP-1", results=RESULTS, pdf=b"<html><body>Error 500</body></html>")

        with pytest.raises(BadLisData, match="not a PDF"):
            PdfStore(tmp_path, max_bytes=PDF_MAX).stage(7, "NP-1", lis_client)
        assert _files(tmp_path) == []

    def test_a_pdf_without_its_eof_marker_is_refused_and_leaves_no_file(
        self, lis_client: LisClient, lis_server: Any, tmp_path: Path
    ) -> None:
        _require(lis_client, Capability.PDF)
        pdf = sample_pdf("cut", size=200_000)
        _add(lis_server, "NP-2", results=RESULTS, pdf=pdf[: len(pdf) // 2])

        with pytest.raises(BadLisData, match="cut short"):
            PdfStore(tmp_path, max_bytes=PDF_MAX).stage(7, "NP-2", lis_client)
        assert _files(tmp_path) == []

    def test_pdf_bad_data_is_refused_through_the_store(
        self, lis_client: LisClient, lis_server: Any, tmp_path: Path
    ) -> None:
        _require(lis_client, Capability.PDF)
        _add(lis_server, "NP-3", results=RESULTS, pdf=sample_pdf())
        lis_server.fail("NP-3", "bad_data", on="pdf", times=None)

        with pytest.raises(BadLisData):
            PdfStore(tmp_path, max_bytes=PDF_MAX).stage(7, "NP-3", lis_client)
        assert _files(tmp_path) == []

    def test_pdf_not_ready_then_ready(self, lis_client: LisClient, lis_server: Any) -> None:
        _require(lis_client, Capability.PDF)
        pdf = sample_pdf("later")
        _add(lis_server, "NR-1", results=RESULTS, pdf=pdf)
        lis_server.fail("NR-1", "pdf_not_ready", on="pdf")

        with pytest.raises(PdfNotReady):
            lis_client.fetch_pdf("NR-1", io.BytesIO(), max_bytes=PDF_MAX)
        sink = io.BytesIO()
        lis_client.fetch_pdf("NR-1", sink, max_bytes=PDF_MAX)
        assert sink.getvalue() == pdf

    def test_pdf_transient_failures_are_retried_into_a_clean_sink(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        pdf = sample_pdf("retried", size=200_000)
        _add(lis_server, "PT-1", results=RESULTS, pdf=pdf)
        lis_server.fail("PT-1", "transient", on="pdf", times=lis_server.retry_attempts - 1)
        sink = io.BytesIO()

        assert lis_client.fetch_pdf("PT-1", sink, max_bytes=PDF_MAX) == len(pdf)
        assert sink.getvalue() == pdf
        assert lis_server.requests("PT-1", "pdf") == lis_server.retry_attempts

    def test_pdf_transient_failure_after_the_retries_is_a_transient_error(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        _add(lis_server, "PT-2", results=RESULTS, pdf=sample_pdf())
        lis_server.fail("PT-2", "transient", on="pdf", times=None)

        with pytest.raises(TransientLisError):
            lis_client.fetch_pdf("PT-2", io.BytesIO(), max_bytes=PDF_MAX)
        assert lis_server.requests("PT-2", "pdf") == lis_server.retry_attempts

    def test_pdf_auth_refusal_is_an_auth_error(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        _add(lis_server, "PA-1", results=RESULTS, pdf=sample_pdf())
        lis_server.fail("PA-1", "auth", on="pdf", times=None)

        with pytest.raises(LisAuthError):
            lis_client.fetch_pdf("PA-1", io.BytesIO(), max_bytes=PDF_MAX)
        assert lis_server.requests("PA-1", "pdf") == 1

    def test_many_threads_fetching_pdfs_at_once_each_get_their_own(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.PDF)
        pdfs = {f"PP-{i}": sample_pdf(f"PDF {i}", size=70_000 + i) for i in range(12)}
        for external_id, pdf in pdfs.items():
            _add(lis_server, external_id, results=RESULTS, pdf=pdf)

        def fetch(external_id: str) -> bytes:
            sink = io.BytesIO()
            lis_client.fetch_pdf(external_id, sink, max_bytes=PDF_MAX)
            return sink.getvalue()

        with ThreadPoolExecutor(max_workers=8) as pool:
            got = list(pool.map(fetch, list(pdfs) * 2))

        assert got == list(pdfs.values()) * 2

    # -- change feed ------------------------------------------------------------------------

    def _drain(self, client: Any, cursor: str | None) -> tuple[list[LisOrder], str | None]:
        """Every page from ``cursor`` until ``more`` is False (at most 100 reads)."""
        seen: list[LisOrder] = []
        for _ in range(100):
            page = client.changes(cursor)
            seen.extend(page.orders)
            cursor = page.cursor if page.cursor is not None else cursor
            if not page.more:
                return seen, cursor
        raise AssertionError("the feed said 'more' 100 times in a row")

    def test_feed_gives_every_change_in_order_then_nothing_new(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.CHANGE_FEED)
        base = datetime(2024, 5, 14, 9, 0, tzinfo=MSK)
        for i, external_id in enumerate(["CF-A", "CF-B", "CF-C"]):
            _add(lis_server, external_id, status=OrderStatus.PROCESSING, results=RESULTS,
                 changed_at=base + timedelta(minutes=i), version=f"{external_id}-1")

        seen, cursor = self._drain(lis_client, None)

        assert [o.external_id for o in seen] == ["CF-A", "CF-B", "CF-C"]
        assert all(o.results == RESULTS and o.status is OrderStatus.PROCESSING for o in seen)
        assert [o.changed_at for o in seen] == [base + timedelta(minutes=i) for i in range(3)]
        assert isinstance(cursor, str)
        again, _ = self._drain(lis_client, cursor)
        assert again == []

    def test_feed_reports_a_change_made_after_the_cursor(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.CHANGE_FEED)
        first = datetime(2024, 5, 14, 9, 0, tzinfo=MSK)
        _add(lis_server, "CF-U", status=OrderStatus.PROCESSING, changed_at=first, version="1")
        _add(lis_server, "CF-V", status=OrderStatus.PROCESSING, changed_at=first, version="1")
        _, cursor = self._drain(lis_client, None)

        lis_server.update_order("CF-U", status=OrderStatus.COMPLETED, results=RESULTS,
                                changed_at=first + timedelta(hours=1), version="2")
        seen, _ = self._drain(lis_client, cursor)

        assert [o.external_id for o in seen] == ["CF-U"]
        (order,) = seen
        assert (order.status, order.results, order.version) == (
            OrderStatus.COMPLETED, RESULTS, "2")
        assert order.changed_at == first + timedelta(hours=1)

    def test_feed_pages_until_more_is_false_and_loses_no_change(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.CHANGE_FEED)
        base = datetime(2024, 5, 14, 9, 0, tzinfo=MSK)
        ids = [f"CP-{i:03d}" for i in range(130)]
        for i, external_id in enumerate(ids):
            _add(lis_server, external_id, changed_at=base + timedelta(seconds=i))

        seen, _ = self._drain(lis_client, None)

        assert {o.external_id for o in seen} == set(ids)

    def test_reading_a_cursor_again_gives_its_changes_again(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.CHANGE_FEED)
        base = datetime(2024, 5, 14, 9, 0, tzinfo=MSK)
        _add(lis_server, "CR-1", changed_at=base)
        _, cursor = self._drain(lis_client, None)
        _add(lis_server, "CR-2", changed_at=base + timedelta(minutes=5))

        first, _ = self._drain(lis_client, cursor)
        second, _ = self._drain(lis_client, cursor)  # the commit after the first never came

        assert [o.external_id for o in first] == ["CR-2"]
        assert [o.external_id for o in second] == ["CR-2"]

    def test_a_first_read_since_a_time_has_every_later_change(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.CHANGE_FEED)
        base = datetime(2024, 5, 14, 9, 0, tzinfo=MSK)
        for i in range(6):
            _add(lis_server, f"CS-{i}", changed_at=base + timedelta(hours=i))

        feed: Any = lis_client
        page = feed.changes(None, since=base + timedelta(hours=3))
        seen = list(page.orders)
        if page.more:
            more, _ = self._drain(lis_client, page.cursor)
            seen += more

        assert {"CS-3", "CS-4", "CS-5"} <= {o.external_id for o in seen}

    def test_a_cursor_the_adapter_did_not_make_is_refused(self, lis_client: LisClient) -> None:
        _require(lis_client, Capability.CHANGE_FEED)
        feed: Any = lis_client
        with pytest.raises(PermanentLisError):
            feed.changes("no cursor of any LIS ☃")

    # -- inbox ------------------------------------------------------------------------------

    def _order(self, external_id: str, version: str = "1") -> LisOrder:
        return LisOrder(external_id, OrderStatus.COMPLETED, RESULTS,
                        changed_at=datetime(2024, 5, 14, 12, 0, tzinfo=MSK), version=version)

    def test_inbox_hands_out_deliveries_in_the_senders_order_then_none(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.INBOX)
        lis_server.deliver("MSG-1", [self._order("IB-1")])
        lis_server.deliver("MSG-2", [self._order("IB-2"), self._order("IB-3")])
        inbox: Any = lis_client

        first, second, none = inbox.take(), inbox.take(), inbox.take()

        # The version token is the LIS's own: the order's (``"1"`` as sent), or one the
        # message gives every order it carries (HL7 v2's MSH-10), as the glue says.
        version = getattr(lis_server, "delivered_version", lambda delivery_id, sent: sent)
        assert (first.id, [o.external_id for o in first.orders]) == ("MSG-1", ["IB-1"])
        assert (second.id, [o.external_id for o in second.orders]) == ("MSG-2", ["IB-2", "IB-3"])
        assert second.orders[0].results == RESULTS
        assert [o.version for o in second.orders] == [version("MSG-2", "1")] * 2
        assert second.orders[0].changed_at == self._order("IB-2").changed_at
        assert none is None

    def test_a_done_delivery_never_comes_again_not_even_after_a_restart(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.INBOX)
        lis_server.deliver("MSG-D", [self._order("IB-D")])
        inbox: Any = lis_client
        delivery = inbox.take()

        inbox.done(delivery)
        inbox.done(delivery)  # finishing twice does nothing

        assert inbox.take() is None
        restarted = lis_server.restarted_client()
        try:
            assert restarted.take() is None
        finally:
            restarted.close()
        assert lis_server.inbox_state("MSG-D") == "done"

    def test_a_delivery_in_hand_at_a_crash_comes_again_with_its_id(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.INBOX)
        lis_server.deliver("MSG-C1", [self._order("IB-C1")])
        lis_server.deliver("MSG-C2", [self._order("IB-C2")])
        inbox: Any = lis_client
        in_hand = inbox.take()
        assert in_hand.id == "MSG-C1"  # ...and then the process dies before done()

        restarted = lis_server.restarted_client()
        try:
            again, after = restarted.take(), restarted.take()
            assert again == in_hand  # same id, same orders
            assert after.id == "MSG-C2"
            assert restarted.take() is None
        finally:
            restarted.close()
        assert lis_server.inbox_state("MSG-C1") == "waiting"

    def test_a_failed_delivery_keeps_its_reason_and_never_comes_again(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.INBOX)
        lis_server.deliver("MSG-F", [self._order("IB-F")])
        inbox: Any = lis_client

        inbox.failed(inbox.take(), "order IB-F: no such order on the site")

        assert inbox.take() is None
        assert lis_server.inbox_state("MSG-F") == "failed: order IB-F: no such order on the site"
        restarted = lis_server.restarted_client()
        try:
            assert restarted.take() is None
        finally:
            restarted.close()

    def test_a_released_delivery_waits_for_the_next_drain(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.INBOX)
        lis_server.deliver("MSG-R1", [self._order("IB-R1")])
        lis_server.deliver("MSG-R2", [self._order("IB-R2")])
        inbox: Any = lis_client

        inbox.release(inbox.take(), "order IB-R1 not on the site yet")
        drain = [inbox.take(), inbox.take()]
        next_drain = inbox.take()

        assert [d.id if d else None for d in drain] == ["MSG-R2", None]
        assert next_drain is not None and next_drain.id == "MSG-R1"

    def test_an_unreadable_delivery_comes_with_its_problem_and_no_orders(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.INBOX)
        lis_server.deliver_unreadable("MSG-U")
        inbox: Any = lis_client

        delivery = inbox.take()

        assert delivery.id == "MSG-U" and delivery.orders == () and delivery.problem
        inbox.failed(delivery, delivery.problem)
        assert lis_server.inbox_state("MSG-U").startswith("failed: ")

    def test_many_threads_taking_at_once_never_share_a_delivery(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
        _require(lis_client, Capability.INBOX)
        ids = [f"MSG-T{i:03d}" for i in range(80)]
        for delivery_id in ids:
            lis_server.deliver(delivery_id, [self._order(f"IB-{delivery_id}")])
        inbox: Any = lis_client
        taken: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            while (delivery := inbox.take()) is not None:
                with lock:
                    taken.append(delivery.id)
                inbox.done(delivery)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        assert sorted(taken) == ids  # each once: none twice, none lost
        assert all(lis_server.inbox_state(delivery_id) == "done" for delivery_id in ids)
