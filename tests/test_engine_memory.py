"""The engine on the reference adapter (``labsync.testing.memory_lis``): what only a source
that says when it changed an order can show. On SQLite and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from labsync.app import open_app
from labsync.model import OrderStatus, TestResult
from labsync.store.tables import labsync_versions
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


def _pass(config, lab):
    with open_app(config, lis=MemoryLis(lab, sleep=lambda _s: None)) as app:
        return app.sync.run_pass(due_only=False)


def test_an_older_answer_arriving_late_leaves_the_newer_result_in_place(db, fake_lis, tmp_path):
    add_user(db, 7)
    add_order(db, "V-1", 7)
    lab = MemoryLab()
    lab.add_order("V-1", status=OrderStatus.COMPLETED, changed_at=T2, version="2",
                  results=[TestResult("GLU", "Glucose", "5.60")], pdf=sample_pdf("V-1"))
    config = make_config(db, fake_lis, tmp_path / "pdfs", sync={"recheck_days": 7})

    first = _pass(config, lab)
    assert first.completed == 1 and _values(db, "V-1") == {"GLU": "5.60"}

    # The LIS's answer goes back to an older version (a late message, a lagging replica).
    lab.update_order("V-1", changed_at=T1, version="1",
                     results=[TestResult("GLU", "Glucose", "5.40")])
    older = _pass(config, lab)

    assert older.corrected == 0 and older.skipped == 1
    assert _values(db, "V-1") == {"GLU": "5.60"}  # the newer result stays
    assert len(events(db)) == 1

    lab.update_order("V-1", changed_at=T3, version="3",
                     results=[TestResult("GLU", "Glucose", "5.80")])
    newer = _pass(config, lab)

    assert newer.corrected == 1 and _values(db, "V-1") == {"GLU": "5.80"}
    assert order_row(db, "V-1").STATUS == "completed"
    assert len(events(db)) == 2  # the ready mail, then one "updated" mail
    with db.engine.connect() as conn:  # typed columns: SQLite keeps DATETIME as text
        seen = conn.execute(select(labsync_versions.c.CHANGED_AT,
                                   labsync_versions.c.VERSION)).all()
    assert [tuple(s) for s in seen] == [(T3.replace(tzinfo=None), "3")]
