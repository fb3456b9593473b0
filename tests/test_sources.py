"""Change feeds and inboxes through the whole engine, on the reference adapter
(``labsync.testing.memory_lis``), on SQLite and MariaDB."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select

from labsync import sources as sources_mod
from labsync.app import open_app
from labsync.errors import BadLisData, StoreError, TransientLisError
from labsync.lis.base import Capability, FeedPage, FeedProblem
from labsync.model import LisOrder, OrderStatus, PdfRef, TestResult
from labsync.sources import BATCH
from labsync.status import collect_status, render_status
from labsync.store.tables import labsync_cursors, labsync_deliveries, labsync_orders
from labsync.testing.memory_lab import MemoryLab
from labsync.testing.memory_lis import MemoryLis
from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user, make_config
from tests.helpers import events, order_row, results

T1 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
T2 = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
T3 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _values(db, external_id):
    return {r.TEST_CODE: r.RESULT_VALUE for r in results(db, external_id)}


def _completed(external_id, value, *, at, version):
    return LisOrder(external_id, OrderStatus.COMPLETED, (TestResult("GLU", "Glucose", value),),
                    changed_at=at, version=version,
                    pdf=PdfRef.inline(sample_pdf(f"{external_id} v{version}")))


def _run(config, lis, what):
    with open_app(config, lis=lis) as app:
        return getattr(app.sync.pushed, what)()


def _cursor(db):
    with db.engine.connect() as conn:
        return conn.execute(select(labsync_cursors.c.FEED_CURSOR)).scalar()


def test_the_feed_completes_the_sites_orders_and_its_cursor_moves_with_them(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "F-1", 7)
    add_order(db, "F-2", 7)
    lab = MemoryLab()
    for name in ("F-1", "F-2", "NOT-HERE"):
        lab.add_order(name, results=[TestResult("GLU", "Glucose", "5.40")], changed_at=T1,
                      version="1", pdf=sample_pdf(name))
    config = make_config(db, fake_lis, tmp_path / "pdfs", sync={"recheck_days": 7})
    lis = MemoryLis(lab, sleep=lambda _s: None, page_size=2)

    first = _run(config, lis, "follow_feed")

    assert (first.pages, first.orders, first.applied, first.failed) == (2, 3, 2, 0)
    assert order_row(db, "F-1").STATUS == "completed" == order_row(db, "F-2").STATUS
    assert (tmp_path / "pdfs" / "7" / "F-1.pdf").read_bytes() == sample_pdf("F-1")
    assert len(events(db)) == 2 and _cursor(db) == "mem:3"

    quiet = _run(config, lis, "follow_feed")  # nothing new: one read, nothing written

    assert (quiet.pages, quiet.orders, quiet.applied) == (1, 0, 0)
    assert len(events(db)) == 2

    lab.update_order("F-2", results=[TestResult("GLU", "Glucose", "5.90")], changed_at=T2,
                     version="2")
    corrected = _run(config, lis, "follow_feed")

    assert corrected.applied == 1 and _values(db, "F-2") == {"GLU": "5.90"}
    assert len(events(db)) == 3  # one "updated" mail
    assert _cursor(db) == "mem:4"


def test_an_inbox_delivery_is_applied_once_even_when_handed_out_again_after_a_crash(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-1", 7)
    lab = MemoryLab()
    lab.deliver("MSG-1", [_completed("H-1", "5.40", at=T1, version="1")])
    config = make_config(db, fake_lis, tmp_path / "pdfs")

    class CrashBeforeDone(MemoryLis):
        def done(self, delivery):  # the process dies after the commit, before this
            raise KeyboardInterrupt

    try:
        _run(config, CrashBeforeDone(lab), "drain_inbox")
    except KeyboardInterrupt:
        pass
    assert order_row(db, "H-1").STATUS == "completed" and len(events(db)) == 1
    assert lab.inbox_state("MSG-1") == "waiting"

    again = _run(config, MemoryLis(lab), "drain_inbox")  # the restarted process

    assert (again.duplicates, again.applied) == (1, 0)
    assert lab.inbox_state("MSG-1") == "done"
    assert len(events(db)) == 1 and len(results(db, "H-1")) == 1
    with db.engine.connect() as conn:
        assert conn.execute(select(labsync_deliveries.c.DELIVERY_ID)).scalars().all() == [
            "MSG-1"]


def test_an_older_message_arriving_late_never_overwrites_a_newer_result(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-2", 7)
    lab = MemoryLab()
    lab.deliver("MSG-NEW", [_completed("H-2", "5.80", at=T3, version="3")])
    lab.deliver("MSG-OLD", [_completed("H-2", "5.40", at=T1, version="1")])
    config = make_config(db, fake_lis, tmp_path / "pdfs", sync={"recheck_days": 7})

    summary = _run(config, MemoryLis(lab), "drain_inbox")

    assert summary.pages == 2
    assert _values(db, "H-2") == {"GLU": "5.80"}
    assert (tmp_path / "pdfs" / "7" / "H-2.pdf").read_bytes() == sample_pdf("H-2 v3")
    assert len(events(db)) == 1
    assert lab.inbox_state("MSG-OLD") == "done"


def test_a_delivery_for_an_order_the_site_does_not_have_yet_waits_and_is_applied_later(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    lab = MemoryLab()
    lab.deliver("MSG-EARLY", [_completed("H-3", "6.10", at=T1, version="1")])
    config = make_config(db, fake_lis, tmp_path / "pdfs")
    lis = MemoryLis(lab)

    held = _run(config, lis, "drain_inbox")

    assert (held.held, held.applied) == (1, 0)
    assert lab.inbox_state("MSG-EARLY") == "waiting"

    add_order(db, "H-3", 7)  # the site's order arrives
    later = _run(config, lis, "drain_inbox")

    assert later.applied == 1 and order_row(db, "H-3").STATUS == "completed"
    assert lab.inbox_state("MSG-EARLY") == "done"


def test_an_unreadable_delivery_is_failed_with_its_reason_and_the_rest_go_on(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "H-4", 7)
    lab = MemoryLab()
    lab.deliver("MSG-BAD", [], problem="not an ORU^R01 message")
    lab.deliver("MSG-OK", [_completed("H-4", "4.2", at=T1, version="1")])
    config = make_config(db, fake_lis, tmp_path / "pdfs")

    summary = _run(config, MemoryLis(lab), "drain_inbox")

    assert (summary.failed, summary.applied) == (1, 1)
    assert lab.inbox_state("MSG-BAD") == "failed: not an ORU^R01 message"
    assert order_row(db, "H-4").STATUS == "completed"


def test_a_drain_applies_its_deliveries_in_batches_and_one_bad_delivery_fails_alone(
        db, fake_lis, tmp_path):
    count = BATCH + 30  # more than one batch
    add_user(db, 7)
    lab = MemoryLab()
    for n in range(count):
        add_order(db, f"B-{n}", 7)
        lab.deliver(f"MSG-{n}", [_completed(f"B-{n}", f"{n}.0", at=T1, version="1")])
    add_order(db, "B-BAD", 7)
    bad_pdf = LisOrder("B-BAD", OrderStatus.COMPLETED, (TestResult("GLU", "Glucose", "1"),),
                       changed_at=T1, version="1", pdf=PdfRef.inline(b"not a pdf"))
    lab.deliver("MSG-BAD", [bad_pdf])
    lab.deliver("MSG-LATER", [_completed("B-LATER", "2.0", at=T1, version="1")])
    config = make_config(db, fake_lis, tmp_path / "pdfs")  # pdf.required = true

    summary = _run(config, MemoryLis(lab), "drain_inbox")

    assert (summary.pages, summary.applied, summary.failed, summary.held) == (
        count + 2, count, 1, 1)
    assert all(order_row(db, f"B-{n}").STATUS == "completed" for n in range(count))
    assert _values(db, f"B-{count - 1}") == {"GLU": f"{count - 1}.0"}
    assert len(events(db)) == count
    assert lab.inbox_state("MSG-BAD").startswith("failed: order B-BAD: ")
    assert "PDF" in lab.inbox_state("MSG-BAD") and order_row(db, "B-BAD").STATUS == "received"
    assert lab.inbox_state("MSG-LATER") == "waiting"
    with db.engine.connect() as conn:
        marked = set(conn.execute(select(labsync_deliveries.c.DELIVERY_ID)).scalars())
    assert marked == {f"MSG-{n}" for n in range(count)}  # MSG-BAD is not: it may come again


def test_when_the_database_goes_away_mid_drain_every_delivery_in_hand_waits_again(
        db, fake_lis, tmp_path, monkeypatch):
    add_user(db, 7)
    lab = MemoryLab()
    for n in range(5):
        add_order(db, f"D-{n}", 7)
        lab.deliver(f"MSG-{n}", [_completed(f"D-{n}", "1.0", at=T1, version=str(n))])
    lab.deliver("MSG-AGAIN", [_completed("D-0", "2.0", at=T2, version="9")])  # next batch
    config = make_config(db, fake_lis, tmp_path / "pdfs", sync={"recheck_days": 7})
    lis = MemoryLis(lab)

    def down(*_args, **_kwargs):
        raise StoreError("the database is unreachable")

    monkeypatch.setattr(sources_mod.deliveries, "applied", down)
    with pytest.raises(StoreError):
        _run(config, lis, "drain_inbox")
    assert [lab.inbox_state(f"MSG-{n}") for n in range(5)] == ["waiting"] * 5
    assert lab.inbox_state("MSG-AGAIN") == "waiting" and events(db) == []
    monkeypatch.undo()

    summary = _run(config, lis, "drain_inbox")

    assert summary.applied == 6 and _values(db, "D-0") == {"GLU": "2.0"}
    assert all(lab.inbox_state(f"MSG-{n}") == "done" for n in range(5))


def test_a_delivery_whose_done_fails_is_not_left_in_hand_and_is_only_marked_done_later(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    lab = MemoryLab()
    for n in range(3):
        add_order(db, f"F-{n}", 7)
        lab.deliver(f"MSG-{n}", [_completed(f"F-{n}", "1.0", at=T1, version="1")])
    config = make_config(db, fake_lis, tmp_path / "pdfs")

    class MoveFailsOnce(MemoryLis):
        failures = 1

        def done(self, delivery):
            if self.failures:
                self.failures -= 1
                raise TransientLisError("done/ cannot be written")
            super().done(delivery)

    lis = MoveFailsOnce(lab)
    with pytest.raises(TransientLisError):
        _run(config, lis, "drain_inbox")
    assert [lab.inbox_state(f"MSG-{n}") for n in range(3)] == ["waiting"] * 3

    again = _run(config, lis, "drain_inbox")  # the same process: nothing is stuck in hand

    assert (again.duplicates, again.applied) == (3, 0)
    assert [lab.inbox_state(f"MSG-{n}") for n in range(3)] == ["done"] * 3
    assert len(events(db)) == 3


class _RecordingFeed(MemoryLis):
    """The reference adapter, remembering what each feed read was asked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def changes(self, cursor, *, since=None):
        self.asked.append((cursor, since))
        return super().changes(cursor, since=since)


def test_a_first_feed_read_starts_a_day_before_the_oldest_pending_order_then_at_its_cursor(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "S-1", 7, order_date=date(2026, 11, 20))
    add_order(db, "S-2", 7, order_date=date(2026, 11, 25))
    add_order(db, "S-OLD", 7, status="completed", order_date=date(2026, 10, 1))
    lab = MemoryLab()
    lab.add_order("S-1", results=[TestResult("GLU", "Glucose", "5.40")],
                  changed_at=datetime(2026, 11, 18, 23, 0, tzinfo=UTC), version="1",
                  pdf=sample_pdf("S-1"))  # before the start: not read
    lab.add_order("S-2", results=[TestResult("GLU", "Glucose", "6.10")],
                  changed_at=datetime(2026, 11, 19, 0, 0, tzinfo=UTC), version="1",
                  pdf=sample_pdf("S-2"))
    config = make_config(db, fake_lis, tmp_path / "pdfs")
    lis = _RecordingFeed(lab, sleep=lambda _s: None)

    _run(config, lis, "follow_feed")
    _run(config, lis, "follow_feed")

    assert lis.asked == [(None, datetime(2026, 11, 19, tzinfo=UTC)), ("mem:2", None)]
    assert order_row(db, "S-2").STATUS == "completed"
    assert order_row(db, "S-1").STATUS == "received"


def test_with_a_feed_a_pending_order_is_asked_by_id_once_then_only_at_verify_every(
        db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "V-1", 7)
    lab = MemoryLab()
    lab.add_order("V-1", status=OrderStatus.PROCESSING, changed_at=T1, version="1")
    config = make_config(db, fake_lis, tmp_path / "pdfs")
    lis = MemoryLis(lab, sleep=lambda _s: None)
    lis.verify_every = timedelta(hours=24)
    now = datetime(2026, 12, 1, 9, 0)

    with open_app(config, lis=lis) as app:
        app.sync.now = lambda: now
        app.sync.run_pass()
    with db.engine.connect() as conn:
        next_poll = conn.execute(select(labsync_orders.c.NEXT_POLL_AT)).scalar_one()

    assert next_poll == now + timedelta(hours=24)
    assert lab.requests("order") == 1


def test_without_a_feed_verify_every_plays_no_part(db, fake_lis, tmp_path):
    class NoFeed(MemoryLis):
        def disabled_capabilities(self):
            return frozenset({Capability.CHANGE_FEED})

    add_user(db, 7)
    add_order(db, "W-1", 7)
    lab = MemoryLab()
    lab.add_order("W-1", status=OrderStatus.PROCESSING, changed_at=T1, version="1")
    config = make_config(db, fake_lis, tmp_path / "pdfs")
    lis = NoFeed(lab, sleep=lambda _s: None)
    lis.verify_every = timedelta(hours=24)
    now = datetime(2026, 12, 1, 9, 0)

    with open_app(config, lis=lis) as app:
        assert not app.sync.pushed.has_feed
        app.sync.now = lambda: now
        app.sync.run_pass()
    with db.engine.connect() as conn:
        next_poll = conn.execute(select(labsync_orders.c.NEXT_POLL_AT)).scalar_one()

    assert next_poll < now + timedelta(hours=24)  # the adaptive rhythm, not verify_every


def test_an_unreadable_feed_entry_is_recorded_on_its_order_and_the_feed_goes_on(
        db, fake_lis, tmp_path):
    class OneBadEntry(MemoryLis):
        def changes(self, cursor, *, since=None):
            page = super().changes(cursor, since=since)
            if cursor is None:  # the first page also lists one report it could not read
                return FeedPage(page.orders, page.cursor, page.more, problems=(
                    FeedProblem("B-2", BadLisData("report 17 of order B-2: no status")),
                    FeedProblem(None, BadLisData("report 18: no identifier"))))
            return page

    add_user(db, 7)
    add_order(db, "B-1", 7)
    add_order(db, "B-2", 7)
    lab = MemoryLab()
    lab.add_order("B-1", results=[TestResult("GLU", "Glucose", "5.40")], changed_at=T1,
                  version="1", pdf=sample_pdf("B-1"))
    config = make_config(db, fake_lis, tmp_path / "pdfs")

    summary = _run(config, OneBadEntry(lab, sleep=lambda _s: None), "follow_feed")

    assert (summary.applied, summary.failed) == (1, 1)
    assert order_row(db, "B-1").STATUS == "completed"
    assert _cursor(db) == "mem:1"  # moved past the bad entry
    with db.engine.connect() as conn:
        state = conn.execute(select(labsync_orders).where(
            labsync_orders.c.ORDER_ID == order_row(db, "B-2").ID)).one()
    assert state.FAILURES == 1 and "no status" in state.LAST_ERROR
    assert state.NEXT_POLL_AT is not None  # asked by id soon, where the error stays


def test_status_shows_where_each_feed_stands(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "C-1", 7)
    lab = MemoryLab()
    lab.add_order("C-1", status=OrderStatus.PROCESSING, changed_at=T1, version="1")
    config = make_config(db, fake_lis, tmp_path / "pdfs")
    _run(config, MemoryLis(lab, sleep=lambda _s: None), "follow_feed")

    report = collect_status(config)

    assert [(f["feed"], f["cursor"]) for f in report["feeds"]] == [("MemoryLis:changes", "mem:1")]
    assert report["inbox"] is None  # the configured adapter (qlab) has no inbox
    assert "change feed MemoryLis:changes: at mem:1, read " in render_status(report)


def test_orders_listed_again_at_the_version_applied_are_not_touched(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "U-1", 7)
    add_order(db, "U-2", 7)
    lab = MemoryLab()
    lab.add_order("U-1", results=[TestResult("GLU", "Glucose", "5.40")], changed_at=T1,
                  version="1", pdf=sample_pdf("U-1"))
    lab.add_order("U-2", status=OrderStatus.PROCESSING, changed_at=T1, version="1")
    config = make_config(db, fake_lis, tmp_path / "pdfs")
    lis = MemoryLis(lab, sleep=lambda _s: None)
    _run(config, lis, "follow_feed")
    with db.engine.connect() as conn:
        before = conn.execute(select(labsync_orders).order_by(labsync_orders.c.ORDER_ID)).all()
    with db.engine.begin() as conn:  # the cursor lost: the whole feed is read again
        conn.execute(labsync_cursors.delete())

    again = _run(config, lis, "follow_feed")

    with db.engine.connect() as conn:
        after = conn.execute(select(labsync_orders).order_by(labsync_orders.c.ORDER_ID)).all()
    assert (again.orders, again.unchanged, again.applied) == (2, 2, 0)
    assert after == before  # not even the bookkeeping of a poll
    assert len(events(db)) == 1
