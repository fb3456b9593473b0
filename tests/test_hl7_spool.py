"""The HL7 inbox on disk: the drop folder, queue/ done/ error/, holding, pruning,
reprocessing, ordering, resends, restarts, and the grouped fsyncs behind "stored, then
acknowledged"."""

from __future__ import annotations

import os
import stat
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from labsync.lis.base import Hold
from labsync.lis.hl7 import Hl7Inbox
from labsync.lis.hl7.commit import GroupCommit, Step
from labsync.lis.hl7.spool import Described, Spool, queue_name
from labsync.model import LisOrder, OrderStatus, TestResult
from labsync.testing.hl7_sender import drop, oru
from tests.test_hl7_conformance import ZONE, hl7_config, make_inbox

# A crash in a listener or reader thread fails the test, not only warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

DATA = Path(__file__).parent / "data" / "hl7v2"
T0 = datetime(2026, 11, 30, 10, 0)


class Clock:
    """A wall clock the test moves: ``hold_unknown`` and ``keep_done`` without waiting."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def message(control: str, external_id: str = "ORD-1", *, at: datetime = T0,
            value: str = "5.4", app: str = "") -> bytes:
    order = LisOrder(external_id, OrderStatus.COMPLETED, (TestResult("GLU", "Glucose", value),))
    return oru(control, [order], sent_at=at, sending_app=app)


def drain(inbox: Any) -> list[Any]:
    taken = []
    while (delivery := inbox.take()) is not None:
        taken.append(delivery)
    return taken


def drain_releasing(inbox: Any, reason: str) -> list[Any]:
    """A drain as the engine does it when the site has none of the orders: each delivery
    released as it is taken."""
    taken = []
    while (delivery := inbox.take()) is not None:
        taken.append(delivery)
        inbox.release(delivery, reason)
    return taken


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "hl7"
    folder.mkdir()
    return folder


# -- the drop folder ---------------------------------------------------------------------------


def test_only_complete_hl7_and_txt_files_are_read(root: Path) -> None:
    data = message("M1")
    for name in (".hidden.hl7", "writing.hl7.tmp", "notes.csv", "old.hl7.reason"):
        (root / name).write_bytes(data)
    drop(root, "a.hl7", message("A"))
    drop(root, "b.TXT", message("B"))
    inbox = make_inbox(root)

    assert [d.id for d in drain(inbox)] == ["A", "B"]
    assert files(root) == [".hidden.hl7", "done", "error", "notes.csv", "old.hl7.reason",
                           "queue", "writing.hl7.tmp"]


def test_a_file_modified_a_moment_ago_waits_for_the_next_drain(root: Path) -> None:
    inbox = make_inbox(root, settle=60.0)
    drop(root, "fresh.hl7", message("F1"))

    assert drain(inbox) == []
    os.utime(root / "fresh.hl7", (time.time() - 120, time.time() - 120))
    assert [d.id for d in drain(inbox)] == ["F1"]


def test_a_file_with_several_messages_is_one_delivery_each_and_is_then_removed(root: Path
                                                                               ) -> None:
    drop(root, "batch.hl7", message("B2", "ORD-2", at=T0 + timedelta(minutes=1))
         + message("B1", "ORD-1") + b"\n")
    inbox = make_inbox(root)

    taken = drain(inbox)

    assert [(d.id, d.orders[0].external_id) for d in taken] == [("B1", "ORD-1"),
                                                                 ("B2", "ORD-2")]
    assert not (root / "batch.hl7").exists() and len(files(root / "queue")) == 2


def test_the_real_messages_dropped_as_files_come_out_in_msh_7_order(root: Path) -> None:
    for path in sorted(DATA.glob("*.hl7")):
        drop(root, path.name, path.read_bytes())
    inbox = make_inbox(root)

    taken = drain(inbox)

    sent = [d.orders[0].changed_at for d in taken if d.orders]
    assert sent == sorted(sent) and len(taken) == 8
    # order_id = placer: the NIST public-health cases have none, and say so
    assert sorted(d.problem is not None for d in taken) == [False] * 5 + [True] * 3


# -- done, failed, and the reasons -------------------------------------------------------------


def test_done_goes_to_done_and_failed_to_error_with_its_reason_beside_it(root: Path) -> None:
    drop(root, "ok.hl7", message("OK"))
    drop(root, "bad.hl7", message("BAD", at=T0 + timedelta(minutes=1)))
    inbox = make_inbox(root)
    first, second = drain(inbox)

    inbox.done(first)
    inbox.failed(second, "order ORD-1: the site refused it")

    assert files(root / "queue") == []
    (done,) = files(root / "done")
    assert done.startswith("OK-")
    error = files(root / "error")
    assert len(error) == 2 and error[1] == error[0] + ".reason"
    assert (root / "error" / error[1]).read_text().strip() == "order ORD-1: the site refused it"
    assert drain(make_inbox(root)) == []  # after a restart: nothing comes back


def test_an_unreadable_file_is_handed_out_with_its_problem_and_fails_with_a_reason(
        root: Path) -> None:
    drop(root, "adt.hl7", b"MSH|^~\\&|HIS||||20240514||ADT^A01|A1|P|2.5\rPID|1\r")
    drop(root, "junk.txt", b"this is not HL7 at all")
    drop(root, "charset.hl7", b"MSH|^~\\&|L||||20240514||ORU^R01|C1|P|2.5||||||EBCDIC\r")
    inbox = make_inbox(root)

    taken = drain(inbox)
    for delivery in taken:
        inbox.failed(delivery, delivery.problem)

    assert all(d.orders == () and d.problem for d in taken)
    problems = sorted(d.problem or "" for d in taken)
    assert "not an ORU^R01" in problems[2] and "EBCDIC" in problems[0]
    assert "does not start with an MSH" in problems[1]
    names = files(root / "error")
    assert len(names) == 6 and all(f"{n}.reason" in names for n in names
                                   if not n.endswith(".reason"))


def test_a_file_too_big_to_be_messages_goes_to_error_without_being_read(root: Path) -> None:
    inbox = make_inbox(root, max_frame_bytes=1000)
    drop(root, "huge.hl7", message("H1") + b"OBX|2|ST|X||" + b"x" * 5000 + b"\r")

    assert drain(inbox) == []
    assert files(root / "error") == ["huge.hl7", "huge.hl7.reason"]
    assert "more than 4 × the message size cap" in (root / "error" / "huge.hl7.reason"
                                                    ).read_text()


def test_a_file_moved_back_from_error_is_processed_again(root: Path) -> None:
    drop(root, "lab.hl7", b"MSH|^~\\&|L||||20240514||ORU^R01|R1|P|2.5\rOBX|1|ST|X||5\r")
    inbox = make_inbox(root)
    (broken,) = drain(inbox)
    inbox.failed(broken, broken.problem or "")
    (name,) = [n for n in files(root / "error") if not n.endswith(".reason")]
    assert "before any OBR" in (root / "error" / f"{name}.reason").read_text()

    # the operator fixes the file and moves it back, as Mirth users "reprocess"
    fixed = message("R1")
    (root / "error" / name).write_bytes(fixed)
    os.replace(root / "error" / name, root / name)
    os.utime(root / name, (time.time() - 5, time.time() - 5))
    (again,) = drain(inbox)

    assert again.id == "R1" and again.problem is None and again.orders[0].results
    assert files(root / "error") == []  # the old reason went with it


# -- order, resends, restarts ------------------------------------------------------------------


def test_deliveries_come_in_msh_7_order_then_by_control_id_not_in_arrival_order(root: Path
                                                                                 ) -> None:
    inbox = make_inbox(root)
    drop(root, "c.hl7", message("10", at=T0 + timedelta(hours=1)))
    drop(root, "b.hl7", message("9", at=T0 + timedelta(hours=1)))
    drop(root, "a.hl7", message("Z", at=T0))

    assert [d.id for d in drain(inbox)] == ["Z", "9", "10"]  # numbers as numbers


def test_a_resent_message_is_stored_once_while_waiting_and_after_it_is_done(root: Path) -> None:
    inbox = make_inbox(root)
    drop(root, "first.hl7", message("DUP"))
    drop(root, "again.hl7", message("DUP", value="9.9"))  # same id: the same delivery

    (delivery,) = drain(inbox)
    inbox.done(delivery)
    drop(root, "third.hl7", message("DUP"))

    assert drain(inbox) == []
    assert delivery.orders[0].results[0].value in ("5.4", "9.9")
    assert files(root / "queue") == [] and len(files(root / "done")) == 1


def test_the_same_control_id_from_another_sending_application_is_not_a_resend(root: Path
                                                                              ) -> None:
    drop(root, "a.hl7", message("42", app="LAB-A"))
    drop(root, "b.hl7", message("42", app="LAB-B"))

    assert sorted(d.id for d in drain(make_inbox(root))) == ["LAB-A||42", "LAB-B||42"]


def test_after_a_restart_the_queue_is_waiting_again_and_crash_leftovers_are_gone(root: Path
                                                                                  ) -> None:
    inbox = make_inbox(root)
    drop(root, "a.hl7", message("A1"))
    drop(root, "b.hl7", message("B1", at=T0 + timedelta(minutes=1)))
    first = inbox.take()
    assert first is not None and first.id == "A1"  # ...and the process dies here
    (root / "queue" / ".12-34-5.tmp").write_bytes(b"half a message, never acknowledged")

    restarted = make_inbox(root)

    assert [d.id for d in drain(restarted)] == ["A1", "B1"]
    assert not (root / "queue" / ".12-34-5.tmp").exists()


# -- holding, pruning --------------------------------------------------------------------------


def test_a_message_for_an_unknown_order_is_held_then_failed_after_hold_unknown(root: Path
                                                                               ) -> None:
    clock = Clock()
    inbox = make_inbox(root, now=clock)
    drop(root, "early.hl7", message("E1", "NOT-YET"))
    os.utime(root / "early.hl7", (clock.t - 5, clock.t - 5))

    for _drain in range(3):  # tried again on every drain
        assert len(drain_releasing(inbox, "order NOT-YET is not on the site (yet)")) == 1
        assert inbox.counts()["held"] == 1 and inbox.counts()["waiting"] == 0
    clock.advance(7 * 86400 + 60)
    assert len(drain_releasing(inbox, "order NOT-YET is not on the site (yet)")) == 1

    assert drain(inbox) == []
    assert inbox.counts() == {"waiting": 0, "held": 0, "failed": 1, "done": 0}
    (reason,) = [n for n in files(root / "error") if n.endswith(".reason")]
    text = (root / "error" / reason).read_text()
    assert "not on the site" in text and "lis.hl7.hold_unknown (7d)" in text


def test_a_release_because_the_database_is_down_never_gives_a_message_up(root: Path) -> None:
    clock = Clock()
    inbox = make_inbox(root, now=clock)
    drop(root, "a.hl7", message("D1"))
    clock.advance(30 * 86400)

    delivery = inbox.take()
    assert delivery is not None
    inbox.release(delivery, "the database is unavailable", Hold.UNAVAILABLE)
    assert inbox.counts()["held"] == 1

    # the drain was given up: it is waiting again at once, and never given up itself
    assert [d.id for d in drain(inbox)] == ["D1"] and files(root / "error") == []


def test_a_released_message_waits_for_the_next_drain_not_this_one(root: Path) -> None:
    inbox = make_inbox(root)
    drop(root, "a.hl7", message("R1"))
    drop(root, "b.hl7", message("R2", at=T0 + timedelta(minutes=1)))

    first = inbox.take()
    assert first is not None
    inbox.release(first, "order ORD-1 is not on the site (yet)")
    second = inbox.take()
    assert second is not None and second.id == "R2"
    inbox.release(second, "order ORD-1 is not on the site (yet)")

    assert inbox.take() is None  # this drain is over
    assert [d.id for d in drain(inbox)] == ["R1", "R2"]


def test_done_messages_are_pruned_after_keep_done(root: Path) -> None:
    clock = Clock()
    ticks = iter(range(0, 10**9, 4000))  # every take() is an hour past the last prune
    inbox = make_inbox(root, now=clock, clock=lambda: float(next(ticks)))
    drop(root, "a.hl7", message("P1"))
    os.utime(root / "a.hl7", (clock.t - 5, clock.t - 5))
    for delivery in drain(inbox):
        inbox.done(delivery)
    assert len(files(root / "done")) == 1

    clock.advance(29 * 86400)
    drain(inbox)
    assert len(files(root / "done")) == 1
    clock.advance(2 * 86400)
    drain(inbox)
    assert files(root / "done") == []


# -- status and order reports ------------------------------------------------------------------


def test_counts_and_the_messages_of_an_order(root: Path) -> None:
    inbox = make_inbox(root)
    drop(root, "a.hl7", message("C1", "ORD-7"))
    drop(root, "b.hl7", message("C2", "ORD-7", at=T0 + timedelta(hours=1)))
    drop(root, "c.hl7", message("C3", "ORD-8"))
    drop(root, "d.hl7", message("C4", "ORD-7", at=T0 + timedelta(hours=2)))
    first, third, second, fourth = inbox.take(), inbox.take(), inbox.take(), inbox.take()
    inbox.done(first)
    inbox.failed(second, "refused for a reason")
    inbox.release(fourth, "order ORD-7 is not on the site (yet)")
    assert third is not None and third.orders[0].external_id == "ORD-8"

    assert inbox.counts() == {"waiting": 1, "held": 1, "failed": 1, "done": 1}
    rows = inbox.messages_for("ORD-7")
    assert [(r["control_id"], r["state"], r["reason"]) for r in rows] == [
        ("C1", "done", None), ("C2", "failed", "refused for a reason"),
        ("C4", "held", "order ORD-7 is not on the site (yet)")]
    assert inbox.messages_for("NOBODY") == []


# -- check -------------------------------------------------------------------------------------


def test_probe_passes_on_a_private_folder_and_refuses_one_anyone_can_write(root: Path) -> None:
    inbox = make_inbox(root)
    inbox.probe()
    lines = inbox.check_lines()
    assert any("owner" in text and "mode 0" in text for _level, text in lines)

    root.chmod(0o777)
    try:
        with pytest.raises(Exception, match="writable by every user"):
            inbox.probe()
    finally:
        root.chmod(0o700)


def test_probe_says_a_folder_that_cannot_be_created(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: every folder is writable")
        inbox = make_inbox(locked / "hl7")
        with pytest.raises(Exception, match="cannot create it"):
            inbox.probe()
    finally:
        locked.chmod(0o700)


def test_probe_says_when_the_port_cannot_be_bound(root: Path) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        inbox = Hl7Inbox(hl7_config(root, listen=f"127.0.0.1:{port}"), zone=ZONE)
        with pytest.raises(Exception, match=f"cannot listen on 127.0.0.1:{port}"):
            inbox.probe()
    finally:
        busy.close()


# -- the durable steps and their grouping ------------------------------------------------------


def _recording_fsync(log: list[str], delay: float = 0.0) -> Any:
    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        log.append(kind)
        if delay:
            time.sleep(delay)
        os.fsync(fd)
    return fsync


def test_a_stored_message_is_renamed_in_then_fsynced_with_its_folder(tmp_path: Path) -> None:
    events: list[str] = []
    spool = Spool(tmp_path / "s", commit=GroupCommit(fsync=_recording_fsync(events)))
    spool.make_dirs()
    final = spool.queue / queue_name("K1", b"MSH|x")
    original = spool.commit._fsync_path

    def watching(path: Path) -> None:
        events.append(f"visible={final.exists()}")
        original(path)

    spool.commit._fsync_path = watching  # type: ignore[method-assign]
    assert spool.store("K1", b"MSH|x", Described("K1", (0,))) is True

    # one fsync of the file covers its data and its new name; the folder's comes after
    assert events == ["visible=True", "file", "visible=True", "dir"]
    assert final.read_bytes() == b"MSH|x"


def test_a_file_a_crash_left_half_written_under_its_name_is_removed_not_taken(root: Path
                                                                              ) -> None:
    inbox = make_inbox(root)
    drop(root, "a.hl7", message("CUT"))
    drop(root, "b.hl7", message("WHOLE", at=T0 + timedelta(minutes=1)))
    assert len(drain(inbox)) == 2  # ...and then the machine loses power: say "CUT" was
    (cut,) = [p for p in (root / "queue").iterdir() if p.name.startswith("CUT-")]
    cut.write_bytes(cut.read_bytes()[:60])  # renamed in, but its data never reached the disk

    restarted = make_inbox(root)

    assert [d.id for d in drain(restarted)] == ["WHOLE"]
    assert not cut.exists() and restarted.spool.unfinished == 1
    drop(root, "resent.hl7", message("CUT"))  # the sender never got AA, so it resends
    assert [d.id for d in drain(restarted)] == ["CUT"]


def test_concurrent_writers_share_fsyncs(tmp_path: Path) -> None:
    events: list[str] = []
    commit = GroupCommit(fsync=_recording_fsync(events, delay=0.02))
    spool = Spool(tmp_path / "s", commit=commit)
    spool.make_dirs()
    barrier = threading.Barrier(16)

    def writer(n: int) -> None:
        barrier.wait()
        spool.store(f"K{n}", b"MSH|%d" % n, Described(f"K{n}", (n,)))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(files(spool.queue)) == 16
    assert commit.steps == 16 and commit.groups < 16  # some fsyncs were shared
    assert events.count("dir") == commit.groups  # one folder fsync per group


def test_a_resend_during_the_first_copys_fsync_waits_for_it_and_is_not_stored(tmp_path: Path
                                                                              ) -> None:
    spool = Spool(tmp_path / "s", commit=GroupCommit(fsync=_recording_fsync([], delay=0.2)))
    spool.make_dirs()
    outcomes: dict[str, Any] = {}
    final = spool.queue / queue_name("SAME", b"MSH|1")

    def store(name: str) -> None:
        outcomes[name] = spool.store("SAME", b"MSH|1", Described("SAME", (0,)))
        outcomes[f"{name}-durable"] = final.exists()

    first = threading.Thread(target=store, args=("first",))
    first.start()
    time.sleep(0.05)
    store("second")
    first.join()

    assert (outcomes["first"], outcomes["second"]) == (True, False)
    assert outcomes["second-durable"] is True  # its AA would come after the first's fsync


def test_a_failing_fsync_fails_only_its_own_step(tmp_path: Path) -> None:
    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("bad.tmp"):
            raise OSError(5, "Input/output error")

    commit = GroupCommit(fsync=fsync)
    good, bad = tmp_path / "good.tmp", tmp_path / "bad.tmp"
    good.write_bytes(b"1")
    bad.write_bytes(b"2")
    steps = [Step(good, tmp_path / "good", fsync_file=good, fsync_first=True),
             Step(bad, tmp_path / "bad", fsync_file=bad, fsync_first=True)]

    with pytest.raises(OSError, match="Input/output"):
        commit.run(*steps)
    assert (tmp_path / "good").exists() and not (tmp_path / "bad").exists()
    assert steps[0].error is None and steps[1].error is not None


def test_a_backlog_is_read_again_from_disk_rather_than_kept_in_memory(root: Path,
                                                                       monkeypatch: Any
                                                                       ) -> None:
    import labsync.lis.hl7.spool as spool_module

    monkeypatch.setattr(spool_module, "CACHED_DELIVERIES", 2)
    inbox = make_inbox(root)
    for n in range(5):
        drop(root, f"{n}.hl7", message(f"Q{n}", f"ORD-{n}", at=T0 + timedelta(minutes=n)))
    first = inbox.take()  # the drain starts: all five are read in, the first handed out
    kept = [e.described.delivery is not None for e in inbox.spool._waiting.values()]

    rest = drain(inbox)

    assert kept.count(True) == 2
    assert first is not None and first.orders[0].external_id == "ORD-0"
    assert [d.orders[0].external_id for d in rest] == [f"ORD-{n}" for n in range(1, 5)]
    assert all(d.orders[0].results[0].value == "5.4" for d in rest)


def test_held_messages_are_counted_as_held_by_another_process_and_after_a_restart(
        root: Path) -> None:
    inbox = make_inbox(root)
    drop(root, "a.hl7", message("H1", "LATER"))
    drain_releasing(inbox, "order LATER is not on the site (yet)")

    status = make_inbox(root)  # `labsync status`, a process of its own

    assert status.counts() == {"waiting": 0, "held": 1, "failed": 0, "done": 0}
    assert status.messages_for("LATER")[0]["reason"] == "order LATER is not on the site (yet)"
    (delivery,) = drain(inbox)
    inbox.done(delivery)
    assert make_inbox(root).counts()["held"] == 0
    assert [p.name for p in (root / "queue").iterdir()] == []
