"""THE BASELINE: the brief's PHP ``SyncLabResults`` agent, line for line, as a small Python loop.

This is not labsync. It is what the benchmark compares labsync against, written to do
exactly what the brief's PHP does (seeds/lis-bitrix-integration.txt) and no worse:

- one query for every pending order, then one order after another;
- ``GET /orders/{id}/results`` on a new connection (``requests.get`` without a session, with
  ``Connection: close``: ``curl_init``/``curl_close`` per request);
- if completed: one autocommitted ``INSERT`` per result row (``LocalLabResultsTable::add``),
  THEN ``GET /orders/{id}/pdf`` (again a new connection, the whole body in memory, as
  ``CURLOPT_RETURNTRANSFER`` does) and ``file_put_contents``, then ``UPDATE`` the status,
  read the user and ``INSERT`` into ``b_event`` (``CEvent::Send``);
- any exception: one ``INSERT`` into ``b_event_log`` (``CEventLog::Add``), next order.

Its known faults are kept on purpose (inserts before the PDF, so a failed download leaves
rows that the next pass inserts again); the benchmark's LIS never fails, so they do not
show here.

    python -m bench.baseline --db-url mysql+pymysql://root@127.0.0.1:3306/db \\
        --lis-url http://127.0.0.1:8080/v2 --api-key KEY --pdf-dir DIR

Prints one JSON line: orders asked, completed, failed, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pymysql
import requests

TIMEOUT = 30.0


class QlabApiClient:
    """``QlabApiClient`` of the brief: every request on a fresh connection."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {
            "X-Api-Key": api_key,
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Connection": "close",  # curl_close(): nothing is kept alive
        }

    def get_order_results(self, order_id: str) -> dict[str, Any]:
        return self._request(f"/orders/{quote(order_id, safe='')}/results").json() or {}

    def get_result_pdf(self, order_id: str) -> bytes:
        return self._request(f"/orders/{quote(order_id, safe='')}/pdf").content

    def _request(self, path: str) -> requests.Response:
        # requests.get builds and closes a Session (and its connection pool) every call.
        response = requests.get(self.base_url + path, headers=self.headers, timeout=TIMEOUT)
        if response.status_code >= 400:
            raise RuntimeError(f"QLAB API error {response.status_code}: {response.text}")
        return response


def php_serialize(fields: dict[str, str]) -> str:
    """PHP ``serialize()`` of an array of strings, as ``CEvent::Send`` stores ``C_FIELDS``."""
    parts = [f's:{len(k.encode())}:"{k}";s:{len(v.encode())}:"{v}";' for k, v in fields.items()]
    return f"a:{len(fields)}:{{{''.join(parts)}}}"


def _datetime(value: Any) -> str | None:
    """Bitrix's ``DateTime`` of an ISO string, as the site's DATETIME column holds it."""
    if not value:
        return None
    return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%S")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else ""
    return str(value)


def connect(db_url: str) -> pymysql.connections.Connection:
    """One connection for the whole agent, autocommit, empty sql_mode: Bitrix's own setup."""
    parts = urlsplit(db_url.replace("mysql+pymysql://", "mysql://", 1))
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=parts.path.lstrip("/"),
        charset="utf8",
        autocommit=True,
        init_command="SET SESSION sql_mode = ''",
    )


def sync_lab_results(
    db: pymysql.connections.Connection, client: QlabApiClient, pdf_dir: Path, site_id: str
) -> dict[str, Any]:
    """``SyncLabResults()``; returns what it did."""
    counts: dict[str, Any] = {"orders": 0, "completed": 0, "failed": 0}
    with db.cursor() as cur:
        cur.execute(
            "SELECT ID, EXTERNAL_ORDER_ID, USER_ID FROM local_lab_orders"
            " WHERE STATUS IN ('received', 'processing')"
        )
        pending = cur.fetchall()
    for order_id, external_id, user_id in pending:
        counts["orders"] += 1
        try:
            lis_data = client.get_order_results(external_id)
            if lis_data.get("status", "") == "completed":
                with db.cursor() as cur:
                    for test in lis_data.get("results") or []:
                        cur.execute(  # LocalLabResultsTable::add: one autocommitted INSERT
                            "INSERT INTO local_lab_results (ORDER_ID, TEST_CODE, TEST_NAME,"
                            " RESULT_VALUE, RESULT_UNIT, REFERENCE_MIN, REFERENCE_MAX,"
                            " IS_ABNORMAL, RESULT_DATE) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                            (
                                order_id,
                                _text(test["code"]),
                                _text(test["name"]),
                                _text(test["value"]),
                                _text(test.get("unit")),
                                _text(test.get("ref_min")),
                                _text(test.get("ref_max")),
                                "Y" if test.get("abnormal") else "N",
                                _datetime(test["result_date"]),
                            ),
                        )
                pdf = client.get_result_pdf(external_id)
                path = pdf_dir / str(user_id) / f"{external_id}.pdf"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(pdf)  # file_put_contents
                with db.cursor() as cur:
                    cur.execute(
                        "UPDATE local_lab_orders SET STATUS = 'completed', SYNCED_AT = NOW()"
                        " WHERE ID = %s",
                        (order_id,),
                    )
                    cur.execute("SELECT EMAIL, NAME FROM b_user WHERE ID = %s", (user_id,))
                    email, name = cur.fetchone() or (None, None)
                    fields = {
                        "EMAIL": email or "",
                        "NAME": name or "",
                        "ORDER_ID": external_id,
                        "RESULT_URL": f"/personal/lab-results/{order_id}/",
                    }
                    cur.execute(  # CEvent::Send
                        "INSERT INTO b_event (EVENT_NAME, LID, C_FIELDS, DATE_INSERT,"
                        " SUCCESS_EXEC, DUPLICATE) VALUES (%s, %s, %s, NOW(), 'N', 'Y')",
                        ("LAB_RESULTS_READY", site_id, php_serialize(fields)),
                    )
                counts["completed"] += 1
        except Exception as exc:  # noqa: BLE001 - the brief catches every \Exception
            counts["failed"] += 1
            with db.cursor() as cur:
                cur.execute(  # CEventLog::Add
                    "INSERT INTO b_event_log (TIMESTAMP_X, SEVERITY, AUDIT_TYPE_ID, MODULE_ID,"
                    " ITEM_ID, DESCRIPTION) VALUES (NOW(), 'WARNING', 'LAB_SYNC', 'main',"
                    " 'UNKNOWN', %s)",
                    (f"Order {external_id}: {exc}",),
                )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--db-url", required=True, help="mysql+pymysql://user:pass@host:port/db")
    parser.add_argument("--lis-url", required=True, help="the LIS base URL, …/v2")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--pdf-dir", required=True, type=Path)
    parser.add_argument("--site-id", default="s1")
    args = parser.parse_args(argv)
    started = time.monotonic()
    db = connect(args.db_url)
    try:
        client = QlabApiClient(args.lis_url, args.api_key)
        counts = sync_lab_results(db, client, args.pdf_dir, args.site_id)
    finally:
        db.close()
    counts["seconds"] = round(time.monotonic() - started, 3)
    sys.stdout.write(json.dumps(counts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
