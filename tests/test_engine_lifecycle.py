"""An order's life through the engine, on the reference adapter (``memory_lis``).

The engine's own promises, whatever the LIS: results, the PDF, the status and exactly one
mail for a completed order; nothing new on a second pass; a correction in place; nothing
written while the LIS has nothing; a failure kept to its order. On SQLite and MariaDB.
The same life through the QLAB adapter over HTTP is ``tests/test_sync_engine.py``.
"""

from __future__ import annotations

import stat

import pytest

from labsync.app import open_app
from labsync.model import OrderStatus, TestResult
from labsync.testing.memory_lab import Fault, MemoryLab
from labsync.testing.memory_lis import MemoryLis
from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user, make_config
from tests.helpers import event_log, events, order_row, results

GLU = TestResult("GLU", "Glucose", "7.9", "mmol/L", "3.9", "6.1", abnormal=True)
HGB = TestResult("HGB", "Haemoglobin", "128", "g/L", "120", "160")
RESULTS = (GLU, HGB)


@pytest.fixture
def lab() -> MemoryLab:
    return MemoryLab()


@pytest.fixture
def config(db, fake_lis, tmp_path):
    return make_config(db, fake_lis, tmp_path / "pdfs", sync={"recheck_days": 7})


def _pass(config, lab):
    """One `sync-once --all` pass, the adapter a memory one over ``lab``."""
    with open_app(config, lis=MemoryLis(lab, sleep=lambda _s: None)) as app:
        return app.sync.run_pass(due_only=False)


def test_a_completed_order_gets_its_results_pdf_status_and_one_mail(db, lab, config):
    add_user(db, 7)
    add_order(db, "M-1", 7)
    lab.add_order("M-1", results=RESULTS, pdf=sample_pdf("M-1"))

    summary = _pass(config, lab)

    assert (summary.completed, summary.failed, summary.events) == (1, 0, 1)
    rows = results(db, "M-1")
    assert [(r.TEST_CODE, r.RESULT_VALUE, r.IS_ABNORMAL) for r in rows] == [
        ("GLU", "7.9", "Y"), ("HGB", "128", "N")]
    final = config.pdf.dir / "7" / "M-1.pdf"
    assert final.read_bytes() == sample_pdf("M-1")
    assert stat.S_IMODE(final.stat().st_mode) == 0o640
    assert {r.PDF_PATH for r in rows} == {str(final)}
    assert order_row(db, "M-1").STATUS == "completed" and len(events(db)) == 1

    again = _pass(config, lab)  # a recheck: the same results

    assert (again.completed, again.corrected, again.events) == (0, 0, 0)
    assert len(results(db, "M-1")) == 2 and len(events(db)) == 1


def test_a_correction_replaces_its_row_in_place_with_one_updated_mail(db, lab, config):
    add_user(db, 7)
    add_order(db, "M-2", 7)
    lab.add_order("M-2", results=RESULTS, pdf=sample_pdf("M-2"))
    _pass(config, lab)
    ids = {r.TEST_CODE: r.ID for r in results(db, "M-2")}

    lab.update_order("M-2", results=[GLU, TestResult("HGB", "Haemoglobin", "131", "g/L")])
    summary = _pass(config, lab)

    assert summary.corrected == 1
    rows = {r.TEST_CODE: r for r in results(db, "M-2")}
    assert rows["HGB"].RESULT_VALUE == "131" and rows["HGB"].ID == ids["HGB"]
    assert [e.EVENT_NAME for e in events(db)] == ["LAB_RESULTS_READY", "LAB_RESULTS_UPDATED"]


def test_an_order_in_the_lab_keeps_its_preliminary_results_and_gets_no_mail(db, lab, config):
    add_user(db, 7)
    add_order(db, "M-3", 7)
    add_order(db, "M-4", 7)
    lab.add_order("M-3", status=OrderStatus.PROCESSING, results=[GLU])
    lab.add_order("M-4", status=OrderStatus.RECEIVED)

    summary = _pass(config, lab)

    assert summary.pending == 2 and events(db) == []
    assert order_row(db, "M-3").STATUS == "processing" and len(results(db, "M-3")) == 1
    assert order_row(db, "M-4").STATUS == "received" and results(db, "M-4") == []


def test_a_cancelled_order_is_marked_and_gets_no_mail(db, lab, config):
    add_user(db, 7)
    add_order(db, "M-5", 7)
    lab.add_order("M-5", status=OrderStatus.CANCELLED)

    assert _pass(config, lab).cancelled == 1
    assert order_row(db, "M-5").STATUS == "cancelled" and events(db) == []


def test_an_unknown_order_stays_pending_and_tells_the_admin_once(db, lab, config):
    add_user(db, 7)
    add_order(db, "M-6", 7)

    first = _pass(config, lab)
    _pass(config, lab)

    assert first.failed == 1 and order_row(db, "M-6").STATUS == "received"
    [line] = [e for e in event_log(db) if e.ITEM_ID == "M-6"]
    assert "M-6" in line.DESCRIPTION


def test_a_pdf_not_ready_then_ready_writes_the_results_once(db, lab, config):
    add_user(db, 7)
    add_order(db, "M-7", 7)
    lab.add_order("M-7", results=RESULTS, pdf=None)

    waiting = _pass(config, lab)
    assert waiting.failed == 1 and results(db, "M-7") == [] and events(db) == []

    lab.set_pdf("M-7", sample_pdf("M-7"))
    done = _pass(config, lab)

    assert done.completed == 1 and len(results(db, "M-7")) == 2 and len(events(db)) == 1


def test_a_failing_order_does_not_stop_the_others(db, lab, config):
    add_user(db, 7)
    for name in ("M-8", "M-9", "M-10"):
        add_order(db, name, 7)
        lab.add_order(name, results=RESULTS, pdf=sample_pdf(name))
    lab.fail("M-9", Fault.BAD_DATA, times=None)
    lab.fail("M-10", Fault.TRANSIENT, times=2)  # within the adapter's 3 tries

    summary = _pass(config, lab)

    assert (summary.completed, summary.failed) == (2, 1)
    assert order_row(db, "M-9").STATUS == "received" and results(db, "M-9") == []
    assert order_row(db, "M-10").STATUS == "completed"


def test_a_user_without_an_email_gets_the_results_and_no_mail(db, lab, config):
    add_user(db, 7, email=None)
    add_order(db, "M-11", 7)
    lab.add_order("M-11", results=RESULTS, pdf=sample_pdf("M-11"))

    summary = _pass(config, lab)

    assert summary.completed == 1 and summary.events == 0
    assert len(results(db, "M-11")) == 2 and events(db) == []
