"""Secrets, TLS, file modes, the PDF folder's exposure, and whose results go where.

- The API key and the database password never appear in any output: every command is run
  with errors forced (the LIS echoing the key in error pages and data, a wrong key, a wrong
  password, an unreachable database, a config that cannot be used) and every byte it printed,
  every exception text and every text column labsync writes is searched.
- TLS is verified by default: a self-signed HTTPS LIS is refused (the order fails with an
  error naming lis.ca_file) unless lis.ca_file names its CA; a certificate for another host
  is refused even then.
- PDFs are 0640 and folders 0750 whatever the umask of the process.
- `check` warns when pdf.dir lies inside site.document_root, symlinks included, or is
  accessible to others.
- Results are written only for the USER_ID of the order's own row, even when the row
  changes hands during the pass.

Already covered and not repeated: the redaction processor (tests/test_logging.py), the
adapter's TLS and key handling (tests/test_qlab_adapter.py, tests/test_qlab_conformance.py),
PdfStore modes (tests/test_pdfs.py) and the plain web-root and 0755 checks (tests/test_cli.py).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from labsync.app import open_app
from labsync.checks import run_checks
from labsync.config import load
from labsync.errors import LabsyncError
from labsync.lis.qlab import QlabClient
from labsync.testing.fake_qlab import FakeQlab, Fault
from labsync.testing.pdfs import sample_pdf
from tests.conftest import add_order, add_user, make_config
from tests.helpers import RESULTS, event_log, events, order_row, results
from tests.invariants import check_invariants
from tests.processes import wait_until, write_config
from tests.reliability.conftest import DB_PASSWORD, free_port, record, run_pass_with

pytestmark = pytest.mark.mariadb

KEY = "qlab-S3cret-key-9d41f0c7a2"
WRONG_KEY = "qlab-Wr0ng-key-77e3b1a9c5"


def _labsync(config: Path, *args: str, umask: int | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LABSYNC_CONFIG", "NOTIFY_SOCKET")}
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "labsync.cli", "--config", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=timeout,
                          preexec_fn=preexec, check=False)


def _forms(secret: str) -> list[str]:
    """The secret as it could leak: whole, URL-encoded, and its first and last 10 characters."""
    return sorted({secret, quote(secret, safe=""), secret[:10], secret[-10:]})


def _assert_clean(where: str, output: str) -> None:
    for secret in (KEY, WRONG_KEY, DB_PASSWORD):
        for form in _forms(secret):
            assert form not in output, f"{where}: {form!r} of a secret in {output[-2000:]!r}"


# -- secrets -----------------------------------------------------------------------------


def test_no_secret_reaches_any_output_whatever_goes_wrong(site, db_account, tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "qlab_api_key").write_text(KEY + "\n")
    (creds / "db_password").write_text(DB_PASSWORD + "\n")
    url = make_url(db_account)
    url_without_password = URL.create(url.drivername, username=url.username, host=url.host,
                                      port=url.port, database=url.database).render_as_string()
    pdf_dir = tmp_path / "pdfs"
    outputs: dict[str, str] = {}
    echo = ECHO
    with _EchoingLis(api_key=KEY) as lis:
        for name in ("S-OK", "S-500", "S-400", "S-DATA", "S-HTML", "S-404", "S-PDF", "S-HDR"):
            add_order(site, name, 7)
            if name != "S-404":
                lis.add_order(name, results=RESULTS)
        lis.inject("S-500", "results", Fault(status=500, body=b"upstream said: key " + echo),
                   times=None)
        lis.inject("S-400", "results", Fault(status=400, body=b'{"error": "bad key ' + echo
                                             + b'"}'), times=None)
        lis.inject("S-DATA", "results", Fault(body=b'{"status": "' + echo + b'"}'), times=None)
        lis.inject("S-HTML", "results", Fault(status=200, body=b"<p>" + echo + b"</p>",
                                              content_type="text/html"), times=None)
        lis.inject("S-PDF", "pdf", Fault(body=b"not a pdf " + echo), times=None)
        lis.inject("S-HDR", "results", Fault(status=503, headers={"X-Api-Key": "@KEY@",
                                                                  "Retry-After": "@KEY@"}),
                   times=None)
        common = {"lis": {"retry_attempts": 2, "retry_max_seconds": 2}, "log": {"level": "debug"}}
        files = write_config(tmp_path / "files.toml", db_url=url_without_password,
                             lis_url=lis.base_url, api_key="", pdf_dir=pdf_dir,
                             database={"password_file": str(creds / "db_password")},
                             **{**common, "lis": {**common["lis"], "api_key_file":
                                                  str(creds / "qlab_api_key")}})
        _drop_empty_key(files)
        inline = write_config(tmp_path / "inline.toml", db_url=db_account, lis_url=lis.base_url,
                              api_key=KEY, pdf_dir=pdf_dir, **common)
        wrong_key = write_config(tmp_path / "wrong-key.toml", db_url=db_account,
                                 lis_url=lis.base_url, api_key=WRONG_KEY, pdf_dir=pdf_dir,
                                 **common)
        wrong_pw = write_config(tmp_path / "wrong-pw.toml",
                                db_url=url.set(password=WRONG_KEY).render_as_string(False),
                                lis_url=lis.base_url, api_key=KEY, pdf_dir=pdf_dir, **common)
        down = write_config(tmp_path / "down.toml", db_url=url.set(port=free_port())
                            .render_as_string(False), lis_url=lis.base_url, api_key=KEY,
                            pdf_dir=pdf_dir, **common)
        unusable = write_config(tmp_path / "unusable.toml", db_url=db_account.replace(
            ":3306/", ":notaport/"), lis_url="ftp://" + KEY + "@example.org/v2",
            api_key=KEY, pdf_dir="relative/pdfs", **common)
        runs = [(files, "sync-once"), (inline, "sync-once", "--all"), (files, "status"),
                (files, "status", "--json"), (files, "order", "S-500"),
                (files, "order", "S-HDR", "--json"), (files, "order", "NO-SUCH"),
                (files, "check"), (wrong_key, "check"), (wrong_key, "sync-once", "--all"),
                (wrong_pw, "check"), (wrong_pw, "sync-once"), (wrong_pw, "status"),
                (down, "check"), (down, "sync-once"), (down, "order", "S-OK"),
                (unusable, "check"), (unusable, "sync-once")]
        codes = {}
        for config, *args in runs:
            done = _labsync(config, *args)
            label = f"{config.stem}: {' '.join(args)}"
            codes[label] = done.returncode
            outputs[label] = done.stdout + done.stderr
        outputs["daemon"] = _daemon_output(files, tmp_path)
        outputs["exceptions"] = _exception_texts([inline, wrong_pw, down, wrong_key])
    outputs["database"] = _text_columns(site)

    assert '"pass.finished"' in outputs["daemon"], outputs["daemon"][-2000:]
    assert codes["files: sync-once"] == 0 and codes["wrong-pw: sync-once"] == 2
    assert codes["down: sync-once"] == 2 and codes["unusable: check"] == 2
    assert codes["wrong-key: check"] == 1 and codes["down: check"] == 1
    assert "Traceback" not in "".join(outputs.values())
    # The LIS really did echo the key: what labsync quotes of its answers shows the mask.
    assert "***" in outputs["files: sync-once"] and "***" in outputs["database"]
    assert order_row(site, "S-OK").STATUS == "completed"
    for where, output in outputs.items():
        _assert_clean(where, output)
    size = sum(len(o) for o in outputs.values())
    record("Secrets in every output", injected="LIS echoing the key (500, 400, bad data, "
           "HTML, PDF, headers), wrong key, wrong DB password, DB down, unusable config",
           times=len(outputs), outcome=f"{len(outputs)} outputs, {size} characters searched; "
           "no key or password, whole, URL-encoded or in part", lost=0, duplicated=0)


ECHO = b"@KEY@"


class _EchoingLis(FakeQlab):
    """A fake LIS whose faults quote back the API key each request was sent with."""

    def handle(self, request, stopping):
        answer = super().handle(request, stopping)
        if answer is None or answer[1] is None:
            return answer
        response, fault = answer
        sent = request.headers.get("X-Api-Key", "")
        body = fault.body.replace(ECHO, sent.encode()) if fault.body else fault.body
        headers = {k: v.replace("@KEY@", sent) for k, v in fault.headers.items()}
        return response, dataclasses.replace(fault, body=body, headers=headers)


def _drop_empty_key(config: Path) -> None:
    """write_config always writes ``api_key``; a file-based config has only api_key_file."""
    lines = [ln for ln in config.read_text().splitlines() if ln != 'api_key = ""']
    config.write_text("\n".join(lines) + "\n")


def _daemon_output(config: Path, tmp_path: Path) -> str:
    log = tmp_path / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k not in ("LABSYNC_CONFIG", "NOTIFY_SOCKET")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "labsync.cli", "--config", str(config),
                                 "run"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: '"pass.finished"' in log.read_text() or proc.poll() is not None,
                   60, "a daemon pass")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return log.read_text()


def _exception_texts(configs: list[Path]) -> str:
    """What labsync's own exceptions say, raised in this process: str, repr and args."""
    texts = []
    for path in configs:
        config = load(path)
        texts.append(repr(config))
        try:
            with open_app(config, lis=QlabClient(config.lis, sleep=lambda _s: None)) as app:
                for name in ("S-500", "S-400", "S-DATA", "S-HTML", "S-HDR"):
                    try:
                        app.lis.fetch_order(name)
                    except LabsyncError as exc:
                        texts += [str(exc), repr(exc), repr(exc.args)]
        except LabsyncError as exc:
            texts += [str(exc), repr(exc), repr(exc.args), repr(exc.__cause__)]
    return "\n".join(texts)


def _text_columns(site) -> str:
    """Everything labsync wrote as text: admin log, bookkeeping, passes, mail events."""
    parts = []
    for table in ("b_event_log", "labsync_orders", "labsync_passes", "b_event"):
        for row in site.rows(f"SELECT * FROM {table}"):
            parts.append(" ".join(str(v) for v in row))
    return "\n".join(parts)


# -- TLS ---------------------------------------------------------------------------------


def _certificate(folder: Path, name: str, san: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName={san}"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    return {"ours": _certificate(folder, "lis", "IP:127.0.0.1"),
            "other_host": _certificate(folder, "elsewhere", "DNS:lis.example.org")}


def _https_lis(cert: Path, key: Path) -> FakeQlab:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return FakeQlab(api_key=KEY, ssl_context=context)


def test_a_self_signed_lis_is_refused_unless_lis_ca_file_names_its_ca(site, tmp_path,
                                                                      certificates):
    cert, key = certificates["ours"]
    pdf_dir = tmp_path / "pdfs"
    with _https_lis(cert, key) as lis:
        assert lis.base_url.startswith("https://")
        add_order(site, "T-1", 7)
        pdf = sample_pdf("Lab results T-1")
        lis.add_order("T-1", results=RESULTS, pdf=pdf)
        plain = make_config(site, lis, pdf_dir, lis={"api_key": KEY})

        refused = run_pass_with(plain)

        assert (refused.completed, refused.failed) == (0, 1)
        assert lis.request_count() == 0  # refused in the handshake; nothing sent, key included
        state = site.rows("SELECT * FROM labsync_orders")[0]
        assert state.LAST_ERROR_KIND == "permanent" and "lis.ca_file" in state.LAST_ERROR
        assert "lis.ca_file" in event_log(site)[0].DESCRIPTION
        assert results(site, "T-1") == [] and events(site) == []
        problems, _notes = run_checks(plain)
        assert any(p.startswith("lis.base_url") and "lis.ca_file" in p for p in problems)

        trusted = make_config(site, lis, pdf_dir, lis={"api_key": KEY, "ca_file": str(cert)})
        accepted = run_pass_with(trusted)
    assert accepted.completed == 1
    check_invariants(site, pdf_dir, expected_results={"T-1": 3}, expected_pdfs={"T-1": pdf})
    record("TLS: self-signed LIS", injected="HTTPS fake LIS with a self-signed certificate",
           times=2, outcome="refused without lis.ca_file (error names lis.ca_file, no request "
           "sent); completed with it")


def test_a_certificate_for_another_host_is_refused_even_with_its_ca(site, tmp_path,
                                                                    certificates):
    cert, key = certificates["other_host"]
    with _https_lis(cert, key) as lis:
        add_order(site, "T-2", 7)
        lis.add_order("T-2", results=RESULTS)
        config = make_config(site, lis, tmp_path / "pdfs",
                             lis={"api_key": KEY, "ca_file": str(cert)})
        summary = run_pass_with(config)
        assert lis.request_count() == 0
    assert (summary.completed, summary.failed) == (0, 1)
    assert "not trusted" in site.scalar("SELECT LAST_ERROR FROM labsync_orders")


# -- modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o077, 0o777], ids=lambda m: f"umask{m:03o}")
def test_pdfs_are_0640_and_folders_0750_whatever_the_umask(site, tmp_path, umask):
    pdf_dir = tmp_path / "pdfs"
    if umask == 0o002:  # and what an earlier, careless setup left behind is put right
        (pdf_dir / "7").mkdir(parents=True)
        os.chmod(pdf_dir, 0o777)
        os.chmod(pdf_dir / "7", 0o777)
        (pdf_dir / "7" / "M-1.pdf").write_bytes(b"%PDF-old")
        os.chmod(pdf_dir / "7" / "M-1.pdf", 0o666)
    add_user(site, 8, email="b@example.org")
    with FakeQlab(api_key=KEY) as lis:
        for name, user in (("M-1", 7), ("M-2", 7), ("M-3", 8)):
            add_order(site, name, user)
            lis.add_order(name, results=RESULTS)
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=KEY, pdf_dir=pdf_dir)
        done = _labsync(config, "sync-once", umask=umask)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert site.scalar("SELECT COUNT(*) FROM local_lab_orders WHERE STATUS = 'completed'") == 3
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in [pdf_dir, *pdf_dir.rglob("*")]}
    assert modes == {"pdfs": 0o750, "pdfs/7": 0o750, "pdfs/8": 0o750, "pdfs/7/M-1.pdf": 0o640,
                     "pdfs/7/M-2.pdf": 0o640, "pdfs/8/M-3.pdf": 0o640}, modes


# -- check: the PDF folder's exposure ------------------------------------------------------


def _pdf_problems(site, lis, pdf_dir: Path, document_root: Path | None) -> list[str]:
    sections = {"site": {"document_root": str(document_root)}} if document_root else {}
    config = make_config(site, lis, pdf_dir, lis={"api_key": KEY}, **sections)
    problems, _notes = run_checks(config)
    return [p for p in problems if p.startswith("pdf.dir")]


def test_check_sees_through_symlinks_into_the_web_root(site, tmp_path):
    www = tmp_path / "www"
    (www / "upload").mkdir(parents=True)
    private = tmp_path / "private"
    private.mkdir(mode=0o750)
    os.chmod(private, 0o750)
    (www / "upload" / "real").mkdir(mode=0o750)
    os.chmod(www / "upload" / "real", 0o750)
    link_out = tmp_path / "looks-private"
    link_out.symlink_to(www / "upload" / "real")  # pdf.dir outside, but really inside
    link_root = tmp_path / "www-link"
    link_root.symlink_to(www)  # document_root named through a symlink
    with FakeQlab(api_key=KEY) as lis:
        cases = {
            "pdf.dir a symlink into the web root": _pdf_problems(site, lis, link_out, www),
            "document_root a symlink": _pdf_problems(site, lis, www / "upload" / "real",
                                                     link_root),
            "pdf.dir is the web root": _pdf_problems(site, lis, www, www),
            "private folder beside the web root": _pdf_problems(site, lis, private, www),
            "no document_root": _pdf_problems(site, lis, private, None),
        }
    for case in list(cases)[:3]:
        assert any("web root" in p for p in cases[case]), (case, cases[case])
    assert cases["private folder beside the web root"] == []
    assert cases["no document_root"] == []


@pytest.mark.parametrize("mode", [0o751, 0o754, 0o704, 0o757, 0o777])
def test_check_warns_when_others_may_read_or_enter_the_pdf_folder(site, tmp_path, mode):
    pdf_dir = tmp_path / "pdfs"
    pdf_dir.mkdir()
    os.chmod(pdf_dir, mode)
    with FakeQlab(api_key=KEY) as lis:
        problems = _pdf_problems(site, lis, pdf_dir, None)
    assert len(problems) == 1 and f"{mode:04o}" in problems[0], problems


# -- whose results -------------------------------------------------------------------------


class _HandOver(QlabClient):
    """While the LIS is asked about ``order``, the site gives the order to another user."""

    def __init__(self, config, site, order: str, new_user: int) -> None:
        super().__init__(config, sleep=lambda _s: None)
        self.site, self.order, self.new_user = site, order, new_user

    def fetch_order(self, external_id):
        answer = super().fetch_order(external_id)
        if external_id == self.order:
            with self.site.engine.begin() as conn:
                conn.execute(text("UPDATE local_lab_orders SET USER_ID = :u "
                                  "WHERE EXTERNAL_ORDER_ID = :e"),
                             {"u": self.new_user, "e": external_id})
        return answer


def test_results_are_written_only_for_the_user_of_the_orders_own_row(site, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    add_user(site, 8, email="new-owner@example.org", name="Boris")
    with FakeQlab(api_key=KEY) as lis:
        add_order(site, "H-1", 7)
        add_order(site, "H-2", 7)
        # The LIS's idea of the patient is not who gets the results: the row's USER_ID is.
        patient = {"phone": "+79990000008", "last_name": "Other", "first_name": "Patient"}
        lis.add_order("H-1", results=RESULTS, patient=patient)
        lis.add_order("H-2", results=RESULTS, patient=patient)
        config = make_config(site, lis, pdf_dir, lis={"api_key": KEY})

        first = run_pass_with(config, lis=_HandOver(config.lis, site, "H-1", 8))

        assert (first.completed, first.skipped) == (1, 1), first
        assert not (pdf_dir / "7" / "H-1.pdf").exists()
        assert not (pdf_dir / "8" / "H-1.pdf").exists()
        assert results(site, "H-1") == []
        second = run_pass_with(config)
    assert second.completed == 1
    assert (pdf_dir / "8" / "H-1.pdf").is_file() and not (pdf_dir / "7" / "H-1.pdf").exists()
    assert all(r.PDF_PATH.endswith("8/H-1.pdf") for r in results(site, "H-1"))
    assert all(r.PDF_PATH.endswith("7/H-2.pdf") for r in results(site, "H-2"))
    mails = {e.C_FIELDS.split('"ORDER_ID";')[1][:12]: e.C_FIELDS for e in events(site)}
    assert len(mails) == 2
    [h1] = [c for c in mails.values() if '"H-1"' in c]
    assert "new-owner@example.org" in h1 and "patient@example.org" not in h1
    record("Order handed to another user mid-pass", injected="USER_ID changed between asking "
           "the LIS and writing", times=1, outcome="skipped that pass (nothing written for "
           "either user); next pass wrote results, PDF and mail for the new USER_ID only")
