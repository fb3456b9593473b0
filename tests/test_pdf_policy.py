"""Results without a PDF, and PDFs that come later (``pdf.required``, ``pdf.wait``).

Through the whole engine, against the fake QLAB over HTTP, on SQLite and MariaDB.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user, make_config
from tests.helpers import RESULTS, event_log, events, order_row, results, run_pass


def _site(db, fake_lis, *, pdf: bytes | None = None):
    add_user(db, 7)
    add_order(db, "N-1", 7)
    fake_lis.add_order("N-1", results=RESULTS, pdf=pdf)


def test_by_default_a_completed_order_waits_for_its_pdf(db, fake_lis, tmp_path):
    _site(db, fake_lis)
    config = make_config(db, fake_lis, tmp_path / "pdfs")

    summary = run_pass(config)

    assert summary.completed == 0 and summary.failed == 1
    assert order_row(db, "N-1").STATUS == "received" and results(db, "N-1") == []
    assert events(db) == []


def test_without_a_required_pdf_the_results_are_published_and_the_pdf_stored_when_it_comes(
        db, fake_lis, tmp_path):
    _site(db, fake_lis)
    config = make_config(db, fake_lis, tmp_path / "pdfs", pdf={"required": False})

    first = run_pass(config)

    assert first.completed == 1 and first.failed == 0
    row = order_row(db, "N-1")
    assert row.STATUS == "completed" and row.SYNCED_AT is not None
    stored = results(db, "N-1")
    assert len(stored) == 3 and {r.PDF_PATH for r in stored} == {None}
    assert len(events(db)) == 1  # the ready mail, once
    assert not (tmp_path / "pdfs" / "7" / "N-1.pdf").exists()

    run_pass(config)  # the form is still not there: nothing changes, no second mail
    assert len(events(db)) == 1 and {r.PDF_PATH for r in results(db, "N-1")} == {None}

    pdf = sample_pdf("Lab results N-1")
    fake_lis.set_pdf("N-1", pdf)
    later = run_pass(config)

    final = tmp_path / "pdfs" / "7" / "N-1.pdf"
    assert final.read_bytes() == pdf
    assert {r.PDF_PATH for r in results(db, "N-1")} == {str(final)}
    assert len(results(db, "N-1")) == 3
    assert len(events(db)) == 1  # no second "ready" mail, and no "updated" one
    assert later.corrected == 0
    state = db.rows("SELECT PDF_PATH, RESULTS_VERSION FROM labsync_orders")[0]
    assert state.PDF_PATH == str(final) and state.RESULTS_VERSION == 1


def test_a_form_that_is_not_a_pdf_counts_as_none_and_is_logged(db, fake_lis, tmp_path):
    _site(db, fake_lis, pdf=b"<html>not a pdf</html>")
    config = make_config(db, fake_lis, tmp_path / "pdfs", pdf={"required": False})

    summary = run_pass(config)

    assert summary.completed == 1
    assert {r.PDF_PATH for r in results(db, "N-1")} == {None}
    assert not list((tmp_path / "pdfs").rglob("*.pdf"))
    [line] = event_log(db)  # bad data, told to the admin once; not an order failure
    assert line.ITEM_ID == "N-1" and "not there yet" in line.DESCRIPTION
    assert order_row(db, "N-1").STATUS == "completed"

    fake_lis.set_results("N-1", RESULTS[:2])  # a correction: asked again, the form refetched
    run_pass(config)
    assert fake_lis.request_count("pdf", "N-1") == 2  # refused again...
    assert len(event_log(db)) == 1  # ...but not told twice


def test_pdf_wait_holds_a_completed_order_back_then_publishes_it_without_the_form(
        db, fake_lis, tmp_path):
    _site(db, fake_lis)
    config = make_config(db, fake_lis, tmp_path / "pdfs",
                         pdf={"required": False, "wait": "1h"})
    start = datetime(2026, 12, 1, 9, 0)

    waiting = run_pass(config, now=lambda: start)

    assert waiting.completed == 0 and waiting.pending == 1
    assert order_row(db, "N-1").STATUS == "processing"
    assert len(results(db, "N-1")) == 3  # stored, and the site shows the order in the lab
    assert events(db) == []

    done = run_pass(config, now=lambda: start + timedelta(minutes=61))

    assert done.completed == 1
    assert order_row(db, "N-1").STATUS == "completed" and len(events(db)) == 1


def test_pdf_wait_takes_0s_and_is_refused_with_a_required_pdf():
    import pytest

    from labsync.config import from_mapping
    from labsync.errors import ConfigError

    base = {"database": {"url": "sqlite:////tmp/labsync-x.db"}, "site": {"timezone": "UTC"},
            "lis": {"adapter": "qlab", "base_url": "http://lis.example/v2", "api_key": "k"}}
    config = from_mapping({**base, "pdf": {"dir": "/tmp/p", "required": False, "wait": "0s"}},
                          env={})
    assert (config.pdf.required, config.pdf.wait) == (False, 0.0)
    with pytest.raises(ConfigError) as refused:
        from_mapping({**base, "pdf": {"dir": "/tmp/p", "wait": "2h"}}, env={})
    assert [p for p in refused.value.problems if p.startswith("pdf.wait: only applies with")]
