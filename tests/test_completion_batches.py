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
from tests.helpers import RESULTS, add_orders, events, order_row, results, run_pass


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
    real = BitrixNotifier.order_ready

    def fails_for_b3(self, conn, *, external_id, **kwargs):
        if external_id == "B-3":
            raise RuntimeError("simulated bug for one order")
        return real(self, conn, external_id=external_id, **kwargs)

    monkeypatch.setattr(BitrixNotifier, "order_ready", fails_for_b3)
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
