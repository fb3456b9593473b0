"""PdfStore on its own: names, modes, atomic placement, clean-up."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import time

import pytest

from labsync.errors import BadLisData, PdfError, PdfNotReady
from labsync.pdfs import PdfStore, is_safe_name
from labsync.testing.pdfs import sample_pdf


class _Lis:
    """Just enough of an LIS client for PdfStore: writes ``body`` or raises ``error``."""

    def __init__(self, body: bytes = b"", error: Exception | None = None) -> None:
        self.body, self.error = body, error

    def fetch_pdf(self, external_id: str, sink: io.BufferedIOBase, *, max_bytes: int) -> int:
        sink.write(self.body[: len(self.body) // 2])
        if self.error:
            raise self.error
        sink.write(self.body[len(self.body) // 2:])
        return len(self.body)


@pytest.mark.parametrize("name, safe", [
    ("QL-1001", True), ("a.b_c-1", True), ("CON", True), ("x" * 100, True),
    ("x" * 101, False), ("", False), (".hidden", False), ("..", False), ("../../x", False),
    ("a/b", False), ("a\\b", False), ("a b", False), ("é", False), ("a\x00", False),
    ("-rf", True),
])
def test_safe_names(name, safe):
    assert is_safe_name(name) is safe


def test_stage_then_publish_places_a_0640_file_in_a_0750_folder_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        store = PdfStore(tmp_path / "pdfs", max_bytes=10_000)
        staged = store.stage(7, "A-1", _Lis(sample_pdf()))
        assert not staged.final_path.exists() and staged.temp_path.exists()
        assert staged.temp_path.name.startswith(".")
        path = store.publish(staged)
    finally:
        os.umask(old)
    assert path == tmp_path / "pdfs" / "7" / "A-1.pdf"
    assert path.read_bytes() == sample_pdf()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert not staged.temp_path.exists()


def test_a_failed_download_leaves_no_file_at_all(tmp_path):
    store = PdfStore(tmp_path, max_bytes=10_000)
    with pytest.raises(PdfNotReady):
        store.stage(7, "A-1", _Lis(sample_pdf(), error=PdfNotReady("not ready")))
    assert list((tmp_path / "7").iterdir()) == []


def test_not_a_pdf_is_refused_even_if_the_adapter_let_it_through(tmp_path):
    store = PdfStore(tmp_path, max_bytes=10_000)
    with pytest.raises(BadLisData):
        store.stage(7, "A-1", _Lis(b"<html>oops</html>"))
    assert list((tmp_path / "7").iterdir()) == []


def test_unwritable_folder_is_a_clear_pdf_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; covered by the disk-full test instead")
    root = tmp_path / "ro"
    root.mkdir(mode=0o500)
    with pytest.raises(PdfError, match="cannot"):
        PdfStore(root, 10_000).stage(7, "A-1", _Lis(sample_pdf()))


def test_disk_full_is_a_clear_pdf_error_and_leaves_nothing(tmp_path):
    class _Full:
        def fetch_pdf(self, external_id, sink, *, max_bytes):
            raise OSError(28, "No space left on device")

    store = PdfStore(tmp_path, max_bytes=10_000)
    with pytest.raises(PdfError, match="No space left on device"):
        store.stage(7, "A-1", _Full())
    assert list((tmp_path / "7").iterdir()) == []


def test_sweep_removes_only_old_temporary_files(tmp_path):
    store = PdfStore(tmp_path, max_bytes=10_000)
    folder = tmp_path / "7"
    folder.mkdir()
    old, fresh, real = folder / ".A-1.x.part", folder / ".A-2.y.part", folder / "A-3.pdf"
    for path in (old, fresh, real):
        path.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(real, (past, past))
    assert store.sweep(older_than=3600) == 1
    assert not old.exists() and fresh.exists() and real.exists()


class _OddLis:
    """An adapter that writes its sink in ways the write-time count cannot follow."""

    def __init__(self, how: str, body: bytes) -> None:
        self.how, self.body = how, body

    def fetch_pdf(self, external_id: str, sink: io.BufferedIOBase, *, max_bytes: int) -> int:
        body = self.body
        if self.how == "retry_without_truncate":  # a longer first try, rewound, not cut
            sink.write(body + b"%%trailing junk from the first try")
            sink.seek(0)
            sink.write(body)
        elif self.how == "patched_header":  # written, then its start overwritten in place
            sink.write(b"XXXXX" + body[5:])
            sink.seek(0)
            sink.seek(0, os.SEEK_END)
            sink.seek(0)
            sink.write(b"<htm>")
        elif self.how == "writelines":
            sink.writelines([body[:10], body[10:]])
        elif self.how == "rewind_first":  # what HttpTransport.stream_to does on every try
            sink.seek(0)
            sink.truncate()
            sink.write(body)
        elif self.how == "retry_with_truncate":  # what HttpTransport.stream_to does
            sink.write(b"%PDF-1.4 cut off")
            sink.seek(0)
            sink.truncate()
            sink.write(body)
        return len(body)


@pytest.mark.parametrize("how", ["retry_without_truncate", "writelines", "retry_with_truncate",
                                 "rewind_first"])
def test_size_and_digest_are_those_of_the_file_on_disk_however_the_adapter_wrote(tmp_path, how):
    store = PdfStore(tmp_path, max_bytes=100_000)
    staged = store.stage(7, "A-1", _OddLis(how, sample_pdf()))
    on_disk = staged.temp_path.read_bytes()
    assert staged.size == len(on_disk)
    assert staged.sha256 == hashlib.sha256(on_disk).hexdigest()
    if how != "retry_without_truncate":
        assert on_disk == sample_pdf()


class _StingyFile(io.FileIO):
    """A file whose writes take at most 1,000 bytes at a time, as an unbuffered write may."""

    def write(self, data):
        return super().write(bytes(data[:1000]))


def test_short_writes_are_continued_until_the_whole_body_is_on_disk(tmp_path, monkeypatch):
    body = sample_pdf(size=50_000)
    monkeypatch.setattr(os, "fdopen", lambda fd, *_args, **_kwargs: _StingyFile(fd, "rb+"))
    staged = PdfStore(tmp_path, max_bytes=100_000).stage(7, "A-1", _Lis(body))
    assert staged.temp_path.read_bytes() == body
    assert (staged.size, staged.sha256) == (len(body), hashlib.sha256(body).hexdigest())


def test_a_header_overwritten_after_the_count_is_still_refused(tmp_path):
    store = PdfStore(tmp_path, max_bytes=100_000)
    with pytest.raises(BadLisData, match="not a PDF"):
        store.stage(7, "A-1", _OddLis("patched_header", sample_pdf()))
    assert list((tmp_path / "7").iterdir()) == []


def test_a_pdf_folder_removed_during_a_pass_is_made_again(tmp_path):
    store = PdfStore(tmp_path / "pdfs", max_bytes=10_000)
    store.publish(store.stage(7, "A-1", _Lis(sample_pdf())))
    shutil.rmtree(tmp_path / "pdfs")

    path = store.publish(store.stage(7, "A-2", _Lis(sample_pdf())))

    assert path.read_bytes() == sample_pdf()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def _tag_of_child(*, keep_running: bool):
    """A child process's tag, and the child (still running, or already ended)."""
    import subprocess
    import sys

    code = ("import sys, time; from labsync import process_tag; "
            "print(process_tag.this_process(), flush=True); "
            + ("time.sleep(60)" if keep_running else "sys.exit(0)"))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    tag = child.stdout.readline().strip()
    if not keep_running:
        child.wait(timeout=30)
    return tag, child


def test_sweep_removes_a_dead_writers_file_at_once_and_keeps_a_live_writers(tmp_path):
    from labsync import process_tag

    store = PdfStore(tmp_path, max_bytes=10_000)
    folder = tmp_path / "7"
    folder.mkdir()
    dead_tag, _ = _tag_of_child(keep_running=False)
    live_tag, live = _tag_of_child(keep_running=True)
    try:
        other_host = "0123456789abcdef-4242-4242"  # a writer this host cannot judge
        assert process_tag.is_dead(dead_tag) is True
        assert process_tag.is_dead(live_tag) is False
        assert process_tag.is_dead(other_host) is None
        dead = folder / f".A-1.v2.{dead_tag}.abc123xy.part"  # ids may hold dots
        alive = folder / f".A-2.{live_tag}.abc123xy.part"
        mine = folder / f".A-3.{process_tag.this_process()}.abc123xy.part"
        foreign = folder / f".A-4.{other_host}.abc123xy.part"
        for path in (dead, alive, mine, foreign):
            path.write_bytes(b"%PDF-")  # all fresh: none would go by age
        assert store.sweep(older_than=3600) == 1
        assert not dead.exists() and alive.exists() and mine.exists() and foreign.exists()
        past = time.time() - 7200
        os.utime(foreign, (past, past))
        os.utime(alive, (past, past))  # a live writer's file stays however old
        assert store.sweep(older_than=3600) == 1
        assert not foreign.exists() and alive.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
    assert store.sweep(older_than=3600) == 1  # its writer is gone now
    assert not alive.exists() and mine.exists()  # this process still runs


def test_a_staged_file_names_its_writer_and_outlives_a_sweep_while_in_hand(tmp_path):
    from labsync import process_tag

    store = PdfStore(tmp_path, max_bytes=10_000)
    staged = store.stage(7, "A-1", _Lis(sample_pdf("A-1")))
    assert process_tag.this_process() in staged.temp_path.name
    assert store.sweep(older_than=0) == 0
    assert staged.temp_path.exists()
    store.publish(staged)
    assert staged.final_path.read_bytes().startswith(b"%PDF-")


# -- the checks, and every kind of handle -----------------------------------------------------


class _UrlLis:
    """An adapter that resolves one URL handle (and remembers what it was asked)."""

    def __init__(self, body: bytes) -> None:
        self.body, self.asked = body, []

    def fetch_pdf(self, external_id, sink, *, max_bytes, ref=None):
        self.asked.append((external_id, ref))
        sink.write(self.body)
        return len(self.body)


def test_a_pdf_cut_short_of_its_eof_marker_is_refused_and_leaves_nothing(tmp_path):
    pdf = sample_pdf(size=20_000)
    store = PdfStore(tmp_path, max_bytes=100_000)
    with pytest.raises(BadLisData, match="PDF cut short \\(no %%EOF at its end\\)"):
        store.stage(7, "A-1", _Lis(pdf[: len(pdf) // 2]))
    assert list((tmp_path / "7").iterdir()) == []


def test_an_eof_marker_followed_by_padding_is_accepted(tmp_path):
    body = sample_pdf() + b"\r\n" + b"\x00" * 500
    staged = PdfStore(tmp_path, max_bytes=100_000).stage(7, "A-1", _Lis(body))
    assert staged.temp_path.read_bytes() == body


def test_an_eof_marker_far_from_the_end_does_not_count(tmp_path):
    body = sample_pdf() + b" " * 2000  # %%EOF more than 1 KiB before the end: cut or junk
    with pytest.raises(BadLisData, match="cut short"):
        PdfStore(tmp_path, max_bytes=100_000).stage(7, "A-1", _Lis(body))


def test_the_trailer_is_checked_on_disk_when_the_adapter_rewrote_the_file(tmp_path):
    class _Rewinding:  # a long first try, rewound but not truncated, then a short one
        def fetch_pdf(self, external_id, sink, *, max_bytes):
            sink.write(b"%PDF-1.4 first try " + b"x" * 5000)
            sink.seek(0)
            sink.write(sample_pdf()[:2000])
            return 2000

    with pytest.raises(BadLisData, match="cut short"):
        PdfStore(tmp_path, max_bytes=100_000).stage(7, "A-1", _Rewinding())


@pytest.mark.parametrize("body, message", [
    (b"", "not a PDF \\(empty body\\)"),
    (b"<html>oops</html>", "not a PDF \\(starts with '<htm'\\)"),
    (b"%PDF-1.4 no end", "PDF cut short"),
])
def test_check_pdf_names_what_is_wrong(body, message):
    from labsync.pdfs import check_pdf

    with pytest.raises(BadLisData, match=f"^PDF of order A-1: {message}"):
        check_pdf(body[:5], body[-1024:], len(body), max_bytes=10_000, what="PDF of order A-1")


def test_an_inline_pdf_goes_through_the_same_checks_without_an_adapter(tmp_path):
    from labsync.model import PdfRef

    store = PdfStore(tmp_path / "pdfs", max_bytes=400_000)
    pdf = sample_pdf("inline", size=300_000)  # several chunks
    staged = store.stage(7, "A-1", None, PdfRef.inline(pdf))
    path = store.publish(staged)
    assert path.read_bytes() == pdf
    assert (staged.size, staged.sha256) == (len(pdf), hashlib.sha256(pdf).hexdigest())
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    for bad, message in ((b"<html>", "not a PDF"), (pdf[:1000], "cut short"),
                         (sample_pdf(size=500_000), "over 400000 bytes")):
        with pytest.raises(BadLisData, match=message):
            store.stage(7, "A-2", None, PdfRef.inline(bad))
    assert sorted(p.name for p in (tmp_path / "pdfs" / "7").iterdir()) == ["A-1.pdf"]


def test_a_url_handle_is_resolved_by_the_adapter_and_checked_here(tmp_path):
    from labsync.model import PdfRef

    ref = PdfRef.at("https://lis.example/fhir/Binary/17")
    good, bad = _UrlLis(sample_pdf()), _UrlLis(b"{\"resourceType\": \"Binary\"}")
    store = PdfStore(tmp_path, max_bytes=100_000)

    assert store.publish(store.stage(7, "A-1", good, ref)).read_bytes() == sample_pdf()
    assert good.asked == [("A-1", ref)]
    with pytest.raises(BadLisData, match="not a PDF"):
        store.stage(7, "A-2", bad, ref)
    assert sorted(p.name for p in (tmp_path / "7").iterdir()) == ["A-1.pdf"]


def test_a_by_order_handle_is_the_old_call(tmp_path):
    from labsync.model import PdfRef

    lis = _UrlLis(sample_pdf())
    store = PdfStore(tmp_path, max_bytes=100_000)
    store.stage(7, "A-1", lis, PdfRef.by_order())
    store.stage(7, "A-2", lis)
    assert lis.asked == [("A-1", None), ("A-2", None)]  # no ref: adapters of before handles


def test_a_handle_to_fetch_without_an_adapter_is_refused_before_any_file(tmp_path):
    from labsync.errors import PermanentLisError
    from labsync.model import PdfRef

    with pytest.raises(PermanentLisError, match="needs an adapter"):
        PdfStore(tmp_path, max_bytes=100_000).stage(7, "A-1", None, PdfRef.at("x://y"))
    assert not (tmp_path / "7").exists()
