"""labsync's pass against THE BASELINE (the brief's PHP loop), on one database and one fake LIS.

    python -m bench.perf [--orders 2000] [--latency 0.05,0.1] [--concurrency 16]
                         [--pdf-size 200000] [--rss-orders 100000] [--skip-baseline]
                         [--repeat 3] [--profile] [--json out.json]

One run does everything in a scratch MariaDB database (``labsync_bench_<random>``, utf8 like
an older Bitrix site, tables from tests/sql plus ``init_db``), dropped at the end, Ctrl-C
included. The fake LIS (``python -m labsync.testing.fake_qlab``) runs in a process of its
own, so its CPU is not labsync's and it holds no GIL of labsync's. For each latency:

1. reset the database and PDF folder, run ``python -m bench.baseline`` (serial, a new
   connection per request, one autocommitted INSERT per result row);
2. reset again, run ``labsync sync-once --all`` as a user runs it, with
   ``lis.max_concurrency = --concurrency``; ``--repeat`` times, reporting the median run
   by CPU and the spread.

Each child is measured with ``os.wait4``: wall time, CPU (user+sys) and peak RSS. labsync's
CPU per completed order subtracts the CPU of a no-op ``sync-once`` (interpreter start-up,
imports, table checks) measured first on the empty database. The LIS counts the requests it
served and the most it had in flight. After each run the database is checked: completed
orders, one mail event each, results without duplicates, one PDF each. ``--rss-orders``
then runs one pass over that many pending orders (latency 0) for peak RSS. ``--profile``
runs one more pass with every thread under cProfile, timed by per-thread CPU, and lists the
top items; then one pass with each thread's CPU recorded (the pass's own thread against the
LIS workers), and with ``--py-spy`` one sampled pass. The targets are printed as met or
not; nothing here asserts them.

This module runs the passes; ``measure.py`` measures a child process and runs the fake LIS,
``scratch.py`` keeps the database, ``profiling.py`` and ``report.py`` say what was found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from bench.measure import FakeLis, busy_cpu, log, mariadb_cpu, run_measured
from bench.profiling import profile_child, profile_report, sampled_report, threads_child
from bench.report import evaluate, machine_facts, render
from bench.scratch import (
    ADMIN_URL,
    reset,
    scratch_database,
    seed,
    server_uptime,
    statement_counters,
    verify,
)

# -- the two contenders -------------------------------------------------------------------------


def pass_summary(output: Path) -> dict[str, Any]:
    """The ``pass.finished`` line of labsync's JSON log."""
    summary: dict[str, Any] = {}
    with open(output, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if '"pass.finished"' in line:
                with contextlib.suppress(ValueError):
                    summary = json.loads(line)
    return {k: summary.get(k) for k in ("checked", "completed", "pending", "failed",
                                        "events", "duration_s", "outcome")}


class Bench:
    """One benchmark run's shared state: the database, the folders, the parameters."""

    def __init__(self, args: argparse.Namespace, engine: Engine, workdir: Path) -> None:
        self.args, self.engine, self.workdir = args, engine, workdir
        self.api_key = secrets.token_hex(12)
        self.pdf_dir = workdir / "lab-results"
        self.baseline_pdf_dir = workdir / "baseline-pdfs"
        self.db_url = engine.url.render_as_string(hide_password=False)
        self.noop_cpu = 0.0

    def config(self, base_url: str, concurrency: int) -> Path:
        path = self.workdir / "labsync.toml"
        lis: dict[str, Any] = {"adapter": "qlab", "base_url": base_url,
                               "api_key": self.api_key, "max_concurrency": concurrency}
        if self.args.max_rps:
            lis["max_rps"] = self.args.max_rps
        tables: dict[str, dict[str, Any]] = {
            "database": {"url": self.db_url}, "site": {"timezone": "Europe/Moscow"},
            "lis": lis, "pdf": {"dir": str(self.pdf_dir)}, "notify": {"site_id": "s1"},
            "log": {"format": "json"}}
        path.write_text("".join(f"[{name}]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + "\n"
            for name, values in tables.items()))
        return path

    def labsync_command(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "labsync.cli", "--config", str(config), "sync-once", "--all"]

    def measure_noop(self) -> dict[str, Any]:
        """A pass with nothing to do: the fixed cost (start-up, imports, table checks)."""
        config = self.config("http://127.0.0.1:9/v2", self.args.concurrency)
        runs = [run_measured(self.labsync_command(config), self.workdir / "noop.log")
                for _ in range(self.args.noop_runs)]
        best = min(runs, key=lambda r: r["cpu_s"])
        if best["exit_code"] != 0:
            raise RuntimeError(f"labsync sync-once failed: see {self.workdir / 'noop.log'}")
        self.noop_cpu = best["cpu_s"]
        return best

    def fake(self, orders: int, latency: float, completed_ratio: float) -> FakeLis:
        return FakeLis(self.workdir, self.api_key, orders=orders, latency=latency,
                       pdf_size=self.args.pdf_size, completed_ratio=completed_ratio,
                       results=self.args.results)

    def run(self, who: str, **kwargs: Any) -> dict[str, Any]:
        """``run_once``, again if the MariaDB server restarted meanwhile."""
        return self._undisturbed(who, lambda: self.run_once(who, **kwargs))

    def _undisturbed(self, who: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``measure()``, repeated when the MariaDB server restarted during it (not labsync's
        doing: on a shared machine another test suite may restart the server)."""
        for attempt in range(1, 6):
            try:
                started = time.monotonic()
                up_before = server_uptime(self.engine)
                measured = measure()
                if server_uptime(self.engine) >= up_before + int(time.monotonic() - started) - 2:
                    measured["attempt"] = attempt
                    return measured
            except OperationalError as exc:
                log(f"{who}: database error ({exc.orig}), waiting for the server")
            log(f"{who}: the MariaDB server restarted during the run: running it again")
            self._wait_for_server()
        raise RuntimeError("the MariaDB server kept restarting: no clean measurement")

    def _wait_for_server(self) -> None:
        """Until the server has been up for 20 s: restart tests come in bursts."""
        for _ in range(60):
            with contextlib.suppress(OperationalError):
                if server_uptime(self.engine) >= 20:
                    return
            time.sleep(2)

    def run_once(self, who: str, *, orders: int, latency: float, completed_ratio: float,
                 expected: int, concurrency: int) -> dict[str, Any]:
        """Reset, start a fresh fake LIS, run ``who`` once, check what it wrote."""
        reset(self.engine, self.pdf_dir, self.baseline_pdf_dir)
        log(f"{who}: {orders} orders, latency {latency * 1000:g} ms"
            + (f", concurrency {concurrency}" if who != "baseline" else ""))
        lis = self.fake(orders, latency, completed_ratio)
        db_cpu, machine_cpu = mariadb_cpu(), busy_cpu()
        counters = statement_counters(self.engine)
        output = self.workdir / f"{who}-{latency}.log"
        try:
            if who == "baseline":
                pdf_dir = self.baseline_pdf_dir
                command = [sys.executable, "-m", "bench.baseline", "--db-url", self.db_url,
                           "--lis-url", lis.base_url, "--api-key", self.api_key,
                           "--pdf-dir", str(pdf_dir)]
            else:
                pdf_dir = self.pdf_dir
                command = self.labsync_command(self.config(lis.base_url, concurrency))
            measured = run_measured(command, output)
        finally:
            stats = lis.stop()
        busy = busy_cpu() - machine_cpu
        after_counters = statement_counters(self.engine)
        measured["db_statements"] = {k: after_counters[k] - v for k, v in counters.items()}
        measured["machine_busy_cpu_s"] = round(busy, 3)
        if db_cpu is not None and (after := mariadb_cpu()) is not None:
            measured["mariadb_cpu_s"] = round(after - db_cpu, 3)
        # CPU that neither the contender, the fake LIS nor MariaDB used: other tenants.
        ours = measured["cpu_s"] + (stats.get("cpu_s") or 0) + measured.get("mariadb_cpu_s", 0)
        measured["other_cpu_s"] = round(max(0.0, busy - ours), 3)
        measured.update(lis_requests=stats.get("requests", 0),
                        lis_by_endpoint=stats.get("by_endpoint", {}),
                        lis_max_in_flight=stats.get("max_in_flight", 0),
                        lis_cpu_s=stats.get("cpu_s"), latency_s=latency,
                        load_average=[round(v, 2) for v in os.getloadavg()],
                        concurrency=1 if who == "baseline" else concurrency, log=str(output))
        measured.update(verify(self.engine, pdf_dir, expected=expected,
                               results=self.args.results, pdf_size=self.args.pdf_size))
        measured["ok"] = measured["ok"] and measured["exit_code"] == 0
        limit = measured["lis_requests"] * latency / measured["concurrency"]
        measured["little_limit_s"] = round(limit, 3)
        measured["little_ratio"] = round(measured["wall_s"] / limit, 3) if limit else None
        if who != "baseline":
            self._labsync_extras(measured, output, expected)
        log(f"{who}: {measured['wall_s']:.1f} s, ok={measured['ok']}")
        return measured

    def _labsync_extras(self, measured: dict[str, Any], output: Path, expected: int) -> None:
        summary = pass_summary(output)
        measured["pass"] = summary
        duration = summary.get("duration_s")
        limit = measured["little_limit_s"]
        measured["pass_little_ratio"] = round(duration / limit, 3) if duration and limit else None
        net = max(0.0, measured["cpu_s"] - self.noop_cpu)
        measured["cpu_net_s"] = round(net, 3)
        measured["cpu_ms_per_completed"] = round(1000 * net / expected, 3) if expected else None
        checked = summary.get("checked") or 0
        measured["cpu_ms_per_order"] = round(1000 * net / checked, 3) if checked else None
        measured["ok"] = measured["ok"] and summary.get("completed") == expected \
            and summary.get("failed") == 0

    def profile(self, *, orders: int, latency: float, expected: int) -> dict[str, Any]:
        """One more labsync pass with every thread under cProfile (per-thread CPU time)."""
        return self._undisturbed("profile", lambda: self._profile_once(orders, latency, expected))

    def _extra_pass(self, name: str, orders: int, latency: float,
                    command: Callable[[Path], list[str]]) -> dict[str, Any]:
        """One more pass over fresh orders, run as ``command(config)``; its measurement."""
        reset(self.engine, self.pdf_dir, self.baseline_pdf_dir)
        log(f"{name}: {orders} orders, latency {latency * 1000:g} ms")
        lis = self.fake(orders, latency, self.args.completed_ratio)
        try:
            config = self.config(lis.base_url, self.args.concurrency)
            return run_measured(command(config), self.workdir / f"{name}.log")
        finally:
            lis.stop()

    def _child(self, mode: str, out: Path) -> Callable[[Path], list[str]]:
        """``labsync sync-once --all`` inside this module's ``mode`` wrapper, writing ``out``."""
        return lambda config: [sys.executable, "-m", "bench.perf", mode, str(out),
                               "--config", str(config), "sync-once", "--all"]

    def _profile_once(self, orders: int, latency: float, expected: int) -> dict[str, Any]:
        out = self.workdir / "labsync.prof"
        measured = self._extra_pass("profile", orders, latency, self._child("_profile", out))
        report = profile_report(out, self.args.profile_top)
        report.update(latency_s=latency, wall_s=measured["wall_s"], cpu_s=measured["cpu_s"],
                      completed=expected, exit_code=measured["exit_code"])
        report["threads"] = self._undisturbed(
            "threads", lambda: self._threads_once(orders, latency, expected))
        if self.args.py_spy:
            report["sampled"] = self._undisturbed(
                "py-spy", lambda: self._sample_once(orders, latency))
        return report

    def _threads_once(self, orders: int, latency: float, expected: int) -> dict[str, Any]:
        """A pass with each thread's CPU recorded (``time.thread_time``, nearly free): the
        pass's own thread against the LIS workers."""
        out = self.workdir / "labsync.threads.json"
        measured = self._extra_pass("threads", orders, latency, self._child("_threads", out))
        return {"cpu_s": measured["cpu_s"], "exit_code": measured["exit_code"],
                "completed": expected, "by_thread_s": json.loads(out.read_text())}

    def _sample_once(self, orders: int, latency: float) -> dict[str, Any]:
        """A pass under py-spy (sampling, so nearly free): the stacks of whichever thread
        holds the GIL (``--gil``). That is wall time holding the GIL, not CPU: a holder the
        kernel has put aside still counts. The thread split measures CPU."""
        out = self.workdir / "labsync.pyspy.txt"
        measured = self._extra_pass("py-spy", orders, latency, lambda config: [
            self.args.py_spy, "record", "--gil", "--format", "raw", "--rate", "500",
            "--output", str(out), "--", *self.labsync_command(config)])
        report = sampled_report(out, self.args.profile_top)
        report.update(wall_s=measured["wall_s"], exit_code=measured["exit_code"])
        return report


# -- the command --------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, engine: Engine, workdir: Path) -> dict[str, Any]:
    bench = Bench(args, engine, workdir)
    report: dict[str, Any] = {"machine": machine_facts(engine), "params": vars(args).copy(),
                              "runs": [], "rss": None, "profile": None}
    log("no-op sync-once on the empty database")
    report["noop"] = bench.measure_noop()
    expected = seed(engine, args.orders, args.completed_ratio)
    common = {"orders": args.orders, "completed_ratio": args.completed_ratio,
              "expected": expected}
    for latency in args.latency:
        run: dict[str, Any] = {"latency_s": latency, "baseline": None}
        if not args.skip_baseline:
            run["baseline"] = bench.run("baseline", latency=latency, concurrency=1, **common)
        repeats = sorted((bench.run("labsync", latency=latency, concurrency=args.concurrency,
                                    **common) for _ in range(args.repeat)),
                         key=lambda r: r["cpu_ms_per_completed"] or 0)
        run["labsync"] = repeats[len(repeats) // 2]  # the median run by CPU
        run["labsync_repeats"] = [{key: r[key] for key in _REPEAT_KEYS} for r in repeats]
        if run["baseline"]:
            run["speedup"] = round(run["baseline"]["wall_s"] / run["labsync"]["wall_s"], 2)
        report["runs"].append(run)
    if args.profile:
        report["profile"] = bench.profile(orders=args.orders, latency=args.latency[0],
                                          expected=expected)
    if args.rss_orders > 0:
        rss_expected = seed(engine, args.rss_orders, args.rss_completed_ratio)
        rss = bench.run("labsync-rss", orders=args.rss_orders, latency=0.0,
                        completed_ratio=args.rss_completed_ratio, expected=rss_expected,
                        concurrency=args.concurrency)
        rss["orders"] = args.rss_orders
        report["rss"] = rss
    report["targets"] = evaluate(report, args.concurrency)
    return report


_REPEAT_KEYS = ("wall_s", "cpu_s", "cpu_ms_per_completed", "cpu_ms_per_order", "little_ratio",
                "pass_little_ratio", "ok")


def _latencies(value: str) -> list[float]:
    try:
        latencies = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("give seconds, comma-separated: 0.05,0.1") from None
    if not latencies or min(latencies) < 0:
        raise argparse.ArgumentTypeError("give at least one latency, none negative")
    return latencies


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf",
                                     description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--orders", type=int, default=2000, help="pending orders (default 2000)")
    add("--latency", type=_latencies, default=[0.05, 0.1],
        help="LIS latency per request in seconds, comma-separated (default 0.05,0.1)")
    add("--concurrency", type=int, default=16, help="labsync's lis.max_concurrency (16)")
    add("--max-rps", type=float, default=0.0, help="labsync's lis.max_rps (default 0: none)")
    add("--pdf-size", type=int, default=200_000, help="bytes per PDF (default 200000)")
    add("--results", type=int, default=10, help="results per completed order (default 10)")
    add("--completed-ratio", type=float, default=0.5, help="completed share (default 0.5)")
    add("--rss-orders", type=int, default=100_000,
        help="orders in the peak-RSS pass, latency 0; 0 skips it (default 100000)")
    add("--rss-completed-ratio", type=float, default=0.1,
        help="completed share in the peak-RSS pass (default 0.1)")
    add("--skip-baseline", action="store_true", help="run labsync only")
    add("--profile", action="store_true", help="one more pass under cProfile; top items")
    add("--profile-top", type=int, default=15, help="items in the profile list (15)")
    add("--repeat", type=int, default=3, metavar="N",
        help="labsync passes per latency; the median by CPU is reported (3)")
    add("--py-spy", metavar="EXE", help="with --profile: also sample a pass with this py-spy")
    add("--noop-runs", type=int, default=3, help="no-op passes; the cheapest is subtracted (3)")
    add("--admin-url", default=ADMIN_URL, help="a MariaDB account that may create databases")
    add("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    add("--keep", action="store_true", help="keep the work folder (logs, PDFs, profile)")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.concurrency < 1 or args.noop_runs < 1 or args.repeat < 1:
        parser.error("--orders, --concurrency, --noop-runs and --repeat must be at least 1")
    return args


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_profile"]:
        return profile_child(argv[1], argv[2:])
    if argv[:1] == ["_threads"]:
        return threads_child(argv[1], argv[2:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # the scratch database is dropped either way
    workdir = Path(tempfile.mkdtemp(prefix="labsync-bench-"))
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
    report["params"]["latency"] = args.latency
    report["params"]["json"] = str(args.json) if args.json else None
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    return 0 if report["targets"][-1]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
