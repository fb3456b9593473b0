"""The FHIR change feed through the whole engine (``PushedAnswers.follow_feed``), against the
fake FHIR server over HTTP, on SQLite and MariaDB: a page completes the site's orders, a
correction (``amended``) updates the rows in place with one ``LAB_RESULTS_UPDATED`` mail,
and reading the same ``versionId`` again writes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from labsync.app import open_app
from labsync.lis.registry import make_client
from labsync.store.tables import labsync_cursors
from labsync.testing.fake_fhir import FakeFhir, Num, observation, report
from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user, make_config
from tests.helpers import event_log, events, order_row, results

TOKEN = "engine-token-44ab"
SYSTEM = "http://lab.example/orders"
T1 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


@pytest.fixture
def fake() -> Iterator[FakeFhir]:
    with FakeFhir(token=TOKEN) as server:
        yield server


def _publish(fake: FakeFhir, order_id: str, glu: str, *, status: str = "final",
             at: datetime, version: str) -> None:
    """The lab's report of ``order_id``: one glucose and one haemoglobin, and its PDF."""
    fake.put(observation(f"{order_id}-glu", "GLU", Num(glu), unit="mmol/L", name="Glucose",
                         referenceRange=[{"low": {"value": Num("3.90")},
                                          "high": {"value": Num("6.10")}}],
                         interpretation=[{"coding": [{"code": "H" if float(glu) > 6.1
                                                      else "N"}]}]))
    fake.put(observation(f"{order_id}-hgb", "HGB", Num("142"), unit="g/L", name="Haemoglobin"))
    fake.put_binary(f"{order_id}-v{version}", sample_pdf(f"{order_id} v{version}"))
    fake.put(report(order_id, order_id, status=status, system=SYSTEM,
                    results=[f"{order_id}-glu", f"{order_id}-hgb"],
                    presentedForm=[{"contentType": "application/pdf",
                                    "url": f"Binary/{order_id}-v{version}"}]),
             last_updated=at, version=version)


def _config(db: Any, fake: FakeFhir, tmp_path: Any) -> Any:
    return make_config(db, fake, tmp_path / "pdfs", sync={"recheck_days": 7},
                       lis={"adapter": "fhir", "fhir": {"token": TOKEN, "order_system": SYSTEM,
                                                        "overlap": "2m"}})


def _follow(config: Any) -> Any:
    lis = make_client(config.lis, sleep=lambda seconds: None)
    with open_app(config, lis=lis) as app:
        return app.sync.pushed.follow_feed()


def _cursor(db: Any) -> str | None:
    with db.engine.connect() as conn:
        return conn.execute(select(labsync_cursors.c.FEED_CURSOR)).scalar()


def _rows(db: Any, order_id: str) -> list[tuple[Any, ...]]:
    return [(r.ID, r.TEST_CODE, r.RESULT_VALUE, r.REFERENCE_MIN, r.REFERENCE_MAX, r.IS_ABNORMAL)
            for r in results(db, order_id)]


def test_a_feed_page_completes_a_correction_updates_in_place_and_a_reread_writes_nothing(
        db, fake, tmp_path):
    add_user(db, 7)
    add_order(db, "F-1", 7)
    add_order(db, "F-2", 7)
    _publish(fake, "F-1", "5.40", at=T1, version="1")
    _publish(fake, "F-2", "6.30", at=T1 + timedelta(seconds=1), version="1")
    _publish(fake, "NOT-HERE", "4.00", at=T1 + timedelta(seconds=2), version="1")
    config = _config(db, fake, tmp_path)

    first = _follow(config)

    assert (first.orders, first.applied, first.failed) == (3, 2, 0)
    assert order_row(db, "F-1").STATUS == "completed" == order_row(db, "F-2").STATUS
    f1 = _rows(db, "F-1")
    assert [row[1:] for row in f1] == [("GLU", "5.40", "3.90", "6.10", "N"),
                                       ("HGB", "142", None, None, "N")]
    assert (tmp_path / "pdfs" / "7" / "F-2.pdf").read_bytes() == sample_pdf("F-2 v1")
    assert [e.EVENT_NAME for e in events(db)] == ["LAB_RESULTS_READY"] * 2
    assert _cursor(db) == "fhir1;2026-11-30T10:00:02.000+00:00;"
    before = _rows(db, "F-2")

    _publish(fake, "F-2", "5.90", status="amended", at=T1 + timedelta(minutes=1), version="2")
    corrected = _follow(config)

    after = _rows(db, "F-2")
    assert corrected.failed == 0
    assert [row[0] for row in after] == [row[0] for row in before]  # the same rows, in place
    assert [row[1:3] for row in after] == [("GLU", "5.90"), ("HGB", "142")]
    assert [e.EVENT_NAME for e in events(db)] == ["LAB_RESULTS_READY"] * 2 + [
        "LAB_RESULTS_UPDATED"]
    assert (tmp_path / "pdfs" / "7" / "F-2.pdf").read_bytes() == sample_pdf("F-2 v2")
    assert _rows(db, "F-1") == f1
    assert _cursor(db) == "fhir1;2026-11-30T10:01:00.000+00:00;"

    log_lines = len(event_log(db))
    site_orders = db.rows("SELECT * FROM local_lab_orders ORDER BY ID")
    versions = db.rows("SELECT * FROM labsync_versions ORDER BY ORDER_ID")
    again = _follow(config)  # the overlap reads F-1 and F-2 again, at the same versionId

    assert again.orders == 3 and again.failed == 0
    assert _rows(db, "F-1") == f1 and _rows(db, "F-2") == after
    assert len(events(db)) == 3 and len(event_log(db)) == log_lines
    assert db.rows("SELECT * FROM local_lab_orders ORDER BY ID") == site_orders
    assert db.rows("SELECT * FROM labsync_versions ORDER BY ORDER_ID") == versions
    # The feed was read with the token, starting a day before the oldest pending order.
    feed_reads = [r for r in fake.requests if r.endpoint == "feed"]
    assert {r.authorization for r in fake.requests} == {f"Bearer {TOKEN}"}
    assert "_lastUpdated=ge2026-11-19T00%3A00%3A00.000%2B00%3A00" in feed_reads[0].target
    assert "_lastUpdated=gt2026-11-30T09%3A58%3A02.000%2B00%3A00" in feed_reads[1].target


def test_a_form_outside_the_base_counts_as_no_pdf_and_is_never_fetched(db, fake, tmp_path):
    add_user(db, 7)
    add_order(db, "X-1", 7)
    with FakeFhir() as elsewhere:
        elsewhere.put_binary("1", sample_pdf("elsewhere"))
        fake.put(observation("X-1-glu", "GLU", Num("5.0")))
        fake.put(report("X-1", "X-1", system=SYSTEM, results=["X-1-glu"], presentedForm=[
            {"contentType": "application/pdf", "url": f"{elsewhere.base_url}/Binary/1"}]),
            last_updated=T1, version="1")
        config = make_config(db, fake, tmp_path / "pdfs", pdf={"required": False},
                             lis={"adapter": "fhir", "fhir": {"token": TOKEN,
                                                              "order_system": SYSTEM}})

        summary = _follow(config)

        assert elsewhere.request_count() == 0
    assert summary.failed == 0
    assert order_row(db, "X-1").STATUS == "completed"  # pdf.required = false: no PDF yet
    assert not (tmp_path / "pdfs" / "7" / "X-1.pdf").exists()
