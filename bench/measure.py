"""Measuring the benchmark's child processes: wall time, CPU and peak RSS; the fake LIS in a
process of its own; the CPU of the whole machine and of the MariaDB server.

Used by ``perf.py`` and ``floor.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "QL-"  # the fake LIS's order ids: QL-000001, …


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)



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
