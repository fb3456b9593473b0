"""The sync engine end to end: a real database (SQLite and MariaDB) and the fake QLAB over HTTP."""

from __future__ import annotations

import json
import os
import stat
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from structlog.contextvars import merge_contextvars

from labsync.testing.fake_qlab import Fault
from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user, make_config
from tests.helpers import RESULTS, event_log, events, order_row, results, run_pass


def _pdf_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_completed_order_gets_results_pdf_status_and_one_mail_event(db, fake_lis, config):
    add_user(db, 7, email="anna@example.org", name="Анна")
    local_id = add_order(db, "A-1001", 7)
    pdf = sample_pdf("A-1001")
    fake_lis.add_order("A-1001", results=RESULTS, pdf=pdf)

    summary = run_pass(config)

    assert (summary.checked, summary.completed, summary.failed, summary.events) == (1, 1, 0, 1)
    rows = results(db, "A-1001")
    assert [r.TEST_CODE for r in rows] == ["GLU", "HGB", "HIV"]
    glu = rows[0]
    assert (glu.TEST_NAME, glu.RESULT_VALUE, glu.RESULT_UNIT) == ("Glucose", "7.9", "mmol/L")
    assert (glu.REFERENCE_MIN, glu.REFERENCE_MAX, glu.IS_ABNORMAL) == ("3.9", "6.1", "Y")
    assert [r.IS_ABNORMAL for r in rows] == ["Y", "N", "N"]
    assert rows[1].RESULT_VALUE == "128"
    final = config.pdf.dir / "7" / "A-1001.pdf"
    assert all(r.PDF_PATH == str(final) and r.PDF_PATH.endswith("7/A-1001.pdf") for r in rows)
    assert final.read_bytes() == pdf
    assert stat.S_IMODE(final.stat().st_mode) == 0o640
    assert stat.S_IMODE(final.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(config.pdf.dir.stat().st_mode) == 0o750
    order = order_row(db, "A-1001")
    assert order.STATUS == "completed" and order.SYNCED_AT is not None
    [event] = events(db)
    assert (event.EVENT_NAME, event.LID, event.SUCCESS_EXEC, event.DUPLICATE) == (
        "LAB_RESULTS_READY", "s1", "N", "N")
    assert 's:5:"EMAIL";s:16:"anna@example.org";' in event.C_FIELDS
    assert 's:4:"NAME";s:8:"Анна";' in event.C_FIELDS  # length in UTF-8 bytes
    assert 's:8:"ORDER_ID";s:6:"A-1001";' in event.C_FIELDS
    url = f"/personal/lab-results/{local_id}/"
    assert f's:10:"RESULT_URL";s:{len(url)}:"{url}";' in event.C_FIELDS
    assert event_log(db) == []


def test_second_and_third_pass_write_nothing_new(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    run_pass(config)
    before = [tuple(r) for r in results(db, "A-1")]

    second, third = run_pass(config), run_pass(config)

    # Asked again for corrections (sync.recheck_days), but nothing changed: nothing written.
    assert second.rechecked == third.rechecked == 1
    assert second.completed == third.completed == 0
    assert [tuple(r) for r in results(db, "A-1")] == before
    assert len(events(db)) == 1
    assert fake_lis.request_count("pdf", "A-1") == 1  # unchanged results: the form is kept


def test_reprocessing_a_completed_order_adds_no_twin_rows_and_no_second_mail(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    run_pass(config)
    ids = [r.ID for r in results(db, "A-1")]
    # As if someone reset the status by hand: the order is pending again.
    with db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE local_lab_orders SET STATUS='processing'")

    summary = run_pass(config)

    assert summary.completed == 1 and summary.events == 0
    assert [r.ID for r in results(db, "A-1")] == ids
    assert len(events(db)) == 1


def test_corrected_value_replaces_its_row_in_place(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", status="processing", results=RESULTS[:2], pdf=None)
    run_pass(config)
    preliminary = {r.TEST_CODE: r for r in results(db, "A-1")}
    assert order_row(db, "A-1").STATUS == "processing" and events(db) == []
    corrected = [dict(RESULTS[0], value=131), RESULTS[2]]  # HGB corrected, GLU withdrawn, HIV new
    fake_lis.set_status("A-1", "completed", results=corrected)
    fake_lis.set_pdf("A-1", sample_pdf())

    run_pass(config)

    final = {r.TEST_CODE: r for r in results(db, "A-1")}
    assert sorted(final) == ["HGB", "HIV"]
    assert final["HGB"].ID == preliminary["HGB"].ID and final["HGB"].RESULT_VALUE == "131"
    assert len(events(db)) == 1


def test_processing_order_stores_preliminary_results_and_sends_no_mail(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "P-1", 7)
    fake_lis.add_order("P-1", status="processing", results=RESULTS[:1], pdf=None)

    summary = run_pass(config)

    assert summary.pending == 1 and summary.completed == 0
    assert order_row(db, "P-1").STATUS == "processing"
    [row] = results(db, "P-1")
    assert row.PDF_PATH is None
    assert events(db) == [] and _pdf_files(config.pdf.dir) == []


def test_received_order_is_left_as_it_is(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "R-1", 7)
    fake_lis.add_order("R-1", status="received", pdf=None)

    assert run_pass(config).pending == 1
    assert order_row(db, "R-1").STATUS == "received" and results(db, "R-1") == []


def test_cancelled_order_is_marked_and_gets_no_mail(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "C-1", 7)
    fake_lis.add_order("C-1", status="cancelled", pdf=None)

    summary = run_pass(config)

    assert summary.cancelled == 1
    order = order_row(db, "C-1")
    assert order.STATUS == "cancelled" and order.SYNCED_AT is not None
    assert events(db) == []


def test_unknown_order_stays_pending_and_is_logged_for_the_admin(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "NOPE-1", 7)

    summary = run_pass(config)

    assert summary.failed == 1
    assert order_row(db, "NOPE-1").STATUS == "received"
    [entry] = event_log(db)
    assert (entry.SEVERITY, entry.AUDIT_TYPE_ID, entry.MODULE_ID, entry.ITEM_ID) == (
        "WARNING", "LAB_SYNC", "labsync", "NOPE-1")
    assert "NOPE-1" in entry.DESCRIPTION and "unknown" in entry.DESCRIPTION.lower()
    state = db.rows("SELECT * FROM labsync_orders")[0]
    assert state.FAILURES == 1 and state.LAST_ERROR_KIND == "unknown_order"
    assert state.NEXT_POLL_AT is not None


def test_same_failure_is_logged_to_the_admin_once_not_every_pass(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "NOPE-1", 7)
    for _ in range(3):
        run_pass(config)
    assert len(event_log(db)) == 1
    assert db.scalar("SELECT FAILURES FROM labsync_orders") == 3


def test_pdf_not_ready_then_ready_writes_results_exactly_once(db, fake_lis, config):
    """The brief's agent inserts the results, then fails on the PDF, and inserts them again."""
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS, pdf=None)

    first = run_pass(config)

    assert first.failed == 1 and results(db, "A-1") == []
    assert order_row(db, "A-1").STATUS == "received" and events(db) == []
    assert _pdf_files(config.pdf.dir) == []
    fake_lis.set_pdf("A-1", sample_pdf())
    run_pass(config)
    run_pass(config)
    assert len(results(db, "A-1")) == 3
    assert len(events(db)) == 1


def test_pdf_download_failing_after_results_never_duplicates_them(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    fake_lis.inject("A-1", "pdf", Fault(status=503), times=None)

    assert run_pass(config).failed == 1
    assert results(db, "A-1") == [] and events(db) == []
    fake_lis.clear_faults()
    run_pass(config)
    run_pass(config)
    assert len(results(db, "A-1")) == 3 and len(events(db)) == 1


def test_5xx_is_retried_within_the_pass(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    fake_lis.inject("A-1", "results", Fault(status=502), times=2)

    assert run_pass(config).completed == 1
    assert fake_lis.request_count("results", "A-1") == 3


def test_5xx_beyond_the_retry_budget_leaves_the_order_for_the_next_pass(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    fake_lis.inject("A-1", "results", Fault(status=503), times=3)

    assert run_pass(config).failed == 1
    assert fake_lis.request_count("results", "A-1") == 3  # retry_attempts = 3
    assert run_pass(config).completed == 1
    assert len(results(db, "A-1")) == 3 and len(events(db)) == 1


@pytest.mark.parametrize("body, content_type", [
    (b"{not json", "application/json"),
    (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
    (b'{"status": "completed", "results": {"code": "x"}}', "application/json"),
    (b'{"status": "done", "results": []}', "application/json"),
    (b'{"status": "completed", "results": [{"code": "A", "value": [1, 2]}]}', "application/json"),
])
def test_bad_results_are_refused_and_nothing_is_written(db, fake_lis, config, body, content_type):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    fake_lis.inject("A-1", "results", Fault(body=body, content_type=content_type), times=None)

    summary = run_pass(config)

    assert summary.failed == 1
    assert results(db, "A-1") == [] and events(db) == []
    state = db.rows("SELECT * FROM labsync_orders")[0]
    assert state.LAST_ERROR_KIND == "bad_data" and "A-1" in state.LAST_ERROR
    assert _pdf_files(config.pdf.dir) == []


@pytest.mark.parametrize("fault", [
    Fault(body=b"<html>Error</html>", content_type="application/pdf"),
    Fault(body=sample_pdf()[:300], content_type="application/pdf"),  # cut off, no %%EOF
    Fault(truncate_at=200),  # shorter than its Content-Length
])
def test_bad_or_cut_off_pdf_leaves_nothing_at_the_final_path(db, fake_lis, config, fault):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    fake_lis.inject("A-1", "pdf", fault, times=None)

    assert run_pass(config).failed == 1
    assert _pdf_files(config.pdf.dir) == []  # no final file, no temporary file left behind
    assert results(db, "A-1") == [] and events(db) == []


def test_oversized_pdf_is_refused(db, fake_lis, tmp_path):
    config = make_config(db, fake_lis, tmp_path / "pdfs", pdf={"max_bytes": 10_000})
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS, pdf=sample_pdf(size=50_000))

    assert run_pass(config).failed == 1
    assert _pdf_files(tmp_path / "pdfs") == [] and results(db, "A-1") == []
    assert "10000" in db.scalar("SELECT LAST_ERROR FROM labsync_orders")


@pytest.mark.parametrize("external_id", ["../../x", "a/b", ".hidden", "..", "a\\b", "a b",
                                         "x\x00y"])
def test_unsafe_external_order_id_never_becomes_a_path(db, fake_lis, config, tmp_path,
                                                       external_id):
    add_user(db, 7)
    add_order(db, external_id, 7)
    fake_lis.add_order(external_id, results=RESULTS)

    summary = run_pass(config)

    assert summary.failed == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".pdf"] == []
    assert fake_lis.request_count("results") == 0
    assert "not a safe file name" in event_log(db)[0].DESCRIPTION


def test_safe_but_odd_external_ids_work(db, fake_lis, config):
    add_user(db, 7)
    for ext in ("CON", "a.b_c-1", "Я-1"[2:] or "1"):
        add_order(db, ext, 7)
        fake_lis.add_order(ext, results=RESULTS[:1])
    assert run_pass(config).completed == 3
    assert (config.pdf.dir / "7" / "CON.pdf").is_file()


@pytest.mark.parametrize("user_kwargs, state", [
    ({"email": None}, "no_email"),
    ({"email": "  "}, "no_email"),
    ({"active": "N"}, "inactive"),
])
def test_user_who_cannot_get_mail_still_gets_results(db, fake_lis, config, user_kwargs, state):
    add_user(db, 7, **user_kwargs)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)

    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
        summary = run_pass(config)

    assert summary.completed == 1 and summary.events == 0
    assert events(db) == [] and len(results(db, "A-1")) == 3
    assert db.scalar("SELECT MAIL_STATE FROM labsync_orders") == state
    assert any(e["event"] == "mail.skipped" and e["reason"] == state for e in logged)


def test_order_of_a_user_missing_from_b_user_completes_without_mail(db, fake_lis, config):
    add_order(db, "A-1", 404)
    fake_lis.add_order("A-1", results=RESULTS)
    assert run_pass(config).completed == 1
    assert events(db) == [] and db.scalar("SELECT MAIL_STATE FROM labsync_orders") == "no_user"


def test_overlong_value_is_cut_with_a_marker_and_a_warning(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    long_value = "x" * 600
    fake_lis.add_order("A-1", results=[{"code": "TXT", "name": "Comment", "value": long_value,
                                        "unit": "u" * 150}])
    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
        run_pass(config)
    [row] = results(db, "A-1")
    assert len(row.RESULT_VALUE) == 500 and row.RESULT_VALUE == "x" * 499 + "…"
    assert len(row.RESULT_UNIT) == 100 and row.RESULT_UNIT.endswith("…")
    warnings = [e for e in logged if e["event"] == "result.value_fitted"]
    assert len(warnings) == 2
    assert all(e["order"] == "A-1" and "TXT" in e["detail"] for e in warnings)


def test_emoji_is_replaced_on_a_utf8_table_and_kept_on_utf8mb4(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=[{"code": "E", "name": "Note 🧪", "value": "ok 👍 ё"}])

    assert run_pass(config).completed == 1

    [row] = results(db, "A-1")
    if db.kind == "mariadb":  # the test database is utf8 (3-byte), like an older Bitrix site
        assert (row.TEST_NAME, row.RESULT_VALUE) == ("Note \ufffd", "ok \ufffd ё")
    else:
        assert (row.TEST_NAME, row.RESULT_VALUE) == ("Note 🧪", "ok 👍 ё")


def test_result_dates_are_stored_in_site_time(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=[
        {"code": "Z", "name": "utc", "value": "1", "result_date": "2026-11-20T09:30:00Z"},
        {"code": "O", "name": "offset", "value": "1", "result_date": "2026-11-20T09:30:00+05:00"},
        {"code": "N", "name": "naive", "value": "1", "result_date": "2026-11-20T09:30:00"},
        {"code": "D", "name": "none", "value": "1", "result_date": None},
    ])
    run_pass(config)
    dates = {r.TEST_CODE: r.RESULT_DATE for r in results(db, "A-1")}
    assert dates == {"Z": datetime(2026, 11, 20, 12, 30), "O": datetime(2026, 11, 20, 7, 30),
                     "N": datetime(2026, 11, 20, 9, 30), "D": None}


def test_number_literals_keep_their_exact_text(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    body = (b'{"id": "A-1", "status": "completed", "results": ['
            b'{"code": "A", "name": "a", "value": 5.40, "ref_min": 3.50, "ref_max": 10},'
            b'{"code": "B", "name": "b", "value": 12},'
            b'{"code": "C", "name": "c", "value": 1e-3},'
            b'{"code": "D", "name": "d", "value": -0.0},'
            b'{"code": "E", "name": "e", "value": "<5"}]}')
    fake_lis.add_order("A-1", results_body=body)
    run_pass(config)
    stored = {r.TEST_CODE: (r.RESULT_VALUE, r.REFERENCE_MIN, r.REFERENCE_MAX)
              for r in results(db, "A-1")}
    assert stored == {"A": ("5.40", "3.50", "10"), "B": ("12", None, None),
                      "C": ("1e-3", None, None), "D": ("-0.0", None, None),
                      "E": ("<5", None, None)}


def test_bad_api_key_stops_the_pass_with_one_error(db, fake_lis, tmp_path):
    config = make_config(db, fake_lis, tmp_path / "pdfs",
                         lis={"api_key": "wrong-key-7d2e", "max_concurrency": 2})
    add_user(db, 7)
    for i in range(20):
        add_order(db, f"A-{i}", 7)
        fake_lis.add_order(f"A-{i}", results=RESULTS)

    summary = run_pass(config)

    assert summary.outcome == "lis_auth" and summary.completed == 0
    assert fake_lis.request_count("results") <= 4  # only what was already in flight
    [entry] = event_log(db)
    assert entry.ITEM_ID == "labsync" and entry.SEVERITY == "ERROR"
    assert "wrong-key-7d2e" not in entry.DESCRIPTION
    assert db.scalar("SELECT COUNT(*) FROM labsync_orders WHERE FAILURES > 0") == 0


def test_a_failing_order_does_not_stop_the_others(db, fake_lis, config):
    add_user(db, 7)
    for ext in ("A-1", "A-2", "A-3"):
        add_order(db, ext, 7)
        fake_lis.add_order(ext, results=RESULTS)
    fake_lis.inject("A-2", "results", Fault(body=b"garbage"), times=None)

    summary = run_pass(config)

    assert (summary.completed, summary.failed) == (2, 1)
    assert len(events(db)) == 2 and results(db, "A-2") == []


def test_an_error_inside_the_transaction_rolls_everything_back(db, fake_lis, config,
                                                               monkeypatch):
    """A crash between the result rows and the mail event: neither is left behind."""
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    from labsync.notify import BitrixNotifier

    def explode(*_args, **_kwargs):
        raise RuntimeError("simulated crash after the result rows were written")

    monkeypatch.setattr(BitrixNotifier, "order_ready", explode)
    monkeypatch.setattr(BitrixNotifier, "orders_ready", explode)  # the batch's way
    assert run_pass(config).failed == 1
    assert results(db, "A-1") == [] and events(db) == []
    assert order_row(db, "A-1").STATUS == "received"
    monkeypatch.undo()

    assert run_pass(config).completed == 1
    assert len(results(db, "A-1")) == 3 and len(events(db)) == 1


def test_failed_order_waits_for_its_backoff_before_the_next_poll(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7, order_date=None)  # fresh: its age counts from first sight
    fake_lis.add_order("A-1", results=RESULTS)
    fake_lis.inject("A-1", "results", Fault(body=b"garbage"), times=1)
    start = datetime(2026, 11, 25, 12, 0)

    run_pass(config, due_only=True, now=lambda: start)
    soon = run_pass(config, due_only=True, now=lambda: start + timedelta(seconds=20))
    later = run_pass(config, due_only=True, now=lambda: start + timedelta(minutes=5))

    assert soon.checked == 0
    assert later.completed == 1


def test_pass_is_recorded_for_status(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    run_pass(config)
    [row] = db.rows("SELECT * FROM labsync_passes")
    assert (row.CHECKED, row.COMPLETED, row.EVENTS, row.OUTCOME) == (1, 1, 1, "ok")
    assert row.FINISHED_AT is not None


def test_no_temporary_files_are_left_after_a_pass(db, fake_lis, config):
    add_user(db, 7)
    for i in range(10):
        add_order(db, f"A-{i}", 7)
        fake_lis.add_order(f"A-{i}", results=RESULTS)
    fake_lis.inject("A-3", "pdf", Fault(status=500), times=None)
    run_pass(config)
    names = [p.name for p in _pdf_files(config.pdf.dir)]
    assert len(names) == 9 and all(n.endswith(".pdf") and not n.startswith(".") for n in names)


def test_json_dump_of_events_is_php_shaped(db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "A-1", 7)
    fake_lis.add_order("A-1", results=RESULTS)
    run_pass(config)
    c_fields = events(db)[0].C_FIELDS
    assert c_fields.startswith("a:6:{") and c_fields.endswith("}")
    assert json.dumps(c_fields)  # plain text, storable as-is
    assert os.path.basename(results(db, "A-1")[0].PDF_PATH) == "A-1.pdf"


def test_fresh_pending_order_is_asked_next_pass_and_an_old_one_less_often(db, fake_lis,
                                                                           config):
    add_user(db, 7)
    add_order(db, "NEW-1", 7, order_date=None)
    add_order(db, "OLD-1", 7, order_date=date(2026, 11, 1))  # a backlog found at install
    fake_lis.add_order("NEW-1", status="processing", pdf=None)
    fake_lis.add_order("OLD-1", status="processing", pdf=None)
    start = datetime(2026, 11, 25, 12, 0)

    run_pass(config, due_only=True, now=lambda: start)
    later = run_pass(config, due_only=True, now=lambda: start + timedelta(minutes=15))

    assert later.checked == 1  # NEW-1 only
    next_polls = dict(db.rows("SELECT EXTERNAL_ORDER_ID, NEXT_POLL_AT FROM labsync_orders"))
    old_next = next_polls["OLD-1"]
    old_next = datetime.fromisoformat(old_next) if isinstance(old_next, str) else old_next
    assert old_next - start >= timedelta(hours=5)  # 24 days old: every ~6 h


def test_an_order_pending_past_stale_after_is_marked_and_logged_once(db, fake_lis, tmp_path):
    config = make_config(db, fake_lis, tmp_path / "pdfs", sync={"stale_after": "30d"})
    add_user(db, 7)
    add_order(db, "S-1", 7, order_date=date(2026, 10, 1))
    fake_lis.add_order("S-1", status="processing", pdf=None)
    start = datetime(2026, 11, 25, 12, 0)

    for hours in (0, 30, 60):
        run_pass(config, due_only=True, now=lambda h=hours: start + timedelta(hours=h))

    state = db.rows("SELECT STALE_AT, POLLS, NEXT_POLL_AT FROM labsync_orders")[0]
    assert state.STALE_AT is not None and state.POLLS == 3
    stale_lines = [e for e in event_log(db) if "still pending" in e.DESCRIPTION]
    assert len(stale_lines) == 1 and stale_lines[0].ITEM_ID == "S-1"


def test_an_lis_that_fails_every_request_ends_the_passs_lis_work_early(db, fake_lis, tmp_path):
    config = make_config(db, fake_lis, tmp_path / "pdfs", lis={"max_concurrency": 2})
    add_user(db, 7)
    for i in range(60):
        add_order(db, f"D-{i}", 7)
        fake_lis.add_order(f"D-{i}", results=RESULTS)
    fake_lis.inject(None, "results", Fault(status=503), times=None)

    summary = run_pass(config)

    assert summary.outcome == "lis_unreachable"
    asked = fake_lis.request_count("results")
    assert asked < 3 * 20  # 3 tries an order, ~10 orders, not all 60
    charged = db.scalar("SELECT COUNT(*) FROM labsync_orders WHERE FAILURES > 0")
    assert charged < 20  # failures seen once the LIS was judged down are not charged
    [entry] = [e for e in event_log(db) if e.ITEM_ID == "labsync"]
    assert entry.SEVERITY == "ERROR" and "did not answer" in entry.DESCRIPTION
    fake_lis.clear_faults()
    assert run_pass(config).completed == 60  # the next pass takes them all


def test_a_correction_after_completion_updates_in_place_and_queues_one_update_mail(
        db, fake_lis, config):
    add_user(db, 7)
    add_order(db, "C-1", 7)
    fake_lis.add_order("C-1", results=RESULTS, pdf=sample_pdf("v1"))
    run_pass(config)
    ids = {r.TEST_CODE: r.ID for r in results(db, "C-1")}
    fake_lis.set_results("C-1", [dict(RESULTS[0], value=119, abnormal=True), *RESULTS[1:]])
    fake_lis.set_pdf("C-1", sample_pdf("v2"))

    first, again = run_pass(config), run_pass(config)

    assert first.corrected == 1 and first.events == 1
    assert again.rechecked == 1 and again.events == 0  # one mail per version, not per pass
    rows = {r.TEST_CODE: r for r in results(db, "C-1")}
    assert {k: r.ID for k, r in rows.items()} == ids  # updated in place, no twins
    assert (rows["HGB"].RESULT_VALUE, rows["HGB"].IS_ABNORMAL) == ("119", "Y")
    assert (config.pdf.dir / "7" / "C-1.pdf").read_bytes() == sample_pdf("v2")
    ready, updated = events(db)
    assert ready.EVENT_NAME == "LAB_RESULTS_READY" and updated.EVENT_NAME == "LAB_RESULTS_UPDATED"
    assert 's:7:"VERSION";s:1:"2";' in updated.C_FIELDS
    fake_lis.set_results("C-1", [dict(RESULTS[0], value=121), *RESULTS[1:]])
    run_pass(config)
    assert [e.EVENT_NAME for e in events(db)][-1] == "LAB_RESULTS_UPDATED"
    assert 's:7:"VERSION";s:1:"3";' in events(db)[-1].C_FIELDS
    assert db.scalar("SELECT RESULTS_VERSION FROM labsync_orders") == 3


def test_completed_orders_are_not_rechecked_after_the_window(db, fake_lis, tmp_path):
    config = make_config(db, fake_lis, tmp_path / "pdfs", sync={"recheck_days": 2})
    add_user(db, 7)
    add_order(db, "W-1", 7, order_date=None)
    fake_lis.add_order("W-1", results=RESULTS)
    start = datetime(2026, 11, 25, 12, 0)
    run_pass(config, due_only=True, now=lambda: start)
    asked = [run_pass(config, due_only=True, now=lambda h=h: start + timedelta(hours=h)).rechecked
             for h in (2, 6, 12, 30, 60, 90)]
    assert sum(asked[:4]) >= 2  # asked again within the two days
    assert asked[4:] == [0, 0]  # never after them
    assert db.scalar("SELECT NEXT_POLL_AT FROM labsync_orders") is None


def test_recheck_days_zero_turns_rechecks_off(db, fake_lis, tmp_path):
    config = make_config(db, fake_lis, tmp_path / "pdfs", sync={"recheck_days": 0})
    add_user(db, 7)
    add_order(db, "Z-1", 7)
    fake_lis.add_order("Z-1", results=RESULTS)
    run_pass(config)
    assert run_pass(config).checked == 0
    assert fake_lis.request_count("results", "Z-1") == 1
