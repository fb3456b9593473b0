"""What labsync's building blocks cost in CPU, each on its own: the floor under the pass's figure.

    .venv/bin/python -m bench.floor [--admin-url URL] [--requests 1000]

Measures, with the process's own CPU clock (user+sys), against the fake LIS at 0 ms and the
test suite's MariaDB:

- one GET of an order's results: through ``Session.request``, through labsync's transport
  (a hand-built request sent with ``Session.send``), and through urllib3 alone;
- ``QlabClient.fetch_order`` whole (GET, JSON, validation);
- the observe step (results, and the PDF of the completed half) with 1 and with 16 worker
  threads: the difference is what the threads' GIL hand-offs cost; then the same with every
  order completed, which is the observe step's share of a completed order by itself;
- a 10-column locking read plus an UPDATE by primary key: through SQLAlchemy with a prebuilt
  statement, through ``exec_driver_sql``, and on the raw PyMySQL cursor.

docs/performance.md ("The floor") has the figures. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import resource
import secrets
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import urllib3
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.engine import make_url

from bench.measure import FakeLis
from bench.scratch import ADMIN_URL, scratch_database
from labsync.config import DatabaseConfig, LisConfig, Secret
from labsync.lis.http import HttpTransport
from labsync.lis.qlab import QlabClient
from labsync.model import OrderStatus
from labsync.pdfs import PdfStore
from labsync.store.db import make_engine
from labsync.store.tables import labsync_orders
from labsync.testing.fake_qlab import seed_plan

PREFIX = "QL-"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_call(work: Callable[[int], Any], count: int) -> float:
    """CPU microseconds per call of ``work(i)``, after one warm-up call."""
    work(0)
    start = cpu()
    for i in range(count):
        work(i)
    return (cpu() - start) / count * 1e6


def http_figures(base_url: str, api_key: str, ids: list[str], count: int) -> dict[str, float]:
    headers = {"X-Api-Key": api_key, "Accept": "application/json"}
    session = requests.Session()
    session.trust_env = False
    session.headers.update(headers)
    pool = urllib3.PoolManager(maxsize=4)
    client_config = LisConfig(adapter="qlab", base_url=base_url, api_key=Secret(api_key))
    client = QlabClient(client_config)
    transport = HttpTransport(client_config)  # a GET and its JSON, without the validation

    def via_request(i: int) -> None:
        url = f"{base_url}/orders/{ids[i % len(ids)]}/results"
        with session.request("GET", url, timeout=(5, 30), stream=True,
                             allow_redirects=False) as response:
            response.raw.read()

    def via_labsync(i: int) -> None:
        transport.get_json(f"/orders/{ids[i % len(ids)]}/results", what="bench")

    def via_urllib3(i: int) -> None:
        response = pool.request("GET", f"{base_url}/orders/{ids[i % len(ids)]}/results",
                                headers=headers, preload_content=False, retries=False,
                                redirect=False, timeout=urllib3.Timeout(connect=5, read=30))
        response.read()
        response.release_conn()

    figures = {
        "GET, Session.request, body read": per_call(via_request, count),
        "GET + JSON, labsync's transport (Session.send)": per_call(via_labsync, count),
        "GET, urllib3 alone, body read": per_call(via_urllib3, count),
        "QlabClient.fetch_order (GET, JSON, validation)": per_call(
            lambda i: client.fetch_order(ids[i % len(ids)]), count),
    }
    transport.close()
    client.close()
    return figures


def observe_figure(base_url: str, api_key: str, ids: list[str], workers: int) -> float:
    """CPU ms per order of the observe step over ``ids`` (those the LIS has completed with a
    200 KB PDF)."""
    client = QlabClient(LisConfig(adapter="qlab", base_url=base_url, api_key=Secret(api_key),
                                  max_concurrency=16))
    with tempfile.TemporaryDirectory() as folder:
        store = PdfStore(Path(folder), 10_000_000)

        def observe(external_id: str) -> None:
            order = client.fetch_order(external_id)
            if order.status is OrderStatus.COMPLETED:
                store.discard(store.stage(1, external_id, client))

        observe(ids[0])
        start = cpu()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(observe, ids))
        spent = cpu() - start
    client.close()
    return spent / len(ids) * 1000


def db_figures(admin_url: Any, count: int) -> dict[str, float]:
    columns = ("ORDER_ID", "LEASE_OWNER", "POLLS", "FIRST_SEEN_AT", "STALE_AT", "NOTIFIED_AT",
               "LAST_POLL_AT", "NEXT_POLL_AT", "LIS_STATUS", "RESULTS_COUNT")
    read = (select(*[labsync_orders.c[c] for c in columns])
            .where(labsync_orders.c.ORDER_ID == bindparam("order_id")).with_for_update())
    write = update(labsync_orders).where(labsync_orders.c.ORDER_ID == bindparam("b_id"))
    now = datetime(2026, 11, 25, 12)

    def params(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"order_id": i % 1000 + 1}, {"b_id": i % 1000 + 1, "LAST_POLL_AT": now,
                                            "POLLS": i, "LIS_STATUS": "processing"}

    with scratch_database(admin_url) as admin_engine:  # the site's tables too: unused here
        engine = make_engine(DatabaseConfig(url=admin_engine.url))
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
            conn.execute(insert(labsync_orders), [
                {"ORDER_ID": i, "EXTERNAL_ORDER_ID": f"{PREFIX}{i}", "FIRST_SEEN_AT": now}
                for i in range(1, 1001)])
        read_sql = str(read.compile(dialect=engine.dialect))
        write_sql = str(write.compile(dialect=engine.dialect,
                                      column_keys=["LAST_POLL_AT", "POLLS", "LIS_STATUS"]))
        figures: dict[str, float] = {}
        with engine.connect() as conn, conn.begin():
            def prebuilt(i: int) -> None:
                one, two = params(i)
                conn.execute(read, one).first()
                conn.execute(write, two)

            def driver_sql(i: int) -> None:
                one, two = params(i)
                conn.exec_driver_sql(read_sql, one).first()
                conn.exec_driver_sql(write_sql, two)

            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]

            def raw(i: int) -> None:
                one, two = params(i)
                cursor.execute(read_sql, one)
                cursor.fetchone()
                cursor.execute(write_sql, two)

            figures["locking read + UPDATE, SQLAlchemy prebuilt"] = per_call(prebuilt, count)
            figures["locking read + UPDATE, exec_driver_sql"] = per_call(driver_sql, count)
            figures["locking read + UPDATE, raw PyMySQL cursor"] = per_call(raw, count)
        engine.dispose()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--requests", type=int, default=1000, help="calls per figure (1000)")
    parser.add_argument("--orders", type=int, default=1000,
                        help="orders in the observe step (1000)")
    args = parser.parse_args(argv)
    api_key = secrets.token_hex(12)
    with tempfile.TemporaryDirectory() as workdir:
        lis = FakeLis(Path(workdir), api_key, orders=args.orders, latency=0.0,
                      pdf_size=200_000, completed_ratio=0.5, results=10)
        try:
            ids = [external_id for external_id, _ in seed_plan(args.orders, prefix=PREFIX)]
            rows = [(name, value, "µs") for name, value in
                    http_figures(lis.base_url, api_key, ids, args.requests).items()]
            for workers in (1, 16):
                rows.append((f"observe step, {workers} worker(s), per order (half with PDF)",
                             observe_figure(lis.base_url, api_key, ids, workers), "ms"))
        finally:
            lis.stop()
        # Every order completed: the observe step's cost per completed order by itself.
        lis = FakeLis(Path(workdir), api_key, orders=args.orders, latency=0.0,
                      pdf_size=200_000, completed_ratio=1.0, results=10)
        try:
            for workers in (1, 16):
                rows.append((f"observe step, {workers} worker(s), per order (all with PDF)",
                             observe_figure(lis.base_url, api_key, ids, workers), "ms"))
        finally:
            lis.stop()
    rows += [(name, value, "µs") for name, value in
             db_figures(make_url(args.admin_url), args.requests).items()]
    width = max(len(name) for name, _, _ in rows)
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:8.2f} {unit}" if unit == "ms"
              else f"{name:<{width}}  {value:8.0f} {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
