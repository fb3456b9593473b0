"""One read of the FHIR change feed with nothing new: its LIS requests and labsync's CPU, at
several numbers of pending orders, measured in the benchmark's own process.

For each size the site holds that many pending orders and the fake server one report for
each, last updated three days ago, before the day the first feed read starts from (the
oldest pending order's date minus one day): a state equal to a feed that read them long
ago. One more order completed an hour ago. labsync is built as ``labsync run`` builds it
(``open_app``, the JSON log to a file); a first ``follow_feed()`` reads and applies that
completion, which sets the cursor. Every further read is "nothing new": one search for
what changed after the cursor minus ``overlap``, which answers the one report already
applied, at the same ``versionId``.

CPU is ``time.thread_time()`` of the thread calling ``follow_feed()``: labsync's parsing,
lookups and transactions, and nothing of the fake server, which answers on threads of its
own (``process_cpu_ms`` counts them too). Wall time includes the fake's search, which
scans all its reports, and MariaDB.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bench.fhir_lab import Lab, order_ids
from bench.fhir_site import seed_site
from bench.measure import log
from bench.scratch import reset
from labsync import logs
from labsync.app import open_app
from labsync.config import load


def idle_reads(config_path: Path, engine: Engine, lab: Lab, pdf_dir: Path, *,
               sizes: list[int], repeats: int, workdir: Path) -> list[dict[str, Any]]:
    config = load(config_path)
    measured = []
    with open(workdir / "idle.log", "w", encoding="utf-8") as stream:
        logs.setup(config.log.level, "json", config.secrets(), stream=stream,
                   headers=config.secret_headers())
        for size in sizes:
            log(f"nothing new: {size} pending orders, {repeats} reads")
            measured.append(_one_size(config, engine, lab, pdf_dir, size, repeats))
    return measured


def _one_size(config: Any, engine: Engine, lab: Lab, pdf_dir: Path, size: int,
              repeats: int) -> dict[str, Any]:
    reset(engine, pdf_dir)
    ids = order_ids(size + 1)
    seed_site(engine, ids)
    now = datetime.now(UTC)
    lab.seed(ids, first=now - timedelta(days=3, hours=1), last=now - timedelta(days=3))
    lab.complete(size, at=now - timedelta(hours=1))  # the last order: the cursor's report
    with open_app(config) as app:
        mark = lab.mark()
        first = app.sync.pushed.follow_feed()
        catch_up = lab.requests_since(mark)
        cpu_ms: list[float] = []
        process_ms: list[float] = []
        wall_ms: list[float] = []
        requests: list[int] = []
        listed: list[int] = []
        applied: list[int] = []
        for _ in range(repeats):
            mark = lab.mark()
            cpu, process = time.thread_time(), time.process_time()
            wall = time.perf_counter()
            summary = app.sync.pushed.follow_feed()
            wall_ms.append(1000 * (time.perf_counter() - wall))
            cpu_ms.append(1000 * (time.thread_time() - cpu))
            process_ms.append(1000 * (time.process_time() - process))
            requests.append(sum(lab.requests_since(mark).values()))
            listed.append(summary.orders)
            applied.append(summary.applied)
    return {
        "pending_orders": size,
        "reads": repeats,
        "first_read": {"pages": first.pages, "orders": first.orders, "applied": first.applied,
                       "requests": catch_up},
        "requests_per_read": _spread(requests),
        "reports_listed_per_read": _spread(listed),
        "orders_written_per_read": _spread(applied),
        "last_request": lab.fake.targets()[-1],
        "cpu_ms": _spread(cpu_ms),
        "process_cpu_ms": _spread(process_ms),  # the fake server's threads included
        "wall_ms": _spread(wall_ms),
    }


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}
