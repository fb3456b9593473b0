"""The LIS misbehaving, one fault at a time, on real MariaDB with the fake QLAB over HTTP.

Every case asserts the same four things: the order hit by the fault either completes
correctly or stays pending for a later pass; nothing of it is half-written (no result row,
no mail, no PDF at its final path, no temporary file); the requests spent on it are bounded
by the retry budget; the other orders of the pass complete. A later pass, with the fault
gone, completes it exactly once.

Already proven elsewhere and not repeated here: the adapter's classification and retry
arithmetic against requests-mock (tests/test_qlab_adapter.py), the same over a real socket
(tests/test_qlab_conformance.py), a wrong key from the start and a 5xx-only LIS ending the
pass early (tests/test_sync_engine.py).
"""

from __future__ import annotations

import json
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import structlog
from structlog.contextvars import merge_contextvars

from labsync.testing.fake_qlab import FakeQlab, Fault
from labsync.testing.pdfs import sample_pdf
from tests.conftest import API_KEY, add_order, make_config
from tests.helpers import RESULTS, event_log, order_row
from tests.invariants import check_invariants, temp_files
from tests.reliability.conftest import free_port, record, run_pass_with

pytestmark = pytest.mark.mariadb

ATTEMPTS = 3  # lis.retry_attempts in make_config
VICTIM = "V-1"
OTHERS = [f"O-{i}" for i in range(4)]
BIG_PDF = sample_pdf("Lab results V-1", size=200_000)  # big enough to cut in the middle
HTML_PAGE = (b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway"
             b"</h1><hr>nginx</body></html>")


def _retry_after_date() -> dict[str, str]:
    return {"Retry-After": formatdate(time.time() + 3, usegmt=True)}


# name: (endpoint, fault factory, how it is classified, config overrides)
CASES = {
    "http_500": ("results", lambda: Fault(status=500), "transient", {}),
    "http_502": ("results", lambda: Fault(status=502), "transient", {}),
    "http_503": ("results", lambda: Fault(status=503), "transient", {}),
    "http_503_on_pdf": ("pdf", lambda: Fault(status=503), "transient", {}),
    "http_429_retry_after_seconds": (
        "results", lambda: Fault(status=429, headers={"Retry-After": "1"}), "transient", {}),
    "http_429_retry_after_http_date": (
        "results", lambda: Fault(status=429, headers=_retry_after_date()), "transient", {}),
    "hang_past_read_timeout": (
        "results", lambda: Fault(delay=2.5), "transient", {"read_timeout": 1}),
    "hang_past_read_timeout_on_pdf": (
        "pdf", lambda: Fault(delay=2.5), "transient", {"read_timeout": 1}),
    "reset_mid_pdf": ("pdf", lambda: Fault(reset_after=100_000), "transient", {}),
    "pdf_short_of_content_length": ("pdf", lambda: Fault(truncate_at=100_000), "transient", {}),
    "pdf_truncated_whole_body": ("pdf", lambda: Fault(body=BIG_PDF[:100_000]), "bad_data", {}),
    "pdf_is_html": ("pdf", lambda: Fault(body=HTML_PAGE, content_type="text/html"),
                    "bad_data", {}),
    "body_not_json": ("results", lambda: Fault(body=b"Internal error; try later"),
                      "bad_data", {}),
    "json_cut_mid_object": ("results", lambda: Fault(body=b'{"status": "completed", "resu'),
                            "bad_data", {}),
    "json_array_not_object": ("results", lambda: Fault(body=b"[1, 2, 3]"), "bad_data", {}),
    "json_results_not_a_list": (
        "results", lambda: Fault(body=b'{"status": "completed", "results": {"code": "HGB"}}'),
        "bad_data", {}),
    "json_unknown_status": (
        "results", lambda: Fault(body=b'{"status": "done", "results": []}'), "bad_data", {}),
    "json_status_missing": ("results", lambda: Fault(body=b'{"results": []}'), "bad_data", {}),
    "html_page_with_200": (
        "results", lambda: Fault(status=200, body=HTML_PAGE, content_type="text/html"),
        "bad_data", {}),
    "results_of_another_order": (
        "results", lambda: Fault(body=json.dumps(
            {"id": "O-0", "status": "completed", "results": RESULTS}).encode()),
        "bad_data", {}),
}
TRANSIENT = [name for name, case in CASES.items() if case[2] == "transient"]


def _seed(site, lis: FakeQlab) -> dict[str, bytes]:
    pdfs = {VICTIM: BIG_PDF}
    add_order(site, VICTIM, 7)
    lis.add_order(VICTIM, results=RESULTS, pdf=BIG_PDF)
    for name in OTHERS:
        pdfs[name] = sample_pdf(f"Lab results {name}")
        add_order(site, name, 7)
        lis.add_order(name, results=RESULTS, pdf=pdfs[name])
    return pdfs


def _assert_untouched(site, pdf_dir) -> None:
    """The victim is exactly as it was before the pass, apart from labsync's bookkeeping."""
    row = order_row(site, VICTIM)
    assert row.STATUS == "received" and row.SYNCED_AT is None
    assert site.scalar("SELECT COUNT(*) FROM local_lab_results WHERE ORDER_ID = :id",
                       id=row.ID) == 0
    assert not (pdf_dir / "7" / f"{VICTIM}.pdf").exists()
    assert temp_files(pdf_dir) == []


@pytest.mark.parametrize("name", list(CASES))
def test_a_persistent_fault_leaves_the_order_pending_and_the_others_complete(
        site, tmp_path, name):
    endpoint, make_fault, kind, lis_overrides = CASES[name]
    pdf_dir = tmp_path / "pdfs"
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis)
        config = make_config(site, lis, pdf_dir, lis=lis_overrides)
        lis.inject(VICTIM, endpoint, make_fault(), times=None)
        sleeps: list[float] = []
        started = time.monotonic()

        summary = run_pass_with(config, sleeps=sleeps)

        took = time.monotonic() - started
        spent = lis.request_count(endpoint, VICTIM)
        assert (summary.completed, summary.failed) == (len(OTHERS), 1), summary
        _assert_untouched(site, pdf_dir)
        # The retry budget: every try of a transient fault, one request for refused data.
        assert spent == (ATTEMPTS if kind == "transient" else 1), spent
        assert len(sleeps) == (ATTEMPTS - 1 if kind == "transient" else 0)
        state = site.rows("SELECT * FROM labsync_orders WHERE EXTERNAL_ORDER_ID = :e",
                          e=VICTIM)[0]
        assert state.FAILURES == 1 and state.LAST_ERROR_KIND == kind
        assert API_KEY not in state.LAST_ERROR
        victim_log = [e for e in event_log(site) if e.ITEM_ID == VICTIM]
        assert len(victim_log) == 1 and victim_log[0].SEVERITY == "WARNING"
        counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                                  expected_pdfs=pdfs)
        assert counts == {"completed": len(OTHERS), "not_completed": 1}

        lis.clear_faults()
        again = run_pass_with(config)

    assert (again.completed, again.failed) == (1, 0)
    counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                              expected_pdfs=pdfs)
    assert counts == {"completed": len(pdfs), "not_completed": 0}
    assert site.scalar("SELECT COUNT(*) FROM b_event") == len(pdfs)
    assert temp_files(pdf_dir) == []
    record(f"LIS {name}, every answer", injected=f"{endpoint}: {name}", times=spent,
           outcome=f"pending ({kind}), completed next pass", first_pass_s=round(took, 2))


@pytest.mark.parametrize("name", TRANSIENT)
def test_a_transient_fault_that_clears_within_the_retries_completes_in_the_same_pass(
        site, tmp_path, name):
    endpoint, make_fault, _kind, lis_overrides = CASES[name]
    pdf_dir = tmp_path / "pdfs"
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis)
        config = make_config(site, lis, pdf_dir, lis=lis_overrides)
        lis.inject(VICTIM, endpoint, make_fault(), times=ATTEMPTS - 1)
        sleeps: list[float] = []

        summary = run_pass_with(config, sleeps=sleeps)

        spent = lis.request_count(endpoint, VICTIM)
    assert (summary.completed, summary.failed) == (len(pdfs), 0), summary
    assert spent == ATTEMPTS
    if name == "http_429_retry_after_seconds":
        assert sleeps == [1.0, 1.0]  # exactly what the LIS asked for, not the backoff
    elif name == "http_429_retry_after_http_date":
        assert all(1.0 <= s <= 3.5 for s in sleeps), sleeps
    else:
        assert len(sleeps) == ATTEMPTS - 1 and all(0 < s <= 10.5 for s in sleeps), sleeps
    counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                              expected_pdfs=pdfs)
    assert counts == {"completed": len(pdfs), "not_completed": 0}
    assert temp_files(pdf_dir) == []
    record(f"LIS {name}, then recovers", injected=f"{endpoint}: {name}",
           times=ATTEMPTS - 1, outcome="completed in the same pass", waits=sleeps)


def test_connection_refused_fails_each_order_once_then_the_lis_comes_back(site, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    with FakeQlab(api_key=API_KEY) as lis:
        pdfs = _seed(site, lis)
        down = make_config(site, lis, pdf_dir, lis={"base_url": f"http://127.0.0.1:{free_port()}/v2"})
        sleeps: list[float] = []

        summary = run_pass_with(down, sleeps=sleeps)

        assert (summary.completed, summary.failed) == (0, len(pdfs))
        assert len(sleeps) == len(pdfs) * (ATTEMPTS - 1)  # bounded: 3 tries an order
        states = site.rows("SELECT FAILURES, LAST_ERROR_KIND, LAST_ERROR FROM labsync_orders")
        assert [(s.FAILURES, s.LAST_ERROR_KIND) for s in states] == [(1, "transient")] * 5
        assert all("connection failed" in s.LAST_ERROR for s in states)
        check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                         expected_pdfs=pdfs)
        assert not pdf_dir.exists() or temp_files(pdf_dir) == []

        again = run_pass_with(make_config(site, lis, pdf_dir))
    assert again.completed == len(pdfs)
    check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs}, expected_pdfs=pdfs)
    record("LIS connection refused", injected="nothing listening on lis.base_url",
           times=len(pdfs) * ATTEMPTS, outcome="all pending, completed next pass")


def test_connection_refused_for_a_whole_page_ends_the_pass_with_one_error(site, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    names = [f"U-{i:02d}" for i in range(40)]
    pdfs = {n: sample_pdf(f"Lab results {n}") for n in names}
    with FakeQlab(api_key=API_KEY) as lis:
        for name in names:
            add_order(site, name, 7)
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
        down = make_config(site, lis, pdf_dir, lis={
            "base_url": f"http://127.0.0.1:{free_port()}/v2", "max_concurrency": 2})

        sleeps: list[float] = []
        summary = run_pass_with(down, sleeps=sleeps)

        assert summary.outcome == "lis_unreachable" and summary.completed == 0
        tried = len(sleeps) // (ATTEMPTS - 1)  # orders asked, each with every attempt
        assert tried < len(names) // 2
        charged = site.scalar("SELECT COUNT(*) FROM labsync_orders WHERE FAILURES > 0")
        assert charged < 20  # ~10 orders tried, then the pass stopped asking
        halts = [e for e in event_log(site) if e.ITEM_ID == "labsync"]
        assert len(halts) == 1 and "did not answer" in halts[0].DESCRIPTION
        check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                         expected_pdfs=pdfs)

        again = run_pass_with(make_config(site, lis, pdf_dir))
    assert again.completed == len(names)
    record("LIS connection refused, 40 orders", injected="nothing listening on lis.base_url",
           times=tried * ATTEMPTS, outcome=f"pass ended early (lis_unreachable) after {tried} "
           f"of 40 orders, one ERROR line, {charged} charged a failure; completed next pass",
           charged=charged)


class _RevokingLis(FakeQlab):
    """Answers 401 to everything once ``after`` results requests have been served."""

    def __init__(self, *args, after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after = after
        self.revoked_at: int | None = None

    def _take_fault(self, endpoint, external_id):
        served = self.request_count("results")
        if served > self.after:
            if self.revoked_at is None:
                self.revoked_at = len(self.requests) - 1
            return Fault(status=401)
        return super()._take_fault(endpoint, external_id)


def test_a_key_revoked_mid_pass_gives_one_error_and_the_pass_stops_asking(site, tmp_path):
    pdf_dir = tmp_path / "pdfs"
    names = [f"K-{i:02d}" for i in range(60)]
    pdfs = {n: sample_pdf(f"Lab results {n}") for n in names}
    concurrency = 4
    with _RevokingLis(api_key=API_KEY, after=15) as lis:
        for name in names:
            add_order(site, name, 7)
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
        config = make_config(site, lis, pdf_dir, lis={"max_concurrency": concurrency},
                             sync={"page_size": 10})
        with structlog.testing.capture_logs(processors=[merge_contextvars]) as logged:
            summary = run_pass_with(config)
        assert lis.revoked_at is not None
        refused = len(lis.requests) - lis.revoked_at

    assert summary.outcome == "lis_auth"
    assert 0 < summary.completed < len(names)
    # One error for the pass, not one per order; no order is charged a failure for it.
    assert [e["event"] for e in logged].count("lis.auth_failed") == 1
    assert [e for e in logged if e["event"] == "order.failed"] == []
    errors = [e for e in event_log(site) if e.SEVERITY == "ERROR"]
    assert len(errors) == 1 and "API key" in errors[0].DESCRIPTION
    assert site.scalar("SELECT COUNT(*) FROM labsync_orders WHERE FAILURES > 0") == 0
    # The pass stopped asking: only what was already in flight got its 401.
    assert refused <= 2 * concurrency, refused
    assert API_KEY not in json.dumps(logged, default=str)
    counts = check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs},
                              expected_pdfs=pdfs)
    assert temp_files(pdf_dir) == []

    with FakeQlab(api_key=API_KEY) as lis:  # the key works again
        for name in names:
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
        again = run_pass_with(make_config(site, lis, pdf_dir))
    assert again.completed == counts["not_completed"]
    check_invariants(site, pdf_dir, expected_results={k: 3 for k in pdfs}, expected_pdfs=pdfs)
    record("LIS 401 mid-pass (key revoked)", injected="401 on every request after 15",
           times=refused, outcome="one lis.auth_failed line and one ERROR in b_event_log; "
           "pass stopped asking; rest completed next pass", completed_before=summary.completed)


class _DripHandler(BaseHTTPRequestHandler):
    """QLAB's two order endpoints; DRIP-1's PDF comes one byte every 0.3 s, for hours."""

    protocol_version = "HTTP/1.1"
    stopping = threading.Event()

    def do_GET(self) -> None:
        order, _, what = self.path.removeprefix("/v2/orders/").partition("/")
        if what == "results":
            body = json.dumps({"id": order, "status": "completed", "results": RESULTS}).encode()
            kind = "application/json"
        else:
            body, kind = sample_pdf(f"Lab results {order}", size=200_000), "application/pdf"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if order == "DRIP-1" and what == "pdf":
            for byte in body:
                if self.stopping.wait(0.3):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        else:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_pdf_that_trickles_in_is_cut_off_at_the_download_timeout(site, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DripHandler)
    server.daemon_threads = True
    _DripHandler.stopping.clear()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("DRIP-1", "O-1", "O-2"):
        add_order(site, name, 7)
    drip = SimpleNamespace(base_url=f"http://127.0.0.1:{server.server_address[1]}/v2")
    config = make_config(site, drip, tmp_path / "pdfs", lis={
        "read_timeout": 1, "retry_max_seconds": 5, "download_timeout": 5})
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(run_pass_with(config)))
    started = time.monotonic()
    worker.start()
    worker.join(20)  # download_timeout and the retry budget are 5 s: well within this
    took = time.monotonic() - started
    _DripHandler.stopping.set()  # ends the trickle, and with it a pass still waiting on it
    worker.join(30)
    server.shutdown()
    server.server_close()
    record("LIS PDF trickling in (a byte every 0.3 s)", injected="PDF of one order; "
           "download_timeout and retry budget 5 s",
           times=1, outcome=f"pass ended after {took:.0f} s" if took < 20 else
           "pass still waiting after 20 s (stopped by the test); unbounded")
    assert took < 20, "the pass waited on a trickling PDF far past lis.download_timeout"
    [summary] = outcome
    assert (summary.completed, summary.failed) == (2, 1)
