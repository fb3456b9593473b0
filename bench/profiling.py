"""``bench.perf --profile``: where labsync's CPU goes in one pass.

``profile_child`` and ``threads_child`` run ``labsync`` inside the benchmark's child process
(``python -m bench.perf _profile|_threads OUT ARGS``): every thread under a CPU-time
cProfile, or each thread's CPU recorded. ``profile_report`` and ``sampled_report`` (py-spy's
raw stacks) turn what they wrote into the top items, by package and by pass phase.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any


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

