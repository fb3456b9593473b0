"""The benchmark's report: the machine it ran on, the issue's targets met or not, the table."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

MB = 1024 * 1024


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
    r100 = _nearest([r for r in runs if r["labsync"].get("little_ratio") is not None], 0.1)
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

