"""Load: thousands of pending orders, 1 % of the LIS's answers failing at random.

One `labsync` process (a small driver around ``open_app``, so it can report its own RSS after
each pass) runs passes over 10,000 pending orders (2,000 at the CI scale) on MariaDB; half are
completed in the LIS, half stay in the lab and are asked about on every pass. The fake LIS
spoils 1 % of its answers at random (seeded): 5xx and connection resets, which the retries
absorb, and bodies that are cut or not JSON, which fail the order for this pass. A bounded
number of passes completes every order that can be completed, nothing twice; the process's
RSS stays flat from pass to pass.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import pytest

from labsync.testing.fake_qlab import FakeQlab, Fault, seed_orders
from labsync.testing.pdfs import sample_pdf
from tests.conftest import API_KEY, add_user
from tests.invariants import check_invariants, temp_files
from tests.processes import write_config
from tests.reliability.conftest import mail_counts, record, scaled

pytestmark = [pytest.mark.mariadb, pytest.mark.slow]

FAILURE_RATE = 0.01
MAX_PASSES = 4  # to complete everything that can be completed
EXTRA_PASSES = 3  # after that, to watch the memory
USERS = 25

DRIVER = r"""
import json, sys
from pathlib import Path
from labsync import logs
from labsync.app import open_app
from labsync.config import load

def rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

config = load(sys.argv[1])
logs.setup("warning", "json", config.secrets())
with open_app(config) as app:
    for number in range(1, int(sys.argv[2]) + 1):
        summary = app.sync.run_pass(due_only=False)
        line = {"pass": number, "rss_kib": rss_kib(), **summary.as_dict()}
        print("PASS " + json.dumps(line), flush=True)
"""


class _FlakyLis(FakeQlab):
    """Spoils ``rate`` of its answers at random (seeded), with a fault fit for the endpoint."""

    def __init__(self, *args, rate: float, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rate = rate
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.spoiled: dict[str, int] = {}

    def _take_fault(self, endpoint, external_id):
        with self.rng_lock:
            roll = self.rng.random()
            kind = self.rng.randrange(4)
        if roll >= self.rate:
            return super()._take_fault(endpoint, external_id)
        faults = {  # two transient (retried), two the order fails on for this pass
            "results": [Fault(status=503), Fault(reset_after=0), Fault(body=b"<html>oops"),
                        Fault(body=b'{"status": "completed", "results": [{"code": ')],
            "pdf": [Fault(status=502), Fault(reset_after=200), Fault(truncate_at=200),
                    Fault(body=b"%PDF-1.4 cut")],
        }.get(endpoint, [Fault(status=503)] * 4)
        name = f"{endpoint}:{['5xx', 'reset', 'bad body', 'cut body'][kind]}"
        with self.rng_lock:
            self.spoiled[name] = self.spoiled.get(name, 0) + 1
        return faults[kind]


def test_thousands_of_orders_with_1_percent_failures_complete_in_bounded_passes(
        site, tmp_path):
    count = scaled(2_000, 10_000)
    for user in range(8, 8 + USERS - 1):
        add_user(site, user, email=f"p{user}@example.org")
    users = [7, *range(8, 8 + USERS - 1)]
    with _FlakyLis(api_key=API_KEY, rate=FAILURE_RATE, seed=20261125) as lis:
        ids = seed_orders(lis, count, results=3, completed_ratio=0.5)
        completable = ids[::2]  # seed_plan: with ratio ½ the even ones are completed
        with site.engine.begin() as conn:
            for start in range(0, count, 1000):
                conn.exec_driver_sql(
                    "INSERT INTO local_lab_orders (USER_ID, EXTERNAL_ORDER_ID, STATUS) VALUES "
                    + ", ".join(f"({users[i % USERS]}, '{ids[i]}', 'received')"
                                for i in range(start, min(start + 1000, count))))
        pdf_dir = tmp_path / "pdfs"
        config = write_config(tmp_path / "c.toml", db_url=site.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=pdf_dir, lis={"max_concurrency": 8},
                              sync={"page_size": 500})
        log = tmp_path / "driver.log"
        with open(log, "wb") as out:
            done = subprocess.run(
                [sys.executable, "-c", DRIVER, str(config), str(MAX_PASSES + EXTRA_PASSES)],
                stdout=out, stderr=subprocess.STDOUT, timeout=1800, check=False)
        output = log.read_text()
        assert done.returncode == 0, output[-3000:]
        passes = [json.loads(line[5:]) for line in output.splitlines()
                  if line.startswith("PASS ")]
        spoiled = dict(lis.spoiled)
        requests = len(lis.requests)

    completed_after = [p["completed"] for p in passes]
    cumulative = [sum(completed_after[: i + 1]) for i in range(len(passes))]
    needed = next(i + 1 for i, total in enumerate(cumulative) if total == len(completable))
    assert needed <= MAX_PASSES, cumulative
    assert sum(spoiled.values()) > 0.005 * requests  # the failures really happened
    expected_pdfs = {n: sample_pdf(f"Lab results {n}") for n in completable}
    results = {n: (3 if n in expected_pdfs else 0) for n in ids}
    counts = check_invariants(site, pdf_dir, expected_results=results,
                              expected_pdfs={**expected_pdfs, **dict.fromkeys(ids[1::2], b"")})
    assert counts == {"completed": len(completable), "not_completed": count - len(completable)}
    assert set(mail_counts(site).values()) == {1} and sum(mail_counts(site).values()) == len(
        completable)
    assert site.scalar("SELECT COUNT(*) FROM local_lab_results") == 3 * len(completable)
    assert temp_files(pdf_dir) == []
    rss = [p["rss_kib"] for p in passes]
    # Flat: after the first passes (imports, pools, caches warmed), no pass adds memory.
    steady = rss[needed:]
    growth = max(steady) - min(steady)
    assert growth < 8 * 1024, rss
    record(f"Load: {count} orders, 1 % of LIS answers failing", injected=", ".join(
        f"{k} ×{v}" for k, v in sorted(spoiled.items())), times=sum(spoiled.values()),
        outcome=f"all {len(completable)} completable orders completed in {needed} passes "
        f"(per pass: {completed_after}); RSS per pass {[round(r / 1024) for r in rss]} MiB",
        lost=0, duplicated=0, requests=requests,
        pass_seconds=[p["duration_s"] for p in passes], failed_per_pass=[
            p["failed"] for p in passes], rss_kib=rss)
