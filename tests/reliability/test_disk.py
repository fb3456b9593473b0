"""The PDF folder failing: not writable, read-only, full (a small tmpfs, RLIMIT_FSIZE).

In every case the order whose PDF cannot be stored stays pending with nothing committed (no
result row, no status change, no mail, no file at its final path, no temporary file) and one
clear error naming the cause; the orders that need no PDF, or whose PDF fits, go on; once the
disk is fixed, the next pass completes it. We run as root in a container, so "not writable"
is made real by dropping CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH/CAP_FOWNER from the child
process (as an unprivileged `labsync` user has none of them), and the tmpfs cases need mount
rights; each skips cleanly where that is not possible.

tests/test_pdfs.py already proves ``PdfStore`` on its own (an unwritable folder, ENOSPC from
a patched write); this runs the whole pass against real file systems.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from labsync.testing.fake_qlab import FakeQlab
from labsync.testing.pdfs import sample_pdf
from tests.conftest import API_KEY, add_order, add_user, make_config
from tests.helpers import RESULTS, event_log, order_row
from tests.invariants import check_invariants, temp_files
from tests.processes import write_config
from tests.reliability.conftest import record, run_pass_with

pytestmark = pytest.mark.mariadb

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
_LIBC = ctypes.CDLL(None, use_errno=True)
BIG = sample_pdf("Lab results V-1", size=2 * 1024 * 1024)


def _drop_file_caps() -> None:
    """In the child: lose the capabilities that let root ignore file permissions."""
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if _LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _run(config: Path, *args: str, log: Path, preexec=None, timeout: float = 120) -> int:
    """`labsync --config CONFIG ARGS…` in a child prepared by ``preexec``; its exit status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "labsync.cli", "--config", str(config),
                               *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=preexec, timeout=timeout, check=False)
    return done.returncode


@pytest.fixture(scope="module")
def can_drop_caps(tmp_path_factory) -> bool:
    if os.geteuid() != 0:
        return True  # an ordinary user is bound by file permissions anyway
    folder = tmp_path_factory.mktemp("caps")
    os.chmod(folder, 0o500)
    probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"],
                           preexec_fn=_drop_file_caps, capture_output=True, check=False)
    os.chmod(folder, 0o700)
    if probe.returncode == 0 or b"PermissionError" not in probe.stderr:
        pytest.skip("cannot make a folder unwritable for root here")
    return True


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path/"pdfs"``; unmounted afterwards."""
    point = tmp_path / "pdfs"
    point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0750", "tmpfs",
                           str(point)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


def _seed(site, lis: FakeQlab, *, victim_pdf: bytes = BIG) -> dict[str, bytes]:
    """V-1 (the victim, user 7), O-1..O-4 (user 8, small PDFs), P-1 (still in the lab)."""
    add_user(site, 8, email="other@example.org")
    pdfs = {"V-1": victim_pdf}
    add_order(site, "V-1", 7)
    lis.add_order("V-1", results=RESULTS, pdf=victim_pdf)
    for i in range(1, 5):
        name = f"O-{i}"
        pdfs[name] = sample_pdf(f"Lab results {name}")
        add_order(site, name, 8)
        lis.add_order(name, results=RESULTS, pdf=pdfs[name])
    add_order(site, "P-1", 8)
    lis.add_order("P-1", status="processing")  # no preliminary results yet
    return pdfs


def _assert_victim_untouched(site, pdf_dir: Path, cause: str) -> str:
    row = order_row(site, "V-1")
    assert row.STATUS == "received" and row.SYNCED_AT is None
    assert site.scalar("SELECT COUNT(*) FROM local_lab_results WHERE ORDER_ID = :i",
                       i=row.ID) == 0
    assert not (pdf_dir / "7" / "V-1.pdf").exists()
    assert temp_files(pdf_dir) == []
    state = site.rows("SELECT * FROM labsync_orders WHERE ORDER_ID = :i", i=row.ID)[0]
    assert state.FAILURES == 1 and cause in state.LAST_ERROR, state.LAST_ERROR
    # The disk's problem, not the order's: one admin-log line for the pass, naming it.
    assert not [e for e in event_log(site) if e.ITEM_ID == "V-1"]
    [line] = [e for e in event_log(site) if e.ITEM_ID == "labsync"]
    assert cause in line.DESCRIPTION and "V-1" in line.DESCRIPTION
    assert line.SEVERITY == "ERROR"
    return state.LAST_ERROR


def test_a_pdf_folder_labsync_may_not_write_leaves_completed_orders_pending(
        site, tmp_path, can_drop_caps):
    pdf_dir = tmp_path / "pdfs"
    pdf_dir.mkdir()
    os.chown(pdf_dir, 65534, 0)  # another user's folder; labsync's group may only read it
    os.chmod(pdf_dir, 0o750)
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis)
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=pdf_dir)
        check_log = tmp_path / "check.log"
        assert _run(config, "check", log=check_log, preexec=_drop_file_caps) == 1
        assert f"pdf.dir: {pdf_dir} is not writable by this user" in check_log.read_text()
        assert _run(config, "sync-once", log=tmp_path / "once.log",
                    preexec=_drop_file_caps) == 0
        error = _assert_victim_untouched(site, pdf_dir, "Permission denied")
        assert str(pdf_dir / "7") in error
        # Every completed order needs the folder; the order still in the lab does not.
        assert site.scalar("SELECT COUNT(*) FROM labsync_orders WHERE FAILURES = 1") == 5
        assert order_row(site, "P-1").STATUS == "processing"
        # One line for the problem, naming how many orders it held back; none per order.
        [line] = event_log(site)
        assert "5 completed order(s) held back" in line.DESCRIPTION
        check_invariants(site, pdf_dir, expected_results={**{k: 3 for k in pdfs}, "P-1": 0},
                         expected_pdfs=pdfs)

        os.chown(pdf_dir, 0, 0)  # fixed by the operator
        assert _run(config, "sync-once", "--all", log=tmp_path / "again.log",
                    preexec=_drop_file_caps) == 0
    counts = check_invariants(site, pdf_dir, expected_results={**{k: 3 for k in pdfs},
                                                               "P-1": 0}, expected_pdfs=pdfs)
    assert counts == {"completed": 5, "not_completed": 1}
    record("PDF folder not writable (EACCES)", injected="pdf.dir owned by another user, 0750",
           times=1, outcome=f"5 completed orders pending ({error[:60]}…), one admin-log "
           "line for the pass, check names pdf.dir; all completed once fixed")


def test_a_read_only_pdf_folder_leaves_completed_orders_pending(site, tmpfs):
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis, victim_pdf=sample_pdf("Lab results V-1"))
        config = make_config(site, lis, tmpfs)
        _remount(tmpfs, "ro")

        summary = run_pass_with(config)

        assert (summary.completed, summary.failed, summary.pending) == (0, 5, 1)
        _assert_victim_untouched(site, tmpfs, "Read-only file system")
        check_invariants(site, tmpfs, expected_results={**{k: 3 for k in pdfs}, "P-1": 0},
                         expected_pdfs=pdfs)
        _remount(tmpfs, "rw")
        again = run_pass_with(config)
    assert again.completed == 5
    record("PDF folder on a read-only file system", injected="tmpfs remounted ro", times=1,
           outcome="5 completed orders pending with EROFS, one admin-log line; all completed "
           "once remounted rw")


def test_a_full_disk_leaves_the_order_pending_and_the_small_pdfs_go_on(site, tmpfs):
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis)  # V-1's PDF is 2 MiB, the tmpfs 1 MiB
        # One worker: with several, a small form staged while V-1's part-written file
        # fills the tmpfs fails too (and waits for the next pass, as it should), which
        # would make the counts below depend on timing.
        one_at_a_time = {"max_concurrency": 1}

        summary = run_pass_with(make_config(site, lis, tmpfs, lis=one_at_a_time))

        assert (summary.completed, summary.failed, summary.pending) == (4, 1, 1), summary
        error = _assert_victim_untouched(site, tmpfs, "No space left on device")
        assert shutil.disk_usage(tmpfs).used < 64 * 1024  # the part-written file is gone
        check_invariants(site, tmpfs, expected_results={**{k: 3 for k in pdfs}, "P-1": 0},
                         expected_pdfs=pdfs)
        _remount(tmpfs, "size=8m")
        again = run_pass_with(make_config(site, lis, tmpfs, lis=one_at_a_time))
    assert again.completed == 1
    counts = check_invariants(site, tmpfs, expected_results={**{k: 3 for k in pdfs}, "P-1": 0},
                              expected_pdfs=pdfs)
    assert counts == {"completed": 5, "not_completed": 1}
    record("Disk full (1 MiB tmpfs)", injected="a 2 MiB PDF", times=1,
           outcome=f"that order pending ({error[:50]}…), 4 small ones completed; completed "
           "after the tmpfs grew")


def test_a_file_size_limit_leaves_the_order_pending_and_the_small_pdfs_go_on(site, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis)
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=pdf_dir)
        assert _run(config, "sync-once", log=tmp_path / "once.log",
                    preexec=_limit_file_size(1024 * 1024)) == 0
        error = _assert_victim_untouched(site, pdf_dir, "File too large")
        check_invariants(site, pdf_dir, expected_results={**{k: 3 for k in pdfs}, "P-1": 0},
                         expected_pdfs=pdfs)
        assert _run(config, "sync-once", "--all", log=tmp_path / "again.log") == 0
    counts = check_invariants(site, pdf_dir, expected_results={**{k: 3 for k in pdfs},
                                                               "P-1": 0}, expected_pdfs=pdfs)
    assert counts == {"completed": 5, "not_completed": 1}
    record("File size limit (RLIMIT_FSIZE 1 MiB)", injected="a 2 MiB PDF", times=1,
           outcome=f"that order pending ({error[:50]}…), 4 small ones completed; completed "
           "without the limit")


def test_a_pdf_dir_check_says_labsync_will_create_is_created_by_the_pass(site, tmp_path):
    from labsync.checks import run_checks

    pdf_dir = tmp_path / "var" / "lib" / "labsync" / "lab-results"
    with FakeQlab(api_key=API_KEY) as lis:
        add_order(site, "N-1", 7)
        lis.add_order("N-1", results=RESULTS)
        config = make_config(site, lis, pdf_dir)
        problems, notes = run_checks(config)
        assert not [p for p in problems if p.startswith("pdf.dir")]
        assert any("will create it" in n for n in notes)

        summary = run_pass_with(config)
    assert summary.completed == 1, order_row(site, "N-1")
    assert (pdf_dir / "7" / "N-1.pdf").is_file()
