"""HL7 v2 through the whole engine, on SQLite and MariaDB (``LABSYNC_REQUIRE_MARIADB=1``):
a message dropped or sent over MLLP ends as rows in ``local_lab_results``; a resend is not
applied twice; a late, older message does not overwrite a newer result; a message for an
order the site does not have is held, then failed after ``hold_unknown``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from labsync.app import open_app
from labsync.config import Config
from labsync.lis.hl7 import Hl7Inbox
from labsync.lis.hl7.ack import read_ack
from labsync.lis.hl7.parse import split_messages
from labsync.model import LisOrder, OrderStatus, PdfRef, TestResult
from labsync.testing.hl7_sender import MllpSender, drop, oru
from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user, make_config
from tests.helpers import events, order_row, results
from tests.test_hl7_spool import Clock, files

# A crash in a listener or reader thread fails the test, not only warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

DATA = Path(__file__).parent / "data" / "hl7v2"
T1, T3 = datetime(2026, 11, 30, 10, 0), datetime(2026, 11, 30, 12, 0)
READY, UPDATED = "LAB_RESULTS_READY", "LAB_RESULTS_UPDATED"


def real(name: str) -> bytes:
    return split_messages((DATA / name).read_bytes())[0]


def hl7_site(db: Any, fake_lis: Any, tmp_path: Path, **sections: Any) -> Config:
    lis = {"adapter": "hl7", "hl7": {"drop_dir": str(tmp_path / "hl7"), "listen": "127.0.0.1:2575",
                                     **sections.pop("hl7", {})}}
    return make_config(db, fake_lis, tmp_path / "pdfs", lis=lis, **sections)


@contextmanager
def running(config: Config, **kwargs: Any) -> Iterator[tuple[Hl7Inbox, Any]]:
    """The adapter as ``labsync run`` has it (listener on a free port), and its engine."""
    inbox = Hl7Inbox(config.lis, zone=config.site.timezone, pdf_max_bytes=config.pdf.max_bytes,
                     settle=0.0, **kwargs)
    inbox.listen = ("127.0.0.1", 0)
    with open_app(config, lis=inbox) as app:
        inbox.start()
        yield inbox, app.sync.pushed


def send(inbox: Hl7Inbox, *messages: bytes) -> list[tuple[str, str, str]]:
    where = inbox.address
    assert where is not None
    with MllpSender(*where) as sender:
        return [read_ack(sender.send(m)) for m in messages]


def glucose(control: str, value: str, *, at: datetime, external_id: str = "H-1",
            pdf: bytes | None = None) -> bytes:
    order = LisOrder(external_id, OrderStatus.COMPLETED,
                     (TestResult("GLU", "Glucose", value, "mmol/L", "3.9", "6.1"),),
                     pdf=PdfRef.inline(pdf) if pdf is not None else None)
    return oru(control, [order], sent_at=at, sending_app="LIS", sending_facility="LAB")


def names(db: Any) -> list[str]:
    return [e.EVENT_NAME for e in events(db)]


def test_a_real_message_sent_over_mllp_ends_as_the_sites_result_rows(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "ORD666555", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False})

    with running(config) as (inbox, pushed):
        assert send(inbox, real("LRI_2.0-NG_CBC_Typ_Message.hl7"))[0][0] == "AA"
        summary = pushed.drain_inbox()

    assert (summary.applied, summary.failed) == (1, 0)
    assert order_row(db, "ORD666555").STATUS == "completed" and names(db) == [READY]
    rows = {r.TEST_CODE: r for r in results(db, "ORD666555")}
    assert len(rows) == 28
    rbc = rows["26453-1"]
    assert (rbc.TEST_NAME, rbc.RESULT_VALUE, rbc.RESULT_UNIT, rbc.REFERENCE_MIN,
            rbc.REFERENCE_MAX, rbc.IS_ABNORMAL) == (
        "Erythrocytes [#/volume] in Blood", "4.41", "10*6/uL", "4.3 to 6.2", None, "N")
    assert rows["26464-8"].IS_ABNORMAL == "Y"  # HH
    assert rows["38892-6"].RESULT_VALUE == "Present ++ out of ++++"
    # 2011-01-03 14:34:28-08:00 is 01:34:28 the next day in Moscow (UTC+3 that winter)
    assert rbc.RESULT_DATE == datetime(2011, 1, 4, 1, 34, 28)
    assert files(tmp_path / "hl7" / "queue") == [] and len(files(tmp_path / "hl7" / "done")) == 1


def test_a_dropped_file_with_an_embedded_pdf_completes_its_order_with_that_pdf(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    config = hl7_site(db, fake_lis, tmp_path)  # pdf.required = true
    pdf = sample_pdf("H-1 from HL7")

    with running(config) as (_inbox, pushed):
        drop(tmp_path / "hl7", "result.hl7", glucose("G1", "5.40", at=T1, pdf=pdf))
        pushed.drain_inbox()

    assert order_row(db, "H-1").STATUS == "completed"
    assert (tmp_path / "pdfs" / "7" / "H-1.pdf").read_bytes() == pdf
    assert [(r.TEST_CODE, r.RESULT_VALUE, r.REFERENCE_MIN, r.REFERENCE_MAX)
            for r in results(db, "H-1")] == [("GLU", "5.40", "3.9", "6.1")]


def test_a_resend_is_not_applied_twice_not_even_after_done_was_pruned(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False})
    first = glucose("R1", "5.40", at=T1)

    with running(config) as (inbox, pushed):
        assert send(inbox, first, first)[1][:2] == ("AA", "R1")  # resent at once
        assert pushed.drain_inbox().applied == 1
        assert send(inbox, first)[0][0] == "AA"  # resent after it was applied
        assert pushed.drain_inbox().pages == 0  # seen in done/: not even stored
        for path in (tmp_path / "hl7" / "done").iterdir():
            path.unlink()  # keep_done pruned it; the LIS resends once more
        assert send(inbox, first)[0][0] == "AA"
        again = pushed.drain_inbox()

    assert (again.duplicates, again.applied) == (1, 0)  # labsync_deliveries knew it
    assert names(db) == [READY] and len(results(db, "H-1")) == 1


def test_a_late_older_message_never_overwrites_a_newer_result(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False},
                      sync={"recheck_days": 7})

    with running(config) as (inbox, pushed):
        send(inbox, glucose("NEW", "5.80", at=T3))
        pushed.drain_inbox()
        send(inbox, glucose("OLD", "5.40", at=T1))  # produced earlier, arrived later
        late = pushed.drain_inbox()

    assert late.pages == 1
    assert [r.RESULT_VALUE for r in results(db, "H-1")] == ["5.80"]
    assert names(db) == [READY]


def test_waiting_messages_are_applied_in_the_order_the_lis_produced_them(db, fake_lis,
                                                                         tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False},
                      sync={"recheck_days": 7})

    with running(config) as (inbox, pushed):
        send(inbox, glucose("B", "5.80", at=T3), glucose("A", "5.40", at=T1))
        summary = pushed.drain_inbox()

    assert summary.pages == 2
    assert [r.RESULT_VALUE for r in results(db, "H-1")] == ["5.80"]
    assert names(db) == [READY, UPDATED]  # 5.40 first, then corrected to 5.80


def test_an_unknown_order_is_held_then_failed_after_hold_unknown(db, fake_lis, tmp_path):
    add_user(db, 7)
    config = hl7_site(db, fake_lis, tmp_path, hl7={"hold_unknown": "1d"})
    clock = Clock()

    with running(config, now=clock) as (inbox, pushed):
        send(inbox, glucose("U1", "6.1", at=T1, external_id="NOT-HERE"))
        for _drain in range(2):
            assert pushed.drain_inbox().held == 1
        assert inbox.counts()["held"] == 1
        assert inbox.messages_for("NOT-HERE")[0]["state"] == "held"
        clock.advance(86400 + 60)
        given_up = pushed.drain_inbox()
        counts = inbox.counts()

    assert given_up.held == 1 and counts == {"waiting": 0, "held": 0, "failed": 1, "done": 0}
    reason = next((tmp_path / "hl7" / "error").glob("*.reason")).read_text()
    assert "NOT-HERE is not on the site" in reason and "hold_unknown (1d)" in reason


def test_a_held_message_is_applied_once_the_order_appears(db, fake_lis, tmp_path):
    add_user(db, 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False})

    with running(config) as (inbox, pushed):
        send(inbox, glucose("E1", "6.1", at=T1, external_id="H-9"))
        assert pushed.drain_inbox().held == 1
        add_order(db, "H-9", 7)
        assert pushed.drain_inbox().applied == 1

    assert order_row(db, "H-9").STATUS == "completed"


def test_preliminary_then_final_stores_results_first_and_mails_once_final(db, fake_lis,
                                                                           tmp_path):
    add_user(db, 7)
    add_order(db, "88502218", 7)
    add_order(db, "855238581", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False})

    with running(config) as (inbox, pushed):
        send(inbox, real("LAB-ORU-1.hl7"))
        pushed.drain_inbox()
        assert order_row(db, "88502218").STATUS == "processing" and events(db) == []
        assert len(results(db, "88502218")) == 3  # the verified rows; the I rows not shown
        send(inbox, real("LAB-ORU-2.hl7"))
        pushed.drain_inbox()

    assert {order_row(db, o).STATUS for o in ("88502218", "855238581")} == {"completed"}
    assert names(db) == [READY, READY]
    assert {r.TEST_CODE: r.RESULT_VALUE for r in results(db, "88502218")}["11156-7"] == "8.2"


def test_a_correction_updates_the_row_in_place_with_one_updated_mail(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "9700123", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False},
                      hl7={"order_id": "filler"}, sync={"recheck_days": 7})

    with running(config) as (inbox, pushed):
        send(inbox, real("ORU_R01_2.5.1_SampleTestCase1.hl7"))
        pushed.drain_inbox()
        (before,) = results(db, "9700123")
        send(inbox, real("ORU_R01_2.5.1_SampleTestCase3.hl7"))
        pushed.drain_inbox()
        send(inbox, real("ORU_R01_2.5.1_SampleTestCase3.hl7"))  # the correction resent
        pushed.drain_inbox()

    (after,) = results(db, "9700123")
    assert (before.RESULT_VALUE, after.RESULT_VALUE) == ("50", "25")
    assert after.ID == before.ID and after.REFERENCE_MIN == "<10 ug/dl"
    assert names(db) == [READY, UPDATED]


def test_a_correction_seen_first_is_the_first_result_with_the_ready_mail(db, fake_lis,
                                                                          tmp_path):
    add_user(db, 7)
    add_order(db, "9700123", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False},
                      hl7={"order_id": "filler"})

    with running(config) as (inbox, pushed):
        send(inbox, real("ORU_R01_2.5.1_SampleTestCase3.hl7"))
        pushed.drain_inbox()

    assert order_row(db, "9700123").STATUS == "completed" and names(db) == [READY]


BROKEN_PDF = b"OBX|9|ED|PDF^Report||^AP^PDF^Base64^JVBERi0xLjQK!!broken||||||F\rOBX|1|"


def test_with_pdf_required_a_broken_embedded_pdf_sends_the_message_to_error(db, fake_lis,
                                                                           tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    config = hl7_site(db, fake_lis, tmp_path)  # pdf.required = true
    broken = glucose("P1", "5.4", at=T1).replace(b"OBX|1|", BROKEN_PDF)

    with running(config) as (inbox, pushed):
        assert send(inbox, broken)[0][0] == "AA"  # stored: the PDF is judged when applied
        summary = pushed.drain_inbox()
        counts = inbox.counts()

    assert summary.failed == 1 and order_row(db, "H-1").STATUS == "received"
    assert results(db, "H-1") == [] and events(db) == []
    assert counts == {"waiting": 0, "held": 0, "failed": 1, "done": 0}
    reason = next((tmp_path / "hl7" / "error").glob("*.reason")).read_text()
    assert "order H-1" in reason and "PDF" in reason
    # not marked applied: put back from error/, it is tried again
    assert db.scalar("SELECT COUNT(*) FROM labsync_deliveries") == 0


def test_without_pdf_required_a_broken_embedded_pdf_is_left_out_and_the_results_applied(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False})
    broken = glucose("P2", "5.4", at=T1).replace(b"OBX|1|", BROKEN_PDF)

    with running(config) as (inbox, pushed):
        send(inbox, broken)
        summary = pushed.drain_inbox()
        counts = inbox.counts()

    assert summary.applied == 1 and order_row(db, "H-1").STATUS == "completed"
    assert [r.RESULT_VALUE for r in results(db, "H-1")] == ["5.4"] and names(db) == [READY]
    assert counts["done"] == 1 and counts["failed"] == 0
    assert not (tmp_path / "pdfs" / "7" / "H-1.pdf").exists()


def test_the_adapter_the_registry_builds_drains_what_was_dropped(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    config = hl7_site(db, fake_lis, tmp_path, pdf={"required": False})
    (tmp_path / "hl7").mkdir()
    drop(tmp_path / "hl7", "r.hl7", glucose("S1", "4.4", at=T1))
    time.sleep(1.1)  # the adapter's own settle time (files modified a moment ago wait)

    with open_app(config) as app:  # the adapter as the registry builds it
        assert isinstance(app.lis, Hl7Inbox)
        app.sync.pushed.drain_inbox()

    assert order_row(db, "H-1").STATUS == "completed"
