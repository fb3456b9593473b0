"""What every LIS adapter must do, whatever its vendor: one suite, applied to each adapter.

A test module subclasses ``LisClientConformance`` (the name has no ``Test`` prefix, so pytest
collects it only through subclasses) and provides two fixtures:

- ``lis_client``: the adapter under test, a ``LisClient``.
- ``lis_server``: its LIS, scriptable in LIS-neutral terms (``labsync.model`` types):
  ``add_order(external_id, *, status, results, pdf, patient, order_date)`` and
  ``set_pdf(external_id, pdf_bytes_or_None)``. Each adapter's test module translates these
  into its vendor's format, so the suite itself never names a vendor.
"""

from __future__ import annotations

import io
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

from labsync.errors import PdfNotReady, UnknownOrder
from labsync.lis.base import LisClient
from labsync.model import LisOrderRef, OrderStatus, Patient, TestResult
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


class LisClientConformance:
    """Tests every ``LisClient`` passes; see the module docstring for the fixtures."""

    def test_known_order_round_trips_status_and_results(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
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
        with pytest.raises(UnknownOrder):
            lis_client.fetch_order("NO-SUCH-ORDER")

    def test_pdf_is_streamed_into_the_sink_byte_for_byte(
        self, lis_client: LisClient, lis_server: Any
    ) -> None:
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
        assert list(lis_client.find_orders("+70000000000", date(2024, 1, 1))) == []

    def test_create_order_returns_a_ref_the_lis_then_knows(self, lis_client: LisClient) -> None:
        ref = lis_client.create_order(PATIENT, ["GLU", "HGB"])

        assert ref.external_id
        assert ref.status in OrderStatus
        assert lis_client.fetch_order(ref.external_id).external_id == ref.external_id
