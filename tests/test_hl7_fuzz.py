"""Bad input never hangs labsync: fuzzed messages (random bytes, and the real messages
broken at random) through the reader, the inbox job and the MLLP listener, each with a
time limit. Whatever comes in is a delivery with orders, one with a problem, or an error
ACK; nothing else escapes, and every file in error/ has its reason."""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labsync.lis.hl7.ack import read_ack
from labsync.lis.hl7.parse import split_messages
from labsync.lis.hl7.reader import Reader
from labsync.testing.hl7_sender import MllpSender, drop, frame
from tests.test_hl7_conformance import ZONE, make_inbox
from tests.test_hl7_mllp import listening
from tests.test_hl7_spool import files, message

# A crash in a listener or reader thread fails the test, not only warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

DATA = Path(__file__).parent / "data" / "hl7v2"
REAL = [split_messages(p.read_bytes())[0] for p in sorted(DATA.glob("*.hl7"))]
LIMIT = 2.0  # seconds a single message may take, at most, on a loaded 2-core machine
SPECIAL = b"|^~\\&\r\n\x0b\x1cMSHOBXOBR0123456789.-+XE F S T R H N .br ED Base64 JVBER\xd0\xff\x00"
READER = Reader(encoding="utf-8", order_id="placer", zone=ZONE)


@st.composite
def broken_messages(draw: st.DrawFn) -> bytes:
    """A real message with a few random edits: bytes replaced, inserted or cut out."""
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        edit = draw(st.sampled_from(["replace", "insert", "cut"]))
        piece = bytes(draw(st.lists(st.sampled_from(list(SPECIAL)), min_size=1, max_size=6)))
        if edit == "replace":
            data[at:at + len(piece)] = piece
        elif edit == "insert":
            data[at:at] = piece
        else:
            del data[at:at + draw(st.integers(1, 40))]
    return bytes(data)


inputs = st.one_of(st.binary(max_size=600), broken_messages(),
                   st.builds(lambda m: m * 3, broken_messages()))
fuzz = settings(max_examples=150, deadline=timedelta(seconds=LIMIT),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@fuzz
@given(data=inputs)
def test_the_reader_gives_orders_or_a_problem_for_any_input_and_never_raises(data: bytes
                                                                            ) -> None:
    for one in split_messages(data):
        read = READER.read(one, name="fuzz.hl7", received_at=time.time())

        assert read.delivery.id and len(read.delivery.id) <= 200
        assert (read.problem is None) == (read.delivery.problem is None)
        if read.problem is not None:
            assert read.delivery.orders == () and str(read.problem)


@pytest.fixture
def drop_root(tmp_path: Path) -> Path:
    return tmp_path


@settings(max_examples=40, deadline=timedelta(seconds=LIMIT * 3),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(inputs, min_size=1, max_size=3))
def test_the_inbox_job_takes_fuzzed_files_and_every_refused_one_has_a_reason(
        drop_root: Path, batch: list[bytes]) -> None:
    # A folder per example: a file one failing example leaves must not fail the next ones,
    # or hypothesis shrinks to an input that is not the one that failed.
    drop_dir = Path(tempfile.mkdtemp(dir=drop_root)) / "hl7"
    drop_dir.mkdir()
    for n, data in enumerate(batch):
        drop(drop_dir, f"fuzz-{time.monotonic_ns()}-{n}.hl7", data)
    inbox = make_inbox(drop_dir)

    while (delivery := inbox.take()) is not None:
        if delivery.problem:
            inbox.failed(delivery, delivery.problem)
        else:
            inbox.done(delivery)

    assert [p for p in drop_dir.iterdir() if p.is_file()] == []
    errors = files(drop_dir / "error")
    assert all(f"{name}.reason" in errors for name in errors if not name.endswith(".reason"))


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("fuzz-mllp") / "hl7"
    with listening(root, max_frame_bytes=64 * 1024, idle_timeout=5.0) as inbox:
        where = inbox.address
        assert where is not None
        yield where


@settings(max_examples=60, deadline=timedelta(seconds=LIMIT * 3),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.one_of(inputs, st.builds(frame, inputs)), min_size=1, max_size=4))
def test_the_listener_answers_a_good_frame_after_any_junk_or_closes_never_hangs(
        listener: tuple[str, int], junk: list[bytes]) -> None:
    with MllpSender(*listener, timeout=LIMIT * 2) as sender:
        for piece in junk:
            sender.send_raw(piece)
        # a frame never closed swallows what follows, until the next start block: the
        # sender's own next start block ends it, as a real sender's resend would
        control = f"GOOD-{time.monotonic_ns()}"
        try:
            sender.send_raw(frame(message(control)))
            while True:
                code, msa2, _ = read_ack(sender.read_ack())
                if msa2 == control:
                    assert code == "AA"
                    break
        except (TimeoutError, ConnectionError) as exc:
            # closed on purpose (junk over the cap between frames): fine, but never silent
            assert not isinstance(exc, socket.timeout), "the listener hung"


def test_the_listener_still_serves_after_the_fuzzing(listener: tuple[str, int]) -> None:
    with MllpSender(*listener) as sender:
        assert read_ack(sender.send(message("STILL-HERE")))[:2] == ("AA", "STILL-HERE")
