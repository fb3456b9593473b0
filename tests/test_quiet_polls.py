"""Quiet polls: an order still in the lab with nothing reported is recorded in a batch per page,
guarded by the claim instead of a row lock (``OrderApplier.quiet``, ``bookkeeping.save_quiet``)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import event, insert

from labsync.store import bookkeeping
from labsync.store.tables import labsync_orders
from labsync.testing.fake_qlab import Fault
from tests.conftest import add_order, add_user
from tests.helpers import RESULTS, event_log, events, order_row, results, run_pass

START = datetime(2026, 11, 25, 12, 0)


def _state(db, external_id):
    [row] = db.rows("SELECT * FROM labsync_orders WHERE EXTERNAL_ORDER_ID = :e", e=external_id)
    return row


def _as_datetime(value):
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def test_quiet_polls_move_the_order_to_processing_and_keep_the_bookkeeping(db, fake_lis,
                                                                             config):
    add_user(db, 7)
    add_order(db, "Q-1", 7, order_date=None)
    add_order(db, "Q-2", 7, order_date=None)
    fake_lis.add_order("Q-1", status="processing", pdf=None)
    fake_lis.add_order("Q-2", status="received", pdf=None)
    fake_lis.inject("Q-1", "results", Fault(body=b"garbage"), times=1)

    failed = run_pass(config, due_only=True, now=lambda: START)
    first = run_pass(config, due_only=True, now=lambda: START + timedelta(minutes=15))
    second = run_pass(config, due_only=True, now=lambda: START + timedelta(minutes=30))

    assert (failed.failed, failed.pending) == (1, 1)
    assert (first.checked, first.pending, first.skipped) == (2, 2, 0)
    assert (second.checked, second.pending, second.skipped) == (2, 2, 0)
    assert order_row(db, "Q-1").STATUS == "processing"
    assert order_row(db, "Q-2").STATUS == "received"  # the LIS has not started on it
    q1, q2 = _state(db, "Q-1"), _state(db, "Q-2")
    assert (q1.POLLS, q1.FAILURES, q1.FAILURES_TOTAL, q1.LIS_STATUS) == (3, 0, 1, "processing")
    assert (q2.POLLS, q2.FAILURES, q2.LIS_STATUS) == (3, 0, "received")
    for state in (q1, q2):
        assert state.LEASE_OWNER is None and state.LEASE_UNTIL is None
        assert _as_datetime(state.LAST_POLL_AT) == START + timedelta(minutes=30)
        # Fresh orders are asked again on the very next pass.
        assert _as_datetime(state.NEXT_POLL_AT) == START + timedelta(minutes=30)
    assert results(db, "Q-1") == [] and events(db) == []
    assert len(event_log(db)) == 1  # the one failure, nothing for the quiet polls


def test_an_order_that_reports_results_after_quiet_polls_completes_normally(db, fake_lis,
                                                                             config):
    add_user(db, 7)
    add_order(db, "Q-1", 7)
    fake_lis.add_order("Q-1", status="processing", pdf=None)
    run_pass(config)
    run_pass(config)
    fake_lis.add_order("Q-1", results=RESULTS)

    summary = run_pass(config)

    assert (summary.completed, summary.events) == (1, 1)
    assert order_row(db, "Q-1").STATUS == "completed"
    assert len(results(db, "Q-1")) == len(RESULTS)
    assert _state(db, "Q-1").POLLS == 3


def _claimed(db, external_id, user_id, *, owner):
    order_id = add_order(db, external_id, user_id)
    with db.engine.begin() as conn:
        conn.execute(insert(labsync_orders).values(
            ORDER_ID=order_id, EXTERNAL_ORDER_ID=external_id, FIRST_SEEN_AT=START, POLLS=4,
            LEASE_OWNER=owner, LEASE_UNTIL=START + timedelta(minutes=15)))
    return order_id


def _save(db, *polls, owner="me"):
    with db.engine.begin() as conn:
        return bookkeeping.save_quiet(conn, polls, owner=owner, now_utc=START)


def test_a_quiet_poll_writes_nothing_once_another_instance_holds_the_order(db):
    order_id = _claimed(db, "Q-1", 7, owner="other")

    written = _save(db, bookkeeping.QuietPoll(order_id, "Q-1", 7, "processing",
                                         START + timedelta(hours=1), to_processing=True))

    assert written == 0
    assert order_row(db, "Q-1").STATUS == "received"
    state = _state(db, "Q-1")
    assert (state.POLLS, state.LEASE_OWNER, state.LAST_POLL_AT) == (4, "other", None)


def test_a_quiet_poll_moves_the_status_only_for_the_same_user_and_a_pending_order(db):
    moved = _claimed(db, "Q-1", 7, owner="me")
    other_user = _claimed(db, "Q-2", 8, owner="me")  # the site gave the order to user 8
    cancelled = _claimed(db, "Q-3", 7, owner="me")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE local_lab_orders SET STATUS = 'cancelled' WHERE ID = {cancelled}")
    later = START + timedelta(hours=1)

    written = _save(db, *(bookkeeping.QuietPoll(order_id, name, 7, "processing", later,
                                           to_processing=True)
                          for order_id, name in ((moved, "Q-1"), (other_user, "Q-2"),
                                                 (cancelled, "Q-3"))))

    assert written == 3
    assert [order_row(db, n).STATUS for n in ("Q-1", "Q-2", "Q-3")] == [
        "processing", "received", "cancelled"]
    for name in ("Q-1", "Q-2", "Q-3"):
        state = _state(db, name)
        assert (state.POLLS, state.LEASE_OWNER, state.LIS_STATUS) == (5, None, "processing")
        assert _as_datetime(state.NEXT_POLL_AT) == later


def test_quiet_polls_due_in_the_same_minute_share_a_statement_and_keep_their_minute(db):
    ids = [_claimed(db, f"Q-{n}", 7, owner="me") for n in range(3)]
    dues = [START + timedelta(minutes=37, seconds=12), START + timedelta(minutes=37, seconds=58),
            START + timedelta(hours=3, seconds=1)]
    statements = []

    def count(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith("UPDATE LABSYNC_ORDERS"):
            statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        written = _save(db, *(bookkeeping.QuietPoll(i, f"Q-{n}", 7, "processing", due)
                              for n, (i, due) in enumerate(zip(ids, dues, strict=True))))
    finally:
        event.remove(db.engine, "before_cursor_execute", count)

    assert written == 3 and len(statements) == 2
    got = [_as_datetime(_state(db, f"Q-{n}").NEXT_POLL_AT) for n in range(3)]
    assert got == [START + timedelta(minutes=37), START + timedelta(minutes=37),
                   START + timedelta(hours=3)]


def test_one_statement_moves_each_order_by_its_own_claim_and_identity(db):
    """The moves of a page go out as one UPDATE: each order is still checked on its own."""
    mine = _claimed(db, "Q-1", 7, owner="me")
    theirs = _claimed(db, "Q-2", 7, owner="other")
    renamed = _claimed(db, "Q-3", 7, owner="me")
    also_mine = _claimed(db, "Q-4", 9, owner="me")
    with db.engine.begin() as conn:  # the site re-used the row for another LIS order
        conn.exec_driver_sql(
            f"UPDATE local_lab_orders SET EXTERNAL_ORDER_ID = 'Q-3b' WHERE ID = {renamed}")
    later = START + timedelta(hours=1)

    _save(db, *(bookkeeping.QuietPoll(order_id, name, user, "processing", later, to_processing=True)
                for order_id, name, user in ((mine, "Q-1", 7), (theirs, "Q-2", 7),
                                             (renamed, "Q-3", 7), (also_mine, "Q-4", 9))))

    assert [order_row(db, n).STATUS for n in ("Q-1", "Q-2", "Q-3b", "Q-4")] == [
        "processing", "received", "received", "processing"]
