"""First completions are written in batches (``OrderApplier.complete_batch``): fewer statements,
the same rows, and one order's trouble never holds back the others."""

from __future__ import annotations

from pathlib import Path

import structlog
from sqlalchemy import event, insert, text
from structlog.contextvars import merge_contextvars

import labsync.app as app_module
from labsync.notify import BitrixNotifier
from labsync.store import orders
from labsync.store.db import make_engine
from labsync.store.tables import local_lab_results
from tests.conftest import add_order, add_user
from tests.helpers import (
    RESULTS,
    add_orders,
    events,
    mail_fields,
    order_row,
    results,
    run_pass,
)


def test_many_completions_take_one_lock_statement_per_batch_and_write_everything(
        db, fake_lis, config, monkeypatch):
    add_user(db, 7)
    names = [f"B-{n:03d}" for n in range(45)]
    add_orders(db, names)
    for name in names:
        fake_lis.add_order(name, results=RESULTS)
    locking_reads: list[str] = []

    def counted_engine(*args, **kwargs):  # the pass's own engine, with a statement counter
        engine = make_engine(*args, **kwargs)

        @event.listens_for(engine, "before_cursor_execute")
        def seen(_conn, _cursor, statement, *_args):
            if "STORED_RESULTS" in statement:
                locking_reads.append(statement)

        return engine

    monkeypatch.setattr(app_module, "make_engine", counted_engine)
    summary = run_pass(config)

    assert (summary.completed, summary.failed, summary.events) == (45, 0, 45)
    assert len(locking_reads) == 3  # 20 + 20 + 5, one locking read each
    assert len(events(db)) == 45
    for name in names:
        assert len(results(db, name)) == len(RESULTS)
        row = order_row(db, name)
        assert row.STATUS == "completed" and row.SYNCED_AT is not None
        assert Path(config.pdf.dir, "7", f"{name}.pdf").is_file()
    state = db.rows("SELECT COUNT(*) AS n FROM labsync_orders WHERE NOTIFIED_AT IS NOT NULL "
                    "AND MAIL_EVENT_ID IS NOT NULL AND RESULTS_VERSION = 1 AND POLLS = 1 "
                    "AND LEASE_OWNER IS NULL AND PDF_SHA256 IS NOT NULL")[0]
    assert state.n == 45


def test_one_order_failing_inside_the_batch_leaves_the_others_completed(db, fake_lis, config,
                                                                      monkeypatch):
    add_user(db, 7)
    names = ["B-1", "B-2", "B-3", "B-4"]
    add_orders(db, names)
    for name in names:
        fake_lis.add_order(name, results=RESULTS)
    real, real_many = BitrixNotifier.order_ready, BitrixNotifier.orders_ready

    def fails_for_b3(self, conn, *, external_id, **kwargs):
        if external_id == "B-3":
            raise RuntimeError("simulated bug for one order")
        return real(self, conn, external_id=external_id, **kwargs)

    def batch_fails_with_b3(self, conn, ready, now_site):
        if any(r.external_id == "B-3" for r in ready):
            raise RuntimeError("simulated bug for one order")
        return real_many(self, conn, ready, now_site)

    monkeypatch.setattr(BitrixNotifier, "order_ready", fails_for_b3)
    monkeypatch.setattr(BitrixNotifier, "orders_ready", batch_fails_with_b3)
    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
        summary = run_pass(config)

    assert (summary.completed, summary.failed) == (3, 1)
    assert [e["orders"] for e in logged if e["event"] == "batch.one_by_one"] == [4]
    assert results(db, "B-3") == [] and order_row(db, "B-3").STATUS == "received"
    assert len(events(db)) == 3
    for name in ("B-1", "B-2", "B-4"):
        assert len(results(db, name)) == len(RESULTS)
    monkeypatch.undo()
    assert run_pass(config).completed == 1
    assert len(results(db, "B-3")) == len(RESULTS) and len(events(db)) == 4


def test_an_order_taken_by_another_instance_is_skipped_and_the_batch_goes_on(
        db, fake_lis, config, monkeypatch):
    add_user(db, 7)
    names = ["B-1", "B-2", "B-3"]
    add_orders(db, names)
    for name in names:
        fake_lis.add_order(name, results=RESULTS)
    taken = order_row(db, "B-2").ID
    real = orders.lock_orders

    def lease_lost_first(conn, order_ids):
        # Another instance got B-2 after this one's lease ran out (written in the same
        # transaction here: SQLite allows one writer at a time).
        conn.execute(text("UPDATE labsync_orders SET LEASE_OWNER = 'other' WHERE ORDER_ID = :id"),
                     {"id": taken})
        return real(conn, order_ids)

    monkeypatch.setattr(orders, "lock_orders", lease_lost_first)
    summary = run_pass(config)

    assert (summary.completed, summary.skipped, summary.failed) == (2, 1, 0)
    assert results(db, "B-2") == [] and order_row(db, "B-2").STATUS == "received"
    assert not Path(config.pdf.dir, "7", "B-2.pdf").exists()
    assert [order_row(db, n).STATUS for n in ("B-1", "B-3")] == ["completed", "completed"]
    assert len(events(db)) == 2


def test_rows_an_older_agent_left_are_matched_not_doubled(db, fake_lis, config):
    add_user(db, 7)
    order_id = add_order(db, "B-1", 7)
    add_orders(db, ["B-2"])
    with db.engine.begin() as conn:  # the brief's PHP agent wrote two rows, one of them twice
        conn.execute(insert(local_lab_results), [
            {"ORDER_ID": order_id, "TEST_CODE": r["code"], "TEST_NAME": r["name"],
             "RESULT_VALUE": "old", "IS_ABNORMAL": "N"}
            for r in (RESULTS[0], RESULTS[0], RESULTS[1])])
    for name in ("B-1", "B-2"):
        fake_lis.add_order(name, results=RESULTS)

    summary = run_pass(config)

    assert summary.completed == 2
    rows = results(db, "B-1")
    assert sorted(r.TEST_CODE for r in rows) == sorted(r["code"] for r in RESULTS)
    assert all(r.RESULT_VALUE != "old" for r in rows)
    assert len(results(db, "B-2")) == len(RESULTS) and len(events(db)) == 2


def _statements(monkeypatch, *needles: str) -> dict[str, int]:
    """Counts of the pass's cursor executions whose SQL starts with each of ``needles``."""
    seen = dict.fromkeys(needles, 0)

    def counted_engine(*args, **kwargs):
        engine = make_engine(*args, **kwargs)

        @event.listens_for(engine, "before_cursor_execute")
        def count(_conn, _cursor, statement, *_args):
            for needle in needles:
                if statement.lstrip().startswith(needle):
                    seen[needle] += 1

        return engine

    monkeypatch.setattr(app_module, "make_engine", counted_engine)
    return seen


def test_each_mail_of_a_batch_goes_to_its_own_order_and_patient(db, fake_lis, config,
                                                               monkeypatch):
    """The batch's mails are one INSERT where the database returns the IDs: each order's
    MAIL_EVENT_ID must still be the mail naming that order and its own patient."""
    names = [f"M-{n:02d}" for n in range(25)]
    for n, name in enumerate(names):
        add_user(db, 100 + n, email=f"patient{n}@example.org", name=f"Name{n}")
        add_order(db, name, 100 + n)
        fake_lis.add_order(name, results=RESULTS)
    counts = _statements(monkeypatch, "INSERT INTO b_event", "SELECT b_user.")

    summary = run_pass(config)

    assert (summary.completed, summary.events) == (25, 25)
    mails = {row.ID: mail_fields(row.C_FIELDS) for row in events(db)}
    assert len(mails) == 25
    for n, name in enumerate(names):
        order = order_row(db, name)
        state = db.rows("SELECT * FROM labsync_orders WHERE ORDER_ID = :id", id=order.ID)[0]
        fields = mails[state.MAIL_EVENT_ID]
        assert (fields["ORDER_ID"], fields["LOCAL_ORDER_ID"]) == (name, str(order.ID))
        assert (fields["EMAIL"], fields["NAME"]) == (f"patient{n}@example.org", f"Name{n}")
        assert state.MAIL_STATE == "queued"
    # two batches (20 + 5): one user lookup each, and on MariaDB one mail INSERT each
    assert counts["SELECT b_user."] == 2
    assert counts["INSERT INTO b_event"] == (2 if db.kind == "mariadb" else 25)


def test_without_returning_the_mails_go_one_insert_each(db, fake_lis, config, monkeypatch):
    """MySQL has no INSERT … RETURNING: each mail is its own INSERT, and still the right one."""
    from labsync.store import bitrix

    monkeypatch.setattr(bitrix, "_one_insert_returns_ids", lambda _dialect: False)
    names = ["N-1", "N-2", "N-3"]
    for n, name in enumerate(names):
        add_user(db, 200 + n, email=f"p{n}@example.org")
        add_order(db, name, 200 + n)
        fake_lis.add_order(name, results=RESULTS)
    counts = _statements(monkeypatch, "INSERT INTO b_event")

    assert run_pass(config).events == 3

    assert counts["INSERT INTO b_event"] == 3
    for n, name in enumerate(names):
        order = order_row(db, name)
        event_id = db.rows("SELECT MAIL_EVENT_ID FROM labsync_orders WHERE ORDER_ID = :id",
                           id=order.ID)[0].MAIL_EVENT_ID
        mail = db.rows("SELECT C_FIELDS FROM b_event WHERE ID = :id", id=event_id)[0]
        assert mail_fields(mail.C_FIELDS)["EMAIL"] == f"p{n}@example.org"


def test_users_who_cannot_get_mail_are_told_apart_within_a_batch(db, fake_lis, config):
    add_user(db, 301, email="ok@example.org")
    add_user(db, 302, active="N", email="off@example.org")
    add_user(db, 303, email=None)
    plan = {"U-1": 301, "U-2": 302, "U-3": 303, "U-4": 304, "U-5": 301}  # 304: no such user
    for name, user_id in plan.items():
        add_order(db, name, user_id)
        fake_lis.add_order(name, results=RESULTS)

    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
        summary = run_pass(config)

    assert (summary.completed, summary.events) == (5, 2)
    states = {name: db.rows("SELECT MAIL_STATE, MAIL_EVENT_ID, NOTIFIED_AT FROM labsync_orders "
                            "WHERE ORDER_ID = :id", id=order_row(db, name).ID)[0]
              for name in plan}
    assert {n: s.MAIL_STATE for n, s in states.items()} == {
        "U-1": "queued", "U-2": "inactive", "U-3": "no_email", "U-4": "no_user",
        "U-5": "queued"}
    assert all(s.NOTIFIED_AT is not None for s in states.values())
    assert [s.MAIL_EVENT_ID is None for s in states.values()] == [False, True, True, True, False]
    skipped = {e["order"]: e["reason"] for e in logged if e["event"] == "mail.skipped"}
    assert skipped == {"U-2": "inactive", "U-3": "no_email", "U-4": "no_user"}
    assert {e["order"]: e["mail_event"] is None for e in logged
            if e["event"] == "order.completed"} == {
        "U-1": False, "U-2": True, "U-3": True, "U-4": True, "U-5": False}


def test_a_batch_writes_its_bookkeeping_in_one_statement(db, fake_lis, config, monkeypatch):
    names = [f"S-{n:02d}" for n in range(20)]
    add_user(db, 7)
    add_orders(db, names)
    for name in names:
        fake_lis.add_order(name, results=RESULTS)
    counts = _statements(monkeypatch, "INSERT INTO labsync_orders", "UPDATE labsync_orders")
    first = run_pass(config)
    assert first.completed == 20
    # the claim wrote the rows first; the completion updates them in one upsert
    assert counts["INSERT INTO labsync_orders"] == 2
    polls = db.rows("SELECT POLLS, FIRST_SEEN_AT, RESULTS_COUNT, LIS_STATUS, PDF_BYTES "
                    "FROM labsync_orders")
    assert len(polls) == 20
    assert all((p.POLLS, p.RESULTS_COUNT, p.LIS_STATUS) == (1, len(RESULTS), "completed")
               for p in polls)
    assert all(p.PDF_BYTES and p.PDF_BYTES > 0 for p in polls)
