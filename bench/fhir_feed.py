"""The FHIR change feed against order-by-order polling of the same server, in the same run.

    python -m bench.fhir_feed [--orders 10000] [--rate 2] [--duration 240] [--feed-interval 5s]
                              [--sync-interval 60s] [--pdf binary|inline] [--idle-sizes 100,10000]
                              [--json out.json]

One run, in a scratch MariaDB database (``labsync_bench_<random>``, dropped at the end, Ctrl-C
included) and against one fake FHIR server (``bench.fhir_lab``: ``FakeFhir`` on localhost, in
this process):

1. **feed**: ``--orders`` pending orders on the site, each with a registered or processing
   DiagnosticReport in the fake. ``labsync run`` (a child process, adapter ``fhir``,
   ``feed = true``) starts; once its first pass has asked every order by identifier (as it
   does for an order it sees for the first time) and its first feed read has caught up, a
   driver completes orders in the fake at ``--rate`` per second for ``--duration`` seconds
   (report final, its Observations, its PDF as a Binary or inline), and a watcher polls the
   site's table for each order turning completed. The window ends when every completed
   order was delivered (or ``--drain`` seconds after the driver stopped).
2. **polling**: the same orders and server, everything reset, ``feed = false``: the same
   completions in the same order at the same rate, order-by-order adaptive polling.
3. **nothing new** (``bench.fhir_idle``, in this process): one feed read with nothing new,
   at each of ``--idle-sizes`` pending orders: its requests and labsync's CPU.

For each run: LIS requests by endpoint inside the window, per delivered result (PDF requests
apart), the delivery delay (LIS change → the order completed in the site's table), labsync's
CPU in the window (``/proc``), and whether every completed order was written exactly once.
The warm-up (first pass and first feed read) is reported on its own. The simulated figures
of docs/polling.md (``bench.polling_sim``, day-long) are printed beside the measured ones:
a run of minutes, in which every order is younger than 2 hours, is not the simulation's
steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bench.fhir_idle import idle_reads
from bench.fhir_lab import ORDER_SYSTEM, TOKEN, Driver, Lab, completion_order, order_ids
from bench.fhir_report import evaluate, render, simulated
from bench.fhir_site import Watcher, seed_site, verify
from bench.measure import ROOT, busy_cpu, log, mariadb_cpu
from bench.report import machine_facts
from bench.scratch import ADMIN_URL, reset, scratch_database
from labsync.config import parse_duration

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Labsync:
    """``labsync --config FILE run`` as a child process: its CPU so far, a clean stop."""

    def __init__(self, config: Path, output: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LABSYNC_CONFIG")}
        self.output = output
        with open(output, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "labsync.cli", "--config", str(config), "run"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.result: dict[str, Any] | None = None

    def alive(self) -> bool:
        return self.result is None and self.process.poll() is None

    def cpu_s(self) -> float:
        """User + system CPU of the process (every thread) so far, from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def peak_rss_mb(self) -> float | None:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def log_size(self) -> int:
        return self.output.stat().st_size

    def log_events(self, start: int, end: int | None = None) -> dict[str, Any]:
        """How many of labsync's JSON log lines from offset ``start`` name each event; the
        durations of the passes that finished there under ``"pass durations"``."""
        with open(self.output, "rb") as lines:
            lines.seek(start)
            chunk = lines.read() if end is None else lines.read(end - start)
        counts: dict[str, Any] = {"pass durations": []}
        for line in chunk.splitlines():
            try:
                entry = json.loads(line)
                event = entry.get("event")
            except (ValueError, AttributeError):
                continue
            if isinstance(event, str):
                counts[event] = counts.get(event, 0) + 1
            if event == "pass.finished":
                counts["pass durations"].append(entry.get("duration_s"))
        return counts

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM, then the exit status and the whole run's CPU (``wait4``)."""
        if self.result is not None:
            return self.result
        peak = self.peak_rss_mb() if self.process.poll() is None else None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.process.kill()
                pid, status, usage = os.wait4(self.process.pid, 0)
                break
            time.sleep(0.1)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.result = {"exit_code": self.process.returncode,
                       "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                       "peak_rss_mb": peak, "log": str(self.output)}
        return self.result


class Bench:
    """One benchmark run: the database, the fake lab, the parameters."""

    def __init__(self, args: argparse.Namespace, engine: Engine, workdir: Path) -> None:
        self.args, self.engine, self.workdir = args, engine, workdir
        self.pdf_dir = workdir / "lab-results"
        self.db_url = engine.url.render_as_string(hide_password=False)
        self.ids = order_ids(args.orders)
        self.lab = Lab(results=args.results, pdf_mode=args.pdf, pdf_size=args.pdf_size,
                       latency=args.latency)
        wanted = int(args.rate * args.duration) + 1
        self.sequence = completion_order(args.orders, wanted, args.seed)

    def config(self, name: str, *, feed: bool) -> Path:
        path = self.workdir / f"{name}.toml"
        tables: dict[str, dict[str, Any]] = {
            "database": {"url": self.db_url},
            "site": {"timezone": "Europe/Moscow"},
            "lis": {"adapter": "fhir", "base_url": self.lab.base_url,
                    "max_concurrency": self.args.concurrency},
            "lis.fhir": {"token": TOKEN, "order_system": ORDER_SYSTEM, "feed": feed,
                         "feed_interval": f"{self.args.feed_interval:g}s",
                         "page_size": self.args.page_size,
                         "overlap": f"{self.args.overlap:g}s"},
            "pdf": {"dir": str(self.pdf_dir)},
            "notify": {"site_id": "s1"},
            "sync": {"interval": f"{self.args.sync_interval:g}s"},
            "log": {"format": "json"},
        }
        path.write_text("".join(f"[{name}]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + "\n"
            for name, values in tables.items()))
        return path

    def fresh_state(self) -> None:
        """Every order pending on the site, and in the lab one pending report each, their
        last changes spread over the 20 hours before now (orders placed through a day)."""
        reset(self.engine, self.pdf_dir)
        seed_site(self.engine, self.ids)
        now = datetime.now(UTC)
        self.lab.seed(self.ids, first=now - timedelta(hours=20), last=now - timedelta(minutes=5))

    # -- one run: feed or polling -----------------------------------------------------------

    def run(self, name: str, *, feed: bool) -> dict[str, Any]:
        args = self.args
        log(f"{name}: {args.orders} pending orders, feed = {str(feed).lower()}")
        self.fresh_state()
        config = self.config(name, feed=feed)
        started = time.monotonic()
        mark = self.lab.mark()
        child = Labsync(config, self.workdir / f"{name}.log")
        try:
            self._wait_warm(child, feed=feed)
            asked = self.lab.requests_since(mark)
            warm = {"s": round(time.monotonic() - started, 2), "requests": asked,
                    "labsync_cpu_s": round(child.cpu_s(), 2)}
            log(f"{name}: warm after {warm['s']} s ({sum(asked.values())} "
                f"requests); completing {args.rate:g} orders/s for {args.duration:g} s")
            measured = self._window(name, child, feed=feed)
        finally:
            stopped = child.stop()
        measured.update(warmup=warm, labsync=stopped)
        measured["verify"] = verify(self.engine, self.pdf_dir,
                                    completed=measured["driver"]["completed_ids"],
                                    results=args.results)
        measured["driver"].pop("completed_ids")
        measured["ok"] = (measured["verify"]["exactly_once"]
                          and measured["delivery"]["not_delivered"] == 0)
        log(f"{name}: delivered {measured['delivery']['delivered']}, "
            f"exactly once: {measured['verify']['exactly_once']}, exit {stopped['exit_code']}")
        return measured

    def _wait_warm(self, child: Labsync, *, feed: bool) -> None:
        """Until the first pass has finished and, with the feed, the first read is at rest."""
        deadline = time.monotonic() + self.args.warmup_timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"labsync run exited early: see {child.output}")
            with self.engine.connect() as conn:
                passes = conn.execute(text("SELECT COUNT(*) FROM labsync_passes "
                                           "WHERE FINISHED_AT IS NOT NULL")).scalar()
                cursor = conn.execute(text("SELECT FEED_CURSOR FROM labsync_cursors")
                                      ).scalar() if feed else ";"
            if passes and cursor is not None and cursor.endswith(";"):
                return
            time.sleep(0.25)
        raise RuntimeError(f"labsync was not warm after {self.args.warmup_timeout:g} s")

    def _window(self, name: str, child: Labsync, *, feed: bool) -> dict[str, Any]:
        args = self.args
        watcher = Watcher(self.engine, every=args.watch_every)
        driver = Driver(self.lab, self.sequence, rate=args.rate, duration=args.duration,
                        on_change=watcher.expect)
        mark, log_at = self.lab.mark(), child.log_size()
        cpu, busy, db_cpu = child.cpu_s(), busy_cpu(), mariadb_cpu()
        own = time.process_time()
        started = time.monotonic()
        watcher.start()
        driver.start()
        try:
            driver.join()
            drain = args.drain if args.drain is not None else (
                3 * args.feed_interval + 30 if feed else 3 * args.sync_interval + 60)
            all_seen = watcher.wait_all(drain)
        finally:
            driver.stop.set()
            driver.join()
            watcher.close()
        wall = time.monotonic() - started
        requests = self.lab.requests_since(mark)
        labsync_cpu = child.cpu_s() - cpu
        own_cpu = time.process_time() - own
        busy_delta = busy_cpu() - busy
        db_after = mariadb_cpu()
        db_delta = db_after - db_cpu if db_cpu is not None and db_after is not None else None
        events = child.log_events(log_at)
        delivery = watcher.summary()
        delivered = delivery["delivered"]
        pdf = requests.get("binary", 0)
        lis = sum(requests.values()) - pdf
        measured = {
            "feed": feed,
            "window": {
                "s": round(wall, 2), "all_delivered": all_seen, "requests": requests,
                "lis_requests": lis, "pdf_requests": pdf,
                "requests_per_delivered": round(lis / delivered, 3) if delivered else None,
                "all_requests_per_delivered": round((lis + pdf) / delivered, 3)
                if delivered else None,
                "pdf_requests_per_delivered": round(pdf / delivered, 3) if delivered else None,
                "feed_reads": events.get("feed.read", 0),
                "passes": events.get("pass.finished", 0),
                "pass_durations_s": events["pass durations"],
                "labsync_warnings": {k: v for k, v in events.items()
                                     if k.startswith(("order.failed", "feed.read_failed",
                                                      "fhir.report_skipped", "job."))},
                "labsync_cpu_s": round(labsync_cpu, 2),
                "labsync_cpu_ms_per_delivered": round(1000 * labsync_cpu / delivered, 2)
                if delivered else None,
                "bench_cpu_s": round(own_cpu, 2),  # the fake server, driver and watcher
                "mariadb_cpu_s": round(db_delta, 2) if db_delta is not None else None,
                "machine_busy_cpu_s": round(busy_delta, 2),
                "other_cpu_s": round(max(0.0, busy_delta - labsync_cpu - own_cpu
                                         - (db_delta or 0.0)), 2),
                "load_average": [round(v, 2) for v in os.getloadavg()],
            },
            "delivery": delivery,
            "driver": {"completed": len(driver.done), "completed_ids": list(driver.done),
                       "late_max_s": round(driver.late_s, 3)},
        }
        log(f"{name}: window {wall:.0f} s, {lis} LIS requests + {pdf} PDF for {delivered} "
            f"delivered; delay p95 {delivery['delay_p95_s']} s")
        return measured


def run_all(args: argparse.Namespace, engine: Engine, workdir: Path) -> dict[str, Any]:
    bench = Bench(args, engine, workdir)
    report: dict[str, Any] = {"machine": machine_facts(engine), "params": vars(args).copy(),
                              "started": datetime.now(UTC).isoformat(timespec="seconds"),
                              "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    try:
        report["feed"] = bench.run("feed", feed=True)
        report["polling"] = bench.run("polling", feed=False)
        report["idle"] = idle_reads(bench.config("idle", feed=True), engine, bench.lab,
                                    bench.pdf_dir, sizes=args.idle_sizes,
                                    repeats=args.idle_reads, workdir=workdir)
    finally:
        bench.lab.close()
    report["simulation"] = simulated(args.sim_warmup_days)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["goals"] = evaluate(report)
    return report


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("give order counts, comma-separated: 100,10000") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("give at least one count, each at least 1")
    return sizes


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return parse_duration(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fhir_feed",
                                     description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--orders", type=int, default=10_000, help="pending orders (default 10000)")
    add("--rate", type=float, default=2.0, help="orders completed per second (default 2)")
    add("--duration", type=_seconds, default=240.0,
        help="how long the driver completes orders, each run (default 240 s: the overlap "
             "fills in the first 2 minutes)")
    add("--feed-interval", type=_seconds, default=5.0, help="lis.fhir.feed_interval (5s)")
    add("--sync-interval", type=_seconds, default=60.0,
        help="sync.interval, both runs (default 60s; the daemon's default is 15m)")
    add("--overlap", type=_seconds, default=120.0, help="lis.fhir.overlap (default 2m)")
    add("--page-size", type=int, default=50, help="lis.fhir.page_size (default 50)")
    add("--concurrency", type=int, default=8, help="lis.max_concurrency (default 8)")
    add("--results", type=int, default=10, help="Observations per completed order (10)")
    add("--pdf", choices=("binary", "inline"), default="binary",
        help="the PDF as a Binary to fetch (default) or inline in the report")
    add("--pdf-size", type=int, default=200_000, help="bytes per PDF (default 200000)")
    add("--latency", type=float, default=0.0, help="seconds the fake waits per request (0)")
    add("--seed", type=int, default=1, help="which orders complete, in which order (1)")
    add("--drain", type=_seconds, default=None,
        help="seconds to wait for the last deliveries after the driver stops (default: "
             "3 feed intervals + 30 s; polling 3 sync intervals + 60 s)")
    add("--watch-every", type=float, default=0.2, help="site table polled every (0.2 s)")
    add("--warmup-timeout", type=_seconds, default=900.0, help="(default 900 s)")
    add("--idle-sizes", type=_sizes, default=[100, 10_000],
        help="pending orders for the nothing-new read (default 100,10000)")
    add("--idle-reads", type=int, default=30, help="nothing-new reads per size; median (30)")
    add("--sim-warmup-days", type=int, default=28,
        help="history of the polling simulation's steady state (default 28, as docs/polling.md)")
    add("--admin-url", default=ADMIN_URL, help="a MariaDB account that may create databases")
    add("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    add("--keep", action="store_true", help="keep the work folder (configs, logs, PDFs)")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.rate <= 0 or args.duration <= 0 or args.idle_reads < 1:
        parser.error("--orders, --rate, --duration and --idle-reads must be positive")
    return args


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)  # the scratch database is dropped either way
    workdir = Path(tempfile.mkdtemp(prefix="labsync-fhir-bench-"))
    try:
        with scratch_database(make_url(args.admin_url)) as engine:
            report = run_all(args, engine, workdir)
    except KeyboardInterrupt:
        log("interrupted: the scratch database is dropped")
        return 130
    finally:
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["params"]["json"] = str(args.json) if args.json else None
    report["params"]["command"] = "python -m bench.fhir_feed " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    return 0 if all(g["met"] for g in report["goals"] if g["name"] == "exactly once") else 1


if __name__ == "__main__":
    raise SystemExit(main())
