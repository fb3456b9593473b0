"""SIGKILL at random moments of real `labsync` processes, then clean passes.

A `sync-once --all` or `run` process works through a few hundred orders on MariaDB against
a slow fake LIS and is killed with SIGKILL at a moment drawn from a seeded random sequence:
during start-up, after a random number of completed orders (mid-page, often mid-transaction),
while a PDF is downloading (a temporary file exists), or at a random time. After every kill,
``check_invariants``: each order is either not completed (no result row, no mail, at most a
complete PDF at its final path) or completed with all its rows, its whole PDF and exactly one
mail event. Then ONE ordinary ``sync-once`` finishes the work, with the default
``sync.lease`` of 15 minutes: the dead processes' claims end with them (their named locks)
and their temporary files are swept at its start (their writers are gone), so nothing
waits out a lease or an age, and nothing is left over or duplicated.

``test_daemon_process.py`` covers SIGTERM (a clean stop) and ``test_instances.py`` two
processes at once; this covers the unclean end.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from pathlib import Path

import pytest

from labsync.testing.fake_qlab import FakeQlab, Fault
from labsync.testing.pdfs import sample_pdf
from tests.conftest import API_KEY
from tests.helpers import RESULTS, add_orders, completed_count
from tests.invariants import check_invariants, temp_files
from tests.processes import labsync, write_config
from tests.reliability.conftest import mail_counts, record, scaled

pytestmark = [pytest.mark.mariadb, pytest.mark.slow]

SEED = 20261125
MOMENTS = ("start-up", "after completions", "during a PDF download", "inside a transaction",
           "random time")


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _waiting_on_b_event(db) -> bool:
    return db.scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                     "WHERE INFO LIKE 'INSERT INTO b_event %%' AND TIME_MS > 300") > 0


def _kill_at(moment: str, rng: random.Random, proc, log: Path, pdf_dir: Path,
             old_temps: set[Path], db) -> str:
    """Wait for the drawn moment, then SIGKILL; return what the moment turned out to be."""
    if moment == "inside a transaction":
        # The order's transaction has moved its PDF into place and written its result rows,
        # and waits to queue the mail (see _hold_the_mail_queue): kill it there.
        if not _wait_for(lambda: _waiting_on_b_event(db), 20):
            moment += " (timed out)"
    elif moment == "start-up":
        time.sleep(rng.uniform(0.05, 0.6))
    elif moment == "after completions":
        wanted = rng.randint(1, 12)
        if not _wait_for(lambda: _count(log, '"order.completed"') >= wanted, 20):
            moment += " (timed out)"
        time.sleep(rng.uniform(0, 0.05))
    elif moment == "during a PDF download":
        if not _wait_for(lambda: bool(set(temp_files(pdf_dir)) - old_temps), 20):
            moment += " (timed out)"
    else:
        time.sleep(rng.uniform(0.3, 4.0))
    proc.kill()
    proc.wait(timeout=30)
    return moment


def _claims_of(db, pid: int) -> int:
    """Pending orders claimed by the labsync process ``pid`` (its owner token has the PID)."""
    return db.scalar("SELECT COUNT(*) FROM labsync_orders o JOIN local_lab_orders l "
                     "ON l.ID = o.ORDER_ID WHERE o.LEASE_OWNER LIKE :owner "
                     "AND l.STATUS <> 'completed'", owner=f"%:{pid}:%")


def _hold_the_mail_queue(db):
    """A connection whose next-key locks on ``b_event`` make every INSERT into it wait."""
    conn = db.engine.connect().execution_options(isolation_level="REPEATABLE READ")
    conn.begin()
    conn.exec_driver_sql("SELECT ID FROM b_event WHERE ID >= 0 FOR UPDATE")
    return conn


def _count(log: Path, text: str) -> int:
    try:
        return log.read_text(errors="replace").count(text)
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_moments_never_leaves_a_half_done_order(site, tmp_path):
    kills = scaled(10, 32)
    count = scaled(120, 300)
    rng = random.Random(SEED)
    names = [f"C-{i:04d}" for i in range(count)]
    # Every fifth PDF is large and slow to come, so downloads are often in progress.
    pdfs = {n: sample_pdf(f"Lab results {n}", size=300_000 if i % 5 == 0 else None)
            for i, n in enumerate(names)}
    pdf_dir = tmp_path / "pdfs"
    add_orders(site, names)
    expected = {"expected_results": {n: 3 for n in names}, "expected_pdfs": pdfs}
    log_lines: list[dict] = []
    with FakeQlab(api_key=API_KEY, latency=0.15) as lis:
        for i, name in enumerate(names):
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
            if i % 5 == 0:
                lis.inject(name, "pdf", Fault(delay=0.6), times=None)
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=pdf_dir, lis={"max_concurrency": 3},
                              sync={"page_size": 10, "interval": "1s"})
        # Every kind of moment in every round of five, in a random order.
        seen_early: set[str] = set()  # orders whose PDF was moved into place, not committed
        plan = [m for _ in range(0, kills, len(MOMENTS)) for m in rng.sample(MOMENTS, 5)]
        for k in range(kills):
            args = ("run",) if k % 3 == 2 else ("sync-once", "--all")
            log = tmp_path / f"kill-{k:02d}.log"
            moment = plan[k]
            before = completed_count(site)
            old_temps = set(temp_files(pdf_dir))
            holder = _hold_the_mail_queue(site) if moment == "inside a transaction" else None
            proc = labsync(config, *args, log=log)
            try:
                moment = _kill_at(moment, rng, proc, log, pdf_dir, old_temps, site)
            finally:
                if holder is not None:
                    holder.rollback()
                    holder.close()
            left = set(temp_files(pdf_dir)) - old_temps
            counts = check_invariants(site, pdf_dir, **expected)
            done = {r.EXTERNAL_ORDER_ID for r in site.rows(
                "SELECT EXTERNAL_ORDER_ID FROM local_lab_orders WHERE STATUS = 'completed'")}
            early = {n for n in names if n not in done and (pdf_dir / "7" / f"{n}.pdf").exists()}
            published_early, seen_early = len(early - seen_early), seen_early | early
            log_lines.append({"kill": k, "command": " ".join(args), "moment": moment,
                              "pass_started": _count(log, '"pass.started"') > 0,
                              "completed_by_it": counts["completed"] - before,
                              "temp_files": len(left), "pdf_before_commit": published_early,
                              "completed_total": counts["completed"]})
        assert completed_count(site) < count, "every order was done before the kills ended"
        claimed = site.scalar("SELECT COUNT(*) FROM labsync_orders WHERE LEASE_OWNER IS NOT "
                              "NULL AND LEASE_UNTIL > UTC_TIMESTAMP()")
        leftovers = temp_files(pdf_dir)

        lis.latency = 0.005
        lis.clear_faults()
        started = time.monotonic()
        clean_log = tmp_path / "clean.log"
        proc = labsync(config, "sync-once", log=clean_log)
        assert proc.wait(timeout=300) == 0
        clean_s = time.monotonic() - started

    counts = check_invariants(site, pdf_dir, **expected)
    assert counts == {"completed": count, "not_completed": 0}
    assert temp_files(pdf_dir) == []
    assert site.scalar("SELECT COUNT(*) FROM b_event") == count
    assert set(mail_counts(site).values()) == {1}
    assert site.scalar("SELECT COUNT(*) FROM local_lab_results") == 3 * count
    files = sorted(p.name for p in pdf_dir.rglob("*") if p.is_file())
    assert files == sorted(f"{n}.pdf" for n in names)
    assert site.scalar("SELECT COUNT(*) FROM labsync_orders") == count
    moments = {m: sum(1 for e in log_lines if e["moment"].startswith(m)) for m in MOMENTS}
    record("SIGKILL at random moments", injected=f"SIGKILL of sync-once --all / run, "
           f"{count} orders", times=kills,
           outcome="invariants held after every kill; one ordinary sync-once completed all "
           "and swept every temporary file", lost=0, duplicated=0, moments=moments,
           kills_mid_pass=sum(1 for e in log_lines if e["pass_started"]),
           kills_with_temp_files=sum(1 for e in log_lines if e["temp_files"]),
           kills_with_pdf_before_commit=sum(1 for e in log_lines if e["pdf_before_commit"]),
           claims_of_dead_processes=claimed, temp_files_swept_at_start=len(leftovers),
           owners_taken_over=_count(clean_log, '"claims.owner_gone"'),
           clean_pass_s=round(clean_s, 1),
           completed_during_kills=log_lines[-1]["completed_total"], detail=log_lines)


def test_an_instance_killed_mid_pass_leaves_its_orders_to_the_other_within_30_s(site, tmp_path):
    """Two `labsync run` instances share the work; one is SIGKILLed in the middle of its pass.
    The other, whose next interval is 15 minutes away, takes the dead one's claims over (at
    the end of its own pass, or by its ``takeover`` check between passes) and finishes every
    order within 30 s of the kill."""
    count = scaled(200, 400)
    names = [f"K-{i:04d}" for i in range(count)]
    pdfs = {n: sample_pdf(f"Lab results {n}") for n in names}
    add_orders(site, names)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with FakeQlab(api_key=API_KEY, latency=0.04) as lis:
        for name in names:
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=tmp_path / "pdfs",
                              lis={"max_concurrency": 2}, sync={"page_size": 10})
        a, b = (labsync(config, "run", log=log) for log in logs)
        try:
            # A is mid-pass: it has completed orders and holds claims on more (its owner
            # token names its PID), and B is working too.
            assert _wait_for(lambda: _count(logs[0], '"order.completed"') >= 15, 60)
            assert _wait_for(lambda: _count(logs[1], '"order.completed"') >= 1, 60)
            assert _wait_for(lambda: _claims_of(site, a.pid) > 0, 60), "A holds no claims"
            a.kill()
            a.wait(timeout=30)
            killed_at, killed_wall = time.monotonic(), time.time()
            held = site.scalar(  # claims whose owner's named lock is free: A's
                "SELECT COUNT(*) FROM labsync_orders o JOIN local_lab_orders l "
                "ON l.ID = o.ORDER_ID WHERE o.LEASE_OWNER IS NOT NULL AND "
                "l.STATUS <> 'completed' AND "
                "IS_USED_LOCK(CONCAT('labsync/', SHA1(o.LEASE_OWNER))) IS NULL")
            assert held > 0, "the kill came after the work was done"
            done = _wait_for(lambda: completed_count(site) == count, 30)
            taken_over_s = time.monotonic() - killed_at
            assert done, f"{count - completed_count(site)} orders left 30 s after the kill"
        finally:
            for proc in (a, b):
                if proc.poll() is None:
                    proc.terminate()
            assert b.wait(timeout=60) == 0
    # B took A's orders over: at the end of its own pass (A died during it), or by its
    # takeover check between passes.
    gone = [json.loads(line) for line in logs[1].read_text().splitlines()
            if '"claims.owner_gone"' in line]
    assert gone
    noticed_s = datetime.fromisoformat(gone[0]["timestamp"]).timestamp() - killed_wall
    counts = check_invariants(site, tmp_path / "pdfs",
                              expected_results={n: 3 for n in names}, expected_pdfs=pdfs)
    assert counts == {"completed": count, "not_completed": 0}
    assert set(mail_counts(site).values()) == {1}
    assert temp_files(tmp_path / "pdfs") == []
    record("Instance killed mid-pass, another running", injected=f"SIGKILL of one of two "
           f"`labsync run`, {count} orders", times=1,
           outcome=f"the other completed all {count} orders {taken_over_s:.1f} s after the kill",
           orders_claimed_by_the_dead=held, noticed_s=round(noticed_s, 1),
           all_done_s=round(taken_over_s, 1))
