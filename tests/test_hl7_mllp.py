"""The MLLP listener, with real senders: python-hl7's ``mllp_send`` tool and its
``MLLPClient``, labsync's own test sender, and raw sockets for the framing's edge cases."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hl7.client
import pytest

from labsync.errors import PermanentLisError
from labsync.lis.hl7 import Hl7Inbox
from labsync.lis.hl7.ack import read_ack
from labsync.lis.hl7.commit import GroupCommit
from labsync.lis.hl7.parse import split_messages
from labsync.testing.hl7_sender import MllpSender, frame
from tests.test_hl7_conformance import ZONE, hl7_config
from tests.test_hl7_spool import files, message

# A crash in a listener or reader thread fails the test, not only warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

DATA = Path(__file__).parent / "data" / "hl7v2"
MLLP_SEND = Path(sys.executable).with_name("mllp_send")


@contextmanager
def listening(root: Path, *, fsync: Any = None, **kwargs: Any) -> Iterator[Hl7Inbox]:
    options = {"listen": "127.0.0.1:0", **kwargs.pop("options", {})}
    inbox = Hl7Inbox(hl7_config(root, **options), zone=ZONE, settle=0.0, **kwargs)
    if fsync is not None:
        inbox.spool.commit = GroupCommit(fsync=fsync)
    inbox.start()
    try:
        yield inbox
    finally:
        inbox.close()


def address(inbox: Hl7Inbox) -> tuple[str, int]:
    where = inbox.address
    assert where is not None
    return where


def queued(root: Path) -> list[str]:
    return files(root / "queue")


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "hl7"


# -- real senders -----------------------------------------------------------------------------


def test_the_mllp_send_tool_delivers_a_real_message_and_gets_aa_after_it_is_stored(
        root: Path) -> None:
    (msg,) = split_messages((DATA / "realm-cj-joeslab.hl7").read_bytes())
    framed = root.parent / "framed.mllp"
    # Without --loose, mllp_send wants its input already framed (python-hl7 issue #24), and
    # from a file: reading stdin it fails in Python 3 (it adds text to bytes).
    framed.write_bytes(frame(msg))
    with listening(root) as inbox:
        host, port = address(inbox)
        run = subprocess.run([str(MLLP_SEND), "-f", str(framed), "-p", str(port), host],
                             capture_output=True, timeout=30, check=True)

        assert read_ack(run.stdout) == ("AA", "1234567890", "")
        assert len(queued(root)) == 1


def test_mllp_send_loose_on_a_file_with_a_bom_sends_the_bom_alone_which_gets_ar(root: Path
                                                                               ) -> None:
    # --loose splits the file at "MSH|^~\&|" and sends what was before it, the BOM, as a
    # message of its own: labsync answers it AR and takes the real one.
    with listening(root) as inbox:
        host, port = address(inbox)
        run = subprocess.run([str(MLLP_SEND), "--loose", "-f", str(DATA / "LAB-ORU-1.hl7"),
                              "-p", str(port), host], capture_output=True, timeout=30,
                             check=True)
        acks = [read_ack(a) for a in run.stdout.split(b"\x1c")[:-1]]

        assert [a[0] for a in acks] == ["AR", "AA"] and acks[1][1] == "182"
        assert len(queued(root)) == 1 and len(files(root / "error")) == 2


def test_python_hl7s_client_is_answered_by_the_messages_own_control_id(root: Path) -> None:
    (msg,) = split_messages((DATA / "ORU-R01-RMGEAD.hl7").read_bytes())
    with listening(root) as inbox, hl7.client.MLLPClient(*address(inbox)) as client:
        ack = client.send_message(msg)

    assert read_ack(ack) == ("AA", "CNTRL-3456", "")
    (queued_file,) = queued(root)
    assert (root / "queue" / queued_file).read_bytes() == msg


def test_every_real_message_is_answered_and_the_readable_ones_are_stored(root: Path) -> None:
    messages = [split_messages(p.read_bytes())[0] for p in sorted(DATA.glob("*.hl7"))]
    with listening(root) as inbox, MllpSender(*address(inbox)) as sender:
        acks = [read_ack(sender.send(m)) for m in messages]

    # order_id = placer: the three NIST public-health cases name no placer order
    assert [a[0] for a in acks] == ["AA"] * 4 + ["AE"] * 3 + ["AA"]
    assert all("OBR-2 (placer order number) is empty" in a[2] for a in acks if a[0] == "AE")
    assert len(queued(root)) == 5


# -- framing -----------------------------------------------------------------------------------


def test_several_messages_in_one_write_get_one_ack_each_in_order(root: Path) -> None:
    with listening(root) as inbox, MllpSender(*address(inbox)) as sender:
        sender.send_raw(b"".join(frame(message(f"W{i}")) for i in range(5)))
        acks = [read_ack(sender.read_ack())[1] for _ in range(5)]

    assert acks == [f"W{i}" for i in range(5)]
    assert len(queued(root)) == 5


def test_a_frame_sent_one_byte_at_a_time_is_one_message(root: Path) -> None:
    data = frame(message("SLOW"))
    with listening(root) as inbox, MllpSender(*address(inbox)) as sender:
        sender.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sender.send_raw(data[i:i + 1])
        assert read_ack(sender.read_ack())[:2] == ("AA", "SLOW")


def test_bytes_between_frames_are_ignored_and_a_new_start_block_starts_over(root: Path
                                                                           ) -> None:
    with listening(root) as inbox, MllpSender(*address(inbox)) as sender:
        sender.send_raw(b"\r\n  \x0bMSH|^~\\&|half a message, then the sender gave up"
                        + frame(message("AFTER")) + b"\r\n")
        assert read_ack(sender.read_ack())[:2] == ("AA", "AFTER")
        assert read_ack(sender.send(message("NEXT")))[:2] == ("AA", "NEXT")

    assert len(queued(root)) == 2 and files(root / "error") == []


def test_several_senders_at_once_each_get_every_ack(root: Path) -> None:
    acks: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    with listening(root) as inbox:
        def sender(n: int) -> None:
            with MllpSender(*address(inbox)) as conn:
                for i in range(15):
                    ack = read_ack(conn.send(message(f"S{n}-{i}")))
                    with lock:
                        acks.append(ack)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    assert sorted(a[1] for a in acks) == sorted(f"S{n}-{i}" for n in range(8) for i in range(15))
    assert {a[0] for a in acks} == {"AA"} and len(queued(root)) == 120


# -- acknowledgement after storage -------------------------------------------------------------


def test_the_ack_comes_only_once_the_message_is_fsynced_in_place(root: Path) -> None:
    moments: list[float] = []

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        os.fsync(fd)
        moments.append(time.monotonic())

    with listening(root, fsync=slow_fsync) as inbox, MllpSender(*address(inbox)) as sender:
        ack = sender.send(message("DURABLE"))
        acked = time.monotonic()
        stored = queued(root)

    assert read_ack(ack)[0] == "AA" and len(stored) == 1
    assert len(moments) == 2 and acked >= max(moments)  # the file, then its folder


def test_a_message_that_cannot_be_stored_gets_no_ack_and_its_resend_is_taken(root: Path
                                                                            ) -> None:
    broken = threading.Event()
    broken.set()

    def failing_fsync(fd: int) -> None:
        if broken.is_set():
            raise OSError(28, "No space left on device")
        os.fsync(fd)

    with listening(root, fsync=failing_fsync) as inbox:
        with MllpSender(*address(inbox)) as sender, pytest.raises(ConnectionError):
            sender.send(message("RETRY"))
        assert queued(root) == [] and files(root / "queue") == []

        broken.clear()  # the disk has room again; the sender resends
        with MllpSender(*address(inbox)) as sender:
            assert read_ack(sender.send(message("RETRY")))[:2] == ("AA", "RETRY")

    assert len(queued(root)) == 1


def test_a_resend_is_acknowledged_and_stored_once(root: Path) -> None:
    with listening(root) as inbox, MllpSender(*address(inbox)) as sender:
        first = read_ack(sender.send(message("TWICE")))
        second = read_ack(sender.send(message("TWICE", value="other")))

    assert first[:2] == second[:2] == ("AA", "TWICE")
    assert len(queued(root)) == 1


@pytest.mark.parametrize(("data", "ack", "control", "words"), [
    (b"this is not HL7", "AE", "", "does not start with an MSH"),
    (b"MSH|^~\\&|L||||20240514||ORU^R01||P|2.5\rOBR|1|X\r", "AE", "", "MSH-10"),
    (b"MSH|^~\\&|L||||20240514||ADT^A01|A9|P|2.5\rPID|1\r", "AR", "A9", "not an ORU^R01"),
    (b"MSH|^~\\&|L||||20240514||ORU^R01|C9|P|2.5||||||EBCDIC\r", "AE", "C9", "EBCDIC"),
    (b"MSH|^~\\&|L||||20240514||ORU^R01|X9|P|2.5\rOBR|1|\r", "AE", "X9", "OBR-2"),
])
def test_a_message_labsync_refuses_is_answered_with_its_reason_and_kept_in_error(
        root: Path, data: bytes, ack: str, control: str, words: str) -> None:
    with listening(root) as inbox, MllpSender(*address(inbox)) as sender:
        answer = sender.send(data)
        code, msa2, msa3 = read_ack(answer)
        follow_up = read_ack(sender.send(message("AFTER-ERROR")))  # the connection goes on

    assert (code, msa2) == (ack, control) and words in msa3.replace("\\S\\", "^")
    assert b"\rERR|" in answer and b"HL70357" in answer
    assert follow_up[:2] == ("AA", "AFTER-ERROR")
    error = files(root / "error")
    assert len(error) == 2 and error[1] == error[0] + ".reason"
    assert (root / "error" / error[0]).read_bytes() == split_messages(data)[0]
    assert words in (root / "error" / error[1]).read_text()


def test_a_frame_bigger_than_the_cap_is_refused_with_ae_and_the_connection_closed(
        root: Path) -> None:
    big = message("BIG") + b"OBX|2|ST|X^Y||" + b"x" * 20000 + b"\r"
    with listening(root, max_frame_bytes=4096) as inbox, MllpSender(*address(inbox)) as sender:
        answer = sender.send(big)

        assert read_ack(answer)[:2] == ("AE", "BIG")  # its MSH-10, read from its first bytes
        assert "larger than 4096 bytes" in read_ack(answer)[2]
        assert closed_by_server(sender.sock)
    assert queued(root) == []


def test_the_cap_follows_pdf_max_bytes() -> None:
    from labsync.lis.hl7.adapter import frame_cap

    assert frame_cap(50 * 1024 * 1024) == 50 * 1024 * 1024 * 4 // 3 + 1024 * 1024


def test_a_quiet_connection_is_closed_after_the_idle_timeout(root: Path) -> None:
    with listening(root, idle_timeout=0.3) as inbox, MllpSender(*address(inbox)) as sender:
        assert read_ack(sender.send(message("BEFORE")))[0] == "AA"
        started = time.monotonic()
        assert closed_by_server(sender.sock)
        assert 0.2 < time.monotonic() - started < 3


def test_a_peer_not_in_allow_is_closed_without_an_answer(root: Path) -> None:
    with listening(root, options={"allow": ("10.0.0.0/8",)}) as inbox:
        with socket.create_connection(address(inbox), timeout=5) as sock:
            assert closed_by_server(sock)
    assert queued(root) == []


def test_a_peer_in_an_allowed_network_is_served(root: Path) -> None:
    with listening(root, options={"allow": ("192.168.0.0/16", "127.0.0.0/8")}) as inbox, \
            MllpSender(*address(inbox)) as sender:
        assert read_ack(sender.send(message("CIDR")))[0] == "AA"


def test_a_port_that_cannot_be_bound_is_a_clear_error(root: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        inbox = Hl7Inbox(hl7_config(root, listen=f"127.0.0.1:{port}"), zone=ZONE)
        with pytest.raises(PermanentLisError, match=f"lis.hl7.listen: cannot listen on "
                                                    f"127.0.0.1:{port}"):
            inbox.start()
    finally:
        busy.close()


def test_ipv6_loopback(root: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    with listening(root, options={"listen": "[::1]:0"}) as inbox:
        host, port = address(inbox)
        with MllpSender(host, port) as sender:
            assert read_ack(sender.send(message("V6")))[0] == "AA"


# -- stopping ----------------------------------------------------------------------------------


def test_close_waits_for_the_message_in_hand_to_be_stored_and_acknowledged(root: Path) -> None:
    started = threading.Event()

    def slow_fsync(fd: int) -> None:
        started.set()
        time.sleep(0.5)
        os.fsync(fd)

    result: dict[str, Any] = {}
    inbox = Hl7Inbox(hl7_config(root, listen="127.0.0.1:0"), zone=ZONE, settle=0.0)
    inbox.spool.commit = GroupCommit(fsync=slow_fsync)
    inbox.start()
    where = address(inbox)
    idle = socket.create_connection(where, timeout=5)
    half = socket.create_connection(address(inbox), timeout=5)
    half.sendall(frame(message("HALF"))[:40])

    def send() -> None:
        with MllpSender(*address(inbox)) as sender:
            result["ack"] = read_ack(sender.send(message("IN-HAND")))

    thread = threading.Thread(target=send)
    thread.start()
    assert started.wait(5)
    inbox.close()  # SIGTERM in labsync run
    thread.join(5)

    assert result["ack"][:2] == ("AA", "IN-HAND")
    assert [n.split("-")[0] for n in queued(root)] == ["IN"]  # the half frame: never acked
    assert closed_by_server(idle) and closed_by_server(half)
    with pytest.raises(OSError):
        socket.create_connection(where, timeout=1)  # it no longer accepts


def test_a_new_message_wakes_whoever_waits_for_arrivals(root: Path) -> None:
    with listening(root) as inbox:
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(inbox.wait_for_arrival(10)))
        waiter.start()
        time.sleep(0.1)
        with MllpSender(*address(inbox)) as sender:
            sender.send(message("WAKE"))
        waiter.join(10)

        assert woke == [True]
        assert inbox.wait_for_arrival(0.05) is False


def test_a_bug_while_handling_a_frame_ends_that_connection_not_the_listener(root: Path,
                                                                           monkeypatch: Any
                                                                           ) -> None:
    with listening(root) as inbox:
        real_message = inbox.message
        calls = []

        def broken_once(frame_bytes: bytes, peer: str) -> bytes | None:
            calls.append(peer)
            if len(calls) == 1:
                raise KeyError("a bug")
            return real_message(frame_bytes, peer)

        monkeypatch.setattr(inbox, "message", broken_once)
        with MllpSender(*address(inbox)) as sender, pytest.raises(ConnectionError):
            sender.send(message("BUG"))
        with MllpSender(*address(inbox)) as sender:
            assert read_ack(sender.send(message("BUG")))[:2] == ("AA", "BUG")
