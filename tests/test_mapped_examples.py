"""Each example mapping of ``config/examples/`` runs a full ``labsync sync-once`` against a
fake LIMS serving its shape, on SQLite and MariaDB: result rows as the LIS wrote them, the
PDF in place, one mail; a second pass writes nothing new."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from labsync import cli
from labsync.model import OrderStatus, Patient, TestResult
from labsync.store.tables import local_lab_orders, local_lab_results
from labsync.testing.pdfs import sample_pdf
from tests.conftest import Db, add_order, add_user
from tests.helpers import restored_logging
from tests.mapped_support import EXAMPLE_URLS, fake_of, write_example

MSK = timezone(timedelta(hours=3))
PATIENT = Patient(phone="+79991234567", last_name="Иванова", first_name="Анна",
                  birth_date=date(1985, 3, 21))
RESULTS = (
    TestResult(code="GLU", name="Глюкоза", value="6.30", unit="ммоль/л", ref_min="3.90",
               ref_max="6.10", abnormal=True,
               result_date=datetime(2024, 5, 14, 10, 30, tzinfo=MSK)),
    TestResult(code="HGB", name="Гемоглобин", value="142", unit="г/л", ref_min="120",
               ref_max="160", result_date=datetime(2024, 5, 14, 7, 45, tzinfo=UTC)),
    TestResult(code=None, name="Комментарий", value="повтор через 2 нед.",
               result_date=datetime(2024, 5, 14, 11, 0)),
)
@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cli.main`` configures logging for the process; put everything back afterwards."""
    with restored_logging():
        yield


def results_of(db: Db, external_id: str) -> list[tuple[object, ...]]:
    r, o = local_lab_results, local_lab_orders
    query = (select(r.c.TEST_CODE, r.c.TEST_NAME, r.c.RESULT_VALUE, r.c.RESULT_UNIT,
                    r.c.REFERENCE_MIN, r.c.REFERENCE_MAX, r.c.IS_ABNORMAL, r.c.RESULT_DATE,
                    r.c.PDF_PATH)
             .join(o, o.c.ID == r.c.ORDER_ID).where(o.c.EXTERNAL_ORDER_ID == external_id)
             .order_by(r.c.ID))
    with db.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


@pytest.mark.parametrize("name", list(EXAMPLE_URLS))
def test_an_example_mapping_runs_a_full_pass(name: str, db: Db, tmp_path: Path) -> None:
    pdf = sample_pdf(f"results of {name}", size=90_000)
    with fake_of(name) as lims:
        lims.add_order("EX-1", results=RESULTS, pdf=pdf, patient=PATIENT,
                       order_date=date(2024, 5, 14))
        lims.add_order("EX-2", status=OrderStatus.PROCESSING, results=RESULTS[:1],
                       patient=PATIENT)
        lims.add_order("EX-3", status=OrderStatus.CANCELLED, patient=PATIENT)
        add_user(db, 7, email="anna@example.org", name="Анна")
        for external_id in ("EX-1", "EX-2", "EX-3"):
            add_order(db, external_id, 7)
        config = write_example(name, lims, db.url, tmp_path)

        assert cli.main(["--config", str(config), "sync-once"]) == 0

        statuses = dict(db.rows("SELECT EXTERNAL_ORDER_ID, STATUS FROM local_lab_orders"))
        assert statuses == {"EX-1": "completed", "EX-2": "processing", "EX-3": "cancelled"}
        rows = results_of(db, "EX-1")
        pdf_path = tmp_path / "lab-results" / "7" / "EX-1.pdf"
        assert rows == [
            ("GLU", "Глюкоза", "6.30", "ммоль/л", "3.90", "6.10", "Y",
             datetime(2024, 5, 14, 10, 30), str(pdf_path)),
            ("HGB", "Гемоглобин", "142", "г/л", "120", "160", "N",
             datetime(2024, 5, 14, 10, 45), str(pdf_path)),  # 07:45 UTC in Moscow
            (None, "Комментарий", "повтор через 2 нед.", None, None, None, "N",
             datetime(2024, 5, 14, 11, 0), str(pdf_path)),
        ]
        assert pdf_path.read_bytes() == pdf
        events = db.rows("SELECT EVENT_NAME, C_FIELDS FROM b_event")
        assert len(events) == 1 and 's:8:"ORDER_ID";s:4:"EX-1";' in events[0].C_FIELDS
        processing = db.scalar("SELECT COUNT(*) FROM local_lab_results r JOIN local_lab_orders"
                               " o ON o.ID = r.ORDER_ID WHERE o.EXTERNAL_ORDER_ID = 'EX-2'")
        assert processing == 1  # results already there are stored while in the lab

        asked = lims.request_count("order")
        assert cli.main(["--config", str(config), "sync-once", "--all"]) == 0

        assert lims.request_count("order") > asked  # asked again (EX-2 still in the lab)
        assert db.scalar("SELECT COUNT(*) FROM local_lab_results") == 4
        assert db.scalar("SELECT COUNT(*) FROM b_event") == 1


@pytest.mark.parametrize("name", list(EXAMPLE_URLS))
def test_check_reaches_each_example_lis_by_an_order_it_does_not_have(
        name: str, db: Db, tmp_path: Path) -> None:
    from labsync.checks import check_all
    from labsync.config import load

    with fake_of(name) as lims:
        config = load(write_example(name, lims, db.url, tmp_path), env={})

        findings = check_all(config).findings

        lis = [f for f in findings if "LIS" in f.text]
        assert [f.verdict for f in lis] == ["ok"] and "accepted" in lis[0].text
        assert lims.request_count("order", "labsync-probe-0") == 1
