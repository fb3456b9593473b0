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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from labsync.config import DatabaseConfig
from labsync.store.db import init_db, make_engine
from labsync.testing.fake_qlab import seed_plan

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "tests" / "sql"
ADMIN_URL = os.environ.get("LABSYNC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
RESET_TABLES = ("local_lab_results", "b_event", "b_event_log")  # plus every labsync_* table
PREFIX = "QL-"
MB = 1024 * 1024


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- child processes ----------------------------------------------------------------------------


def run_measured(command: list[str], output: Path) -> dict[str, Any]:
    """Run ``command`` (stdout and stderr to ``output``); its wall time, CPU and peak RSS.

    Peak RSS is the child's own ``VmHWM``, read from ``/proc`` every 10 ms while it runs.
    ``ru_maxrss`` from ``wait4`` is not used for it: Linux carries the RSS of the image a
    process replaces with ``execve`` into its ``ru_maxrss``, so a child started by this
    benchmark would report at least the benchmark's own RSS (which holds the seeded
    orders). It is kept as ``maxrss_wait4_mb``.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LABSYNC_CONFIG")}
    with open(output, "wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=ROOT)
    done = threading.Event()
    hwm_kib = [0]
    watcher = threading.Thread(target=_watch_hwm, args=(process.pid, done, hwm_kib),
                               daemon=True)
    watcher.start()
    try:
        _pid, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        done.set()
        watcher.join()
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    maxrss = usage.ru_maxrss / 1024  # KiB on Linux
    return {"exit_code": process.returncode, "wall_s": round(wall, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "user_s": round(usage.ru_utime, 3), "sys_s": round(usage.ru_stime, 3),
            "peak_rss_mb": round(hwm_kib[0] / 1024, 1) if hwm_kib[0] else round(maxrss, 1),
            "maxrss_wait4_mb": round(maxrss, 1)}


def _watch_hwm(pid: int, done: threading.Event, hwm_kib: list[int]) -> None:
    """Keep the highest ``VmHWM`` of process ``pid`` in ``hwm_kib[0]`` until ``done``."""
    path = f"/proc/{pid}/status"
    while not done.is_set():
        try:
            with open(path, "rb") as status:
                for line in status:
                    if line.startswith(b"VmHWM:"):
                        hwm_kib[0] = max(hwm_kib[0], int(line.split()[1]))
                        break
        except (OSError, ValueError):  # exited meanwhile; its last reading stands
            pass
        done.wait(0.01)


class FakeLis:
    """The fake QLAB in its own process; ``stop()`` returns its request counters and CPU."""

    def __init__(self, workdir: Path, api_key: str, *, orders: int, latency: float,
                 pdf_size: int, completed_ratio: float, results: int) -> None:
        command = [sys.executable, "-m", "labsync.testing.fake_qlab", "--port", "0",
                   "--api-key", api_key, "--orders", str(orders), "--latency", str(latency),
                   "--pdf-size", str(pdf_size), "--completed-ratio", str(completed_ratio),
                   "--results", str(results), "--prefix", PREFIX, "--stats"]
        with open(workdir / "fake-lis.log", "ab") as err:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err,
                                            text=True, cwd=ROOT)
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.stop()
            raise RuntimeError(f"the fake LIS did not start (see {workdir / 'fake-lis.log'})")

    def stop(self) -> dict[str, Any]:
        process = self.process
        if process.returncode is not None:
            return {}
        process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        lines = process.stdout.read().splitlines()
        _pid, _status, usage = os.wait4(process.pid, 0)
        process.returncode = 0
        stats = json.loads(lines[-1]) if lines else {}
        stats["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
        return stats


def busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def mariadb_cpu() -> float | None:
    """CPU seconds the MariaDB server has used so far (None if it is not found or readable)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() in ("mariadbd",
                                                                               "mysqld"):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return None


# -- the scratch database -----------------------------------------------------------------------


def sql_statements(sql: str) -> list[str]:
    lines = [ln.split("--", 1)[0] for ln in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@contextlib.contextmanager
def scratch_database(admin_url: URL) -> Iterator[Engine]:
    """A fresh utf8 database with the site's tables and labsync's; dropped on the way out."""
    admin = create_engine(admin_url, pool_pre_ping=True)
    name = f"labsync_bench_{secrets.token_hex(4)}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8 COLLATE utf8_unicode_ci"))
    engine = create_engine(admin_url.set(database=name), pool_pre_ping=True)
    try:
        with engine.begin() as conn:
            for path in sorted(SQL_DIR.glob("*.sql")):
                for statement in sql_statements(path.read_text(encoding="utf-8")):
                    conn.execute(text(statement))
        own = make_engine(DatabaseConfig(url=engine.url))
        init_db(own)  # labsync's own tables, as `labsync init-db` makes them
        own.dispose()
        yield engine
    finally:
        engine.dispose()
        for attempt in range(5):  # the server may be restarting under us (see server_uptime)
            try:
                with admin.begin() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
                break
            except OperationalError:
                if attempt == 4:
                    log(f"could not drop the scratch database {name}: drop it by hand")
                    raise
                time.sleep(3)
        admin.dispose()


STATEMENT_COUNTERS = ("Com_insert", "Com_update", "Com_delete", "Com_select", "Com_commit",
                      "Questions")


def statement_counters(engine: Engine) -> dict[str, int]:
    """The server's statement counters (all sessions: another tenant's queries count too)."""
    names = ", ".join(f"'{n}'" for n in STATEMENT_COUNTERS)
    with engine.connect() as conn:
        rows = conn.execute(text(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names})"))
        return {name.lower(): int(value) for name, value in rows}


def server_uptime(engine: Engine) -> int:
    """Seconds since the MariaDB server started: a drop between two readings is a restart."""
    with engine.connect() as conn:
        row = conn.execute(text("SHOW GLOBAL STATUS LIKE 'Uptime'")).first()
    return int(row[1]) if row else 0


def seed(engine: Engine, orders: int, completed_ratio: float) -> int:
    """Pending orders with the fake LIS's ids, four per user; returns how many will complete."""
    plan = seed_plan(orders, prefix=PREFIX, completed_ratio=completed_ratio)
    users = max(1, (orders + 3) // 4)
    with engine.begin() as conn:
        for table in ("local_lab_orders", "b_user"):
            conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text(
            "INSERT INTO b_user (ID, LOGIN, ACTIVE, NAME, LAST_NAME, EMAIL, DATE_REGISTER) "
            "VALUES (:id, :login, 'Y', 'Анна', 'Иванова', :email, '2025-01-01')"),
            [{"id": u, "login": f"user{u}", "email": f"patient{u}@example.org"}
             for u in range(1, users + 1)])
        rows = [{"id": i + 1, "ext": ext, "user": i % users + 1, "day": date.today()}
                for i, (ext, _completed) in enumerate(plan)]
        for start in range(0, len(rows), 10_000):
            conn.execute(text(
                "INSERT INTO local_lab_orders (ID, USER_ID, EXTERNAL_ORDER_ID, ORDER_DATE, STATUS)"
                " VALUES (:id, :user, :ext, :day, 'received')"), rows[start:start + 10_000])
    return sum(completed for _ext, completed in plan)


def reset(engine: Engine, *pdf_dirs: Path) -> None:
    """Every order pending again; results, mail, admin log and labsync's bookkeeping gone."""
    with engine.begin() as conn:
        own = conn.execute(text(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
            " AND TABLE_NAME LIKE 'labsync\\_%'")).scalars().all()
        for table in (*RESET_TABLES, *own):
            conn.execute(text(f"TRUNCATE TABLE {table}"))
        conn.execute(text("UPDATE local_lab_orders SET STATUS = 'received', SYNCED_AT = NULL"))
    for folder in pdf_dirs:
        shutil.rmtree(folder, ignore_errors=True)


def verify(engine: Engine, pdf_dir: Path, *, expected: int, results: int,
           pdf_size: int) -> dict[str, Any]:
    """What a pass left behind, and whether it is exactly what it should be."""
    queries = {
        "completed": "SELECT COUNT(*) FROM local_lab_orders WHERE STATUS = 'completed'",
        "events": "SELECT COUNT(*) FROM b_event",
        "result_rows": "SELECT COUNT(*) FROM local_lab_results",
        "duplicate_results": "SELECT COUNT(*) FROM (SELECT 1 FROM local_lab_results"
                             " GROUP BY ORDER_ID, TEST_CODE HAVING COUNT(*) > 1) AS d",
        "event_log_rows": "SELECT COUNT(*) FROM b_event_log",
    }
    with engine.connect() as conn:
        found: dict[str, Any] = {k: int(conn.execute(text(q)).scalar() or 0)
                                 for k, q in queries.items()}
    files = [p for p in pdf_dir.rglob("*.pdf") if not p.name.startswith(".")] \
        if pdf_dir.exists() else []
    found["pdf_files"] = len(files)
    found["pdf_wrong_size"] = sum(1 for p in files if p.stat().st_size != pdf_size)
    found["expected_completed"] = expected
    found["ok"] = (found["completed"] == found["events"] == found["pdf_files"] == expected
                   and found["result_rows"] == expected * results
                   and found["duplicate_results"] == found["pdf_wrong_size"] == 0
                   and found["event_log_rows"] == 0)
    return found


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


# -- profiling ----------------------------------------------------------------------------------


def profile_child(out: str, labsync_args: list[str]) -> int:
    """Run ``labsync ARGS`` with a CPU-time cProfile in every thread; save the merged stats.

    cProfile on its own sees only the thread that enabled it, and by default it measures
    wall time, which would rank waiting on a socket first. ``time.thread_time`` counts
    the CPU each thread spends, so the list ranks labsync's own work.
    """
    import cProfile
    import pstats
    import threading

    profiles: list[cProfile.Profile] = []
    thread_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()
        try:
            thread_run(self)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    from labsync.cli import main as labsync_main

    main_profile = cProfile.Profile(time.thread_time)
    profiles.append(main_profile)
    main_profile.enable()
    try:
        return labsync_main(labsync_args)
    finally:
        main_profile.disable()
        stats = pstats.Stats(main_profile)
        for profile in profiles:
            if profile is not main_profile:
                with contextlib.suppress(TypeError):  # a thread that never ran any Python
                    stats.add(profile)
        stats.dump_stats(out)


def threads_child(out: str, labsync_args: list[str]) -> int:
    """Run ``labsync ARGS``; write each group of threads' CPU seconds (``time.thread_time``)
    as JSON: ``main`` (start-up, pages, claims and every database write) and the workers,
    by thread-name prefix (``labsync-lis``)."""
    import threading

    spent: dict[str, float] = {}
    lock = threading.Lock()
    thread_run = threading.Thread.run

    def timed_run(self: threading.Thread) -> None:
        try:
            thread_run(self)
        finally:
            cpu = time.thread_time()
            with lock:
                group = self.name.rsplit("_", 1)[0]
                spent[group] = spent.get(group, 0.0) + cpu

    threading.Thread.run = timed_run  # type: ignore[method-assign]
    from labsync.cli import main as labsync_main

    try:
        return labsync_main(labsync_args)
    finally:
        spent["main"] = time.thread_time()
        Path(out).write_text(json.dumps(spent))


_PACKAGE = re.compile(r"site-packages/([^/]+)/")
_STDLIB = re.compile(r"/lib/python3\.\d+/([^/.]+)")
_BUILTIN_OWNER = re.compile(r"of '([\w.]+)' objects|built-in method ([\w.]+)\.\w+>")


def _where(func: tuple[str, int, str]) -> tuple[str, str]:
    """(area, label) of a pstats function key: which package's code, and a readable name."""
    filename, line, name = func
    if filename == "~":
        match = _BUILTIN_OWNER.search(name)
        owner = next((g for g in match.groups() if g), "") if match else ""
        return f"builtin {owner or name}", name
    for pattern, area in ((_PACKAGE, "{}"), (_STDLIB, "stdlib {}")):
        if match := pattern.search(filename):
            short = filename[match.start(1):]
            return area.format(match[1]), f"{short}:{line}({name})"
    if "/labsync/" in filename:
        short = filename[filename.rindex("/labsync/") + 1:]
        return "labsync", f"{short}:{line}({name})"
    return filename, f"{filename}:{line}({name})"


def profile_report(path: Path, top: int) -> dict[str, Any]:
    """The top items by own CPU time, and CPU time summed by package."""
    import pstats

    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _cc, _nc, tt, _ct, _callers in entries.values()) or 1.0
    by_area: dict[str, float] = {}
    rows = []
    for func, (_cc, calls, tottime, cumtime, _callers) in entries.items():
        area, label = _where(func)
        by_area[area] = by_area.get(area, 0.0) + tottime
        rows.append({"function": label, "area": area, "calls": calls,
                     "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4),
                     "share": round(tottime / total, 4)})
    rows.sort(key=lambda r: -r["tottime_s"])
    areas = sorted(by_area.items(), key=lambda kv: -kv[1])
    return {"profiled_cpu_s": round(total, 3), "top": rows[:top],
            "by_area": [{"area": a, "tottime_s": round(t, 3), "share": round(t / total, 4)}
                        for a, t in areas[:top]]}


PHASES = {"observe (LIS workers)": "SyncEngine._observe", "apply (DB, pass thread)":
          "SyncEngine._apply", "pages and claims": "SyncEngine._pages"}


def sampled_report(path: Path, top: int) -> dict[str, Any]:
    """py-spy's raw stacks: samples by leaf function (own time), by package, by pass phase."""
    leaves: dict[str, int] = {}
    areas: dict[str, int] = {}
    inclusive: dict[str, int] = {}  # labsync's functions, counted once per stack they are on
    phases = dict.fromkeys(PHASES, 0)
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        leaf = stack.rsplit(";", 1)[-1].strip()
        leaves[leaf] = leaves.get(leaf, 0) + count
        where = re.search(r"\(([^:()]+)", leaf)
        area = where[1].split("/")[0].removesuffix(".py") if where else "?"
        areas[area] = areas.get(area, 0) + count
        for phase, marker in PHASES.items():
            if marker in stack:
                phases[phase] += count
        for name in {f.split(" (", 1)[0] for f in stack.split(";") if "(labsync/" in f}:
            inclusive[name] = inclusive.get(name, 0) + count
    total = total or 1

    def ranked(counts: dict[str, int], key: str) -> list[dict[str, Any]]:
        items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [{key: k, "samples": n, "share": round(n / total, 4)} for k, n in items]

    # The trunk (main, run_pass, the apply loop…) is on most stacks and says nothing.
    branches = {k: n for k, n in inclusive.items() if n <= total / 2}
    return {"samples": total, "top": ranked(leaves, "function"),
            "by_area": ranked(areas, "area"), "by_phase": ranked(phases, "phase"),
            "labsync_inclusive": ranked(branches, "function")}


# -- the report ---------------------------------------------------------------------------------


def machine_facts(engine: Engine) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    memory = re.search(r"MemTotal:\s*(\d+) kB", meminfo)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT VERSION()")).scalar()
        flush = conn.execute(text("SELECT @@innodb_flush_log_at_trx_commit")).scalar()
        pool = conn.execute(text("SELECT @@innodb_buffer_pool_size")).scalar()
    return {"date": date.today().isoformat(), "nproc": os.cpu_count(),
            "cpu": model[1].strip() if model else platform.processor(),
            "memory_gb": round(int(memory[1]) / 1024 / 1024, 1) if memory else None,
            "kernel": platform.release(), "python": platform.python_version(),
            "mariadb": version, "innodb_flush_log_at_trx_commit": flush,
            "innodb_buffer_pool_mb": int(pool or 0) // MB}


def _nearest(runs: list[dict[str, Any]], latency: float) -> dict[str, Any] | None:
    return min(runs, key=lambda r: abs(r["latency_s"] - latency)) if runs else None


def evaluate(report: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met."""
    runs = report["runs"]
    labsync = [r["labsync"] for r in runs]
    found: list[dict[str, Any]] = []
    r50 = _nearest([r for r in runs if r.get("baseline")], 0.05)
    if r50 is not None:
        found.append({"target": f"pass ≥ 10× faster than the baseline at "
                                f"{r50['latency_s'] * 1000:g} ms, concurrency {concurrency}",
                      "measured": f"{r50['speedup']:.1f}×", "met": r50["speedup"] >= 10})
    r100 = _nearest(runs, 0.1)
    if r100 is not None:
        ratio = r100["labsync"]["little_ratio"]
        found.append({"target": f"wall ≤ 1.5 × Little's limit at "
                                f"{r100['latency_s'] * 1000:g} ms",
                      "measured": f"{ratio:.2f} × (pass alone "
                                  f"{r100['labsync']['pass_little_ratio']:.2f} ×)",
                      "met": ratio <= 1.5})
    if labsync:
        worst = max(r["cpu_ms_per_completed"] or 0 for r in labsync)
        repeats = len(runs[0].get("labsync_repeats") or [1])
        which = "worst latency" if repeats == 1 else f"median of {repeats} runs, worst latency"
        found.append({"target": "labsync CPU ≤ 2 ms per completed order (net of start-up)",
                      "measured": f"{worst:.2f} ms ({which})", "met": worst <= 2})
    if report.get("rss"):
        rss = report["rss"]["peak_rss_mb"]
        found.append({"target": f"peak RSS < 150 MB with {report['rss']['orders']:,} orders",
                      "measured": f"{rss:.0f} MB", "met": rss < 150})
    measured = [r for r in (*labsync, report.get("rss")) if r]
    if measured:
        flight = max(r["lis_max_in_flight"] for r in measured)
        found.append({"target": f"LIS requests in flight ≤ lis.max_concurrency ({concurrency})",
                      "measured": str(flight), "met": flight <= concurrency})
    everything = [r for run in runs for r in (run.get("baseline"), run["labsync"]) if r]
    everything += [report["rss"]] if report.get("rss") else []
    found.append({"target": "every run wrote exactly the expected rows, mails and PDFs",
                  "measured": ", ".join("ok" if r["ok"] else "WRONG" for r in everything),
                  "met": all(r["ok"] for r in everything)})
    return found


def render(report: dict[str, Any]) -> str:
    head = ("latency", "run", "wall s", "speed-up", "LIS req", "in flight", "Little s",
            "wall/Little", "CPU s", "ms/completed", "ms/order", "peak RSS MB", "correct")
    lines = []

    def row(latency: str, name: str, r: dict[str, Any], speedup: str) -> None:
        per, per_order = r.get("cpu_ms_per_completed"), r.get("cpu_ms_per_order")
        ratio = r.get("little_ratio")
        lines.append((latency, name, f"{r['wall_s']:.1f}", speedup, str(r["lis_requests"]),
                      str(r["lis_max_in_flight"]), f"{r['little_limit_s']:.1f}",
                      f"{ratio:.2f}" if ratio else "-", f"{r['cpu_s']:.1f}",
                      f"{per:.2f}" if per is not None else "-",
                      f"{per_order:.2f}" if per_order is not None else "-",
                      f"{r['peak_rss_mb']:.0f}",
                      "yes" if r["ok"] else "NO"))

    for run in report["runs"]:
        latency = f"{run['latency_s'] * 1000:g} ms"
        if run.get("baseline"):
            row(latency, "BASELINE (brief)", run["baseline"], "1.0×")
        speedup = f"{run['speedup']:.1f}×" if run.get("speedup") else "-"
        row(latency, f"labsync c={run['labsync']['concurrency']}", run["labsync"], speedup)
    if report.get("rss"):
        row("0 ms", f"labsync {report['rss']['orders']:,} orders", report["rss"], "-")
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    for run in report["runs"]:
        repeats = run.get("labsync_repeats") or []
        if len(repeats) > 1:
            out.append(f"labsync at {run['latency_s'] * 1000:g} ms, {len(repeats)} runs (the "
                       "table shows the median by CPU): ms/completed " + ", ".join(
                           f"{r['cpu_ms_per_completed']:.2f}" for r in repeats)
                       + "; wall s " + ", ".join(f"{r['wall_s']:.1f}" for r in repeats))
    noop = report["noop"]
    out.append("ms/completed, ms/order: labsync's CPU (user+sys) net of a no-op sync-once, per "
               "completed order and per order asked")
    out.append(f"no-op sync-once (subtracted): {noop['cpu_s']:.2f} s CPU, "
               f"{noop['wall_s']:.2f} s wall, {noop['peak_rss_mb']:.0f} MB")
    if report.get("profile"):
        prof = report["profile"]
        plain = _nearest(report["runs"], prof["latency_s"])
        slower = prof["cpu_s"] / plain["labsync"]["cpu_s"] if plain else 0
        out.append(f"\ncProfile: a labsync pass at {prof['latency_s'] * 1000:g} ms, own CPU time "
                   f"per thread, {prof['profiled_cpu_s']:.1f} s in all: the profiler made the "
                   f"pass use {slower:.1f}× the CPU, most in code with many small calls")
        out.append(f"  {'own CPU s':>9}  {'share':>6}  {'calls':>8}  function")
        for item in prof["top"]:
            out.append(f"  {item['tottime_s']:>9.3f}  {item['share']:>6.1%}  "
                       f"{item['calls']:>8}  {item['function']}")
        out.append("  by package: " + ", ".join(
            f"{a['area']} {a['share']:.0%}" for a in prof["by_area"][:10]))
        if prof.get("threads"):
            threads = prof["threads"]
            per = 1000 / max(threads["completed"], 1)
            main = threads["by_thread_s"].get("main", 0.0) - noop["cpu_s"]
            workers = threads["by_thread_s"].get("labsync-lis", 0.0)
            out.append(f"\nthreads: one more pass with each thread's CPU recorded, "
                       f"{threads['cpu_s']:.1f} s in all: the pass's own thread (pages, "
                       f"claims, every database write; net of the no-op) {main:.2f} s = "
                       f"{main * per:.2f} ms per completed order; the LIS workers "
                       f"{workers:.2f} s = {workers * per:.2f} ms")
        if prof.get("sampled"):
            sampled = prof["sampled"]
            out.append(f"\npy-spy: the same pass sampled while holding the GIL, "
                       f"{sampled['samples']} samples (nearly no overhead; wall time holding "
                       "the GIL, not CPU: see the thread split for CPU)")
            out.append("  by phase: " + ", ".join(
                f"{p['phase']} {p['share']:.0%}" for p in sampled["by_phase"]))
            out.append("  by package: " + ", ".join(
                f"{a['area']} {a['share']:.0%}" for a in sampled["by_area"][:10]))
            for item in sampled["top"]:
                out.append(f"  {item['share']:>6.1%}  {item['function']}")
            out.append("  labsync's functions, with what they call:")
            for item in sampled["labsync_inclusive"]:
                out.append(f"  {item['share']:>6.1%}  {item['function']}")
    out.append("\ntargets:")
    for target in report["targets"]:
        out.append(f"  [{'MET' if target['met'] else 'NOT MET'}] {target['target']}: "
                   f"{target['measured']}")
    return "\n".join(out)


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
