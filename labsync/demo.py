"""``labsync demo``: the whole pipeline on SQLite with the built-in fake QLAB, explained.

It builds a throw-away site database (Bitrix's core tables and the lab tables) in a folder of
its own, seeds a few patients and orders, starts the fake LIS on a free localhost port and
runs one real pass through the same code as production (``labsync.app.open_app``). Then it
prints what each patient now sees under "My tests", where the PDFs landed, the mail events
queued for the site to send, and what the admin event log says.
"""

from __future__ import annotations

import shutil
import stat
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, insert, select

from labsync import logs
from labsync.app import open_app
from labsync.config import Config, from_mapping
from labsync.store.db import init_db, make_engine
from labsync.store.tables import b_event, b_event_log, b_user, local_lab_orders, local_lab_results
from labsync.testing.fake_qlab import FakeQlab, Fault
from labsync.testing.pdfs import sample_pdf

DEMO_KEY = "demo-api-key-not-secret"
_TODAY = date.today().isoformat()

PATIENTS = [  # ID, login, name, last name, e-mail, active
    (101, "anna", "Анна", "Иванова", "anna.ivanova@example.org", "Y"),
    (102, "boris", "Boris", "Petrov", "boris.petrov@example.org", "Y"),
    (103, "clara", "Клара", "Смирнова", None, "Y"),
]

_CBC: list[dict[str, Any]] = [
    {"code": "HGB", "name": "Гемоглобин", "value": 128, "unit": "г/л", "ref_min": 120,
     "ref_max": 160, "abnormal": False, "result_date": f"{_TODAY}T09:30:00+03:00"},
    {"code": "WBC", "name": "Лейкоциты", "value": 11.40, "unit": "10^9/л", "ref_min": 4.0,
     "ref_max": 9.0, "abnormal": True, "result_date": f"{_TODAY}T09:30:00+03:00"},
    {"code": "PLT", "name": "Тромбоциты", "value": 250, "unit": "10^9/л", "ref_min": 150,
     "ref_max": 400, "abnormal": False, "result_date": f"{_TODAY}T09:30:00+03:00"},
]
_GLUCOSE: list[dict[str, Any]] = [
    {"code": "GLU", "name": "Glucose", "value": "7.9", "unit": "mmol/L", "ref_min": "3.9",
     "ref_max": "6.1", "abnormal": True, "result_date": f"{_TODAY}T06:45:00Z"},
    {"code": "HBA1C", "name": "HbA1c", "value": "5.40", "unit": "%", "ref_min": None,
     "ref_max": "6.0", "abnormal": False, "result_date": f"{_TODAY}T06:45:00Z"},
]
_HIV: list[dict[str, Any]] = [
    {"code": "HIV", "name": "ВИЧ 1/2 антитела", "value": "negative", "unit": None,
     "ref_min": None, "ref_max": None, "abnormal": None,
     "result_date": f"{_TODAY}T11:00:00+03:00"}]

# external id, user, LIS status, results, PDF ready?, what it shows
ORDERS: list[tuple[str, int, str, list[dict[str, Any]], bool, str]] = [
    ("QL-1001", 101, "completed", _CBC, True, "completed: results, PDF and a mail"),
    ("QL-1002", 101, "processing", [], False, "still in the lab"),
    ("QL-2001", 102, "completed", _GLUCOSE, True, "completed; one result abnormal"),
    ("QL-2002", 102, "cancelled", [], False, "cancelled by the lab: no mail"),
    ("QL-3001", 103, "completed", _HIV, True, "completed, but the patient has no e-mail"),
    ("QL-3002", 103, "completed", _GLUCOSE, True, "the LIS answers 503 all pass: retried later"),
]


def run_demo(folder: Path, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    folder = folder.resolve()
    db_path, pdf_dir = folder / "labsync-demo.db", folder / "lab-results"
    if folder.exists():
        for leftover in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(pdf_dir, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    logs.setup("info", "console", stream=sys.stderr)
    print(f"labsync demo: everything lives in {folder}", file=out)
    print(f"  site database (SQLite): {db_path}", file=out)
    print(f"  PDF folder:             {pdf_dir}", file=out)

    with FakeQlab(api_key=DEMO_KEY) as lis:
        for ext, _user, status, results, pdf_ready, _story in ORDERS:
            lis.add_order(ext, status=status, results=results,
                          pdf=sample_pdf(f"Lab results {ext}") if pdf_ready else None)
        lis.inject("QL-3002", "results", Fault(status=503), times=None)
        config = _config(db_path, pdf_dir, lis.base_url)
        engine = make_engine(config.database)
        init_db(engine, with_bitrix=True)
        _seed_site(engine)
        print(f"  fake QLAB LIS:          {lis.base_url} (seeded with {len(ORDERS)} orders)\n",
              file=out)
        print("Orders waiting on the site before the pass:", file=out)
        for ext, user_id, _s, _r, _p, story in ORDERS:
            print(f"  {ext} (user {user_id}): {story}", file=out)
        print("\nRunning one pass (log lines on stderr)...\n", file=out)
        out.flush()
        with open_app(config) as app:
            summary = app.sync.run_pass()
        print(f"Pass summary: checked {summary.checked}, completed {summary.completed}, "
              f"cancelled {summary.cancelled}, still pending {summary.pending}, "
              f"failed {summary.failed} (retried next pass), mail events {summary.events}\n",
              file=out)
        _print_accounts(engine, out)
        _print_mail_and_log(engine, out)
        engine.dispose()
    print("Run it again: `labsync demo`. Deploy it for real: see README.md.", file=out)
    return 0


def _config(db_path: Path, pdf_dir: Path, base_url: str) -> Config:
    return from_mapping({
        "database": {"url": f"sqlite:///{db_path}"},
        "site": {"timezone": "Europe/Moscow"},
        "lis": {"adapter": "qlab", "base_url": base_url, "api_key": DEMO_KEY,
                "retry_attempts": 2, "retry_max_seconds": 2},
        "pdf": {"dir": str(pdf_dir)},
        "notify": {"site_id": "s1"},
    }, env={}, source="<demo>")


def _seed_site(engine: Engine) -> None:
    with engine.begin() as conn:
        for user_id, login, name, last, email, active in PATIENTS:
            conn.execute(insert(b_user).values(
                ID=user_id, LOGIN=login, NAME=name, LAST_NAME=last, EMAIL=email,
                ACTIVE=active, DATE_REGISTER=datetime(2025, 3, 1)))
        for ext, user_id, *_ in ORDERS:
            conn.execute(insert(local_lab_orders).values(
                USER_ID=user_id, EXTERNAL_ORDER_ID=ext, ORDER_DATE=date.today(),
                STATUS="received"))


def _print_accounts(engine: Engine, out: TextIO) -> None:
    o, r = local_lab_orders, local_lab_results
    with engine.connect() as conn:
        for user_id, _login, name, last, email, _active in PATIENTS:
            print(f'=== {name} {last} (user {user_id}, {email or "no e-mail"}): "My tests" ===',
                  file=out)
            for order in conn.execute(select(o).where(o.c.USER_ID == user_id)
                                      .order_by(o.c.ID.desc())):
                print(f"  Order {order.EXTERNAL_ORDER_ID} of {order.ORDER_DATE}: "
                      f"{order.STATUS}", file=out)
                if order.STATUS != "completed":
                    continue
                rows = conn.execute(select(r).where(r.c.ORDER_ID == order.ID)
                                    .order_by(r.c.TEST_NAME)).all()
                for row in rows:
                    ref = _ref(row.REFERENCE_MIN, row.REFERENCE_MAX)
                    flag = "  << ABNORMAL" if row.IS_ABNORMAL == "Y" else ""
                    value = f"{row.RESULT_VALUE} {row.RESULT_UNIT or ''}".strip()
                    print(f"    {row.TEST_NAME:<22} {value:<18} {ref:<16} "
                          f"{row.RESULT_DATE:%Y-%m-%d %H:%M}{flag}", file=out)
                if rows and rows[0].PDF_PATH:
                    pdf = Path(rows[0].PDF_PATH)
                    mode = stat.S_IMODE(pdf.stat().st_mode)
                    print(f"    PDF form: {pdf} ({pdf.stat().st_size} bytes, mode {mode:04o})",
                          file=out)
            print(file=out)


def _ref(low: str | None, high: str | None) -> str:
    if low and high:
        return f"ref {low}-{high}"
    if high:
        return f"ref <= {high}"
    if low:
        return f"ref >= {low}"
    return ""


def _print_mail_and_log(engine: Engine, out: TextIO) -> None:
    with engine.connect() as conn:
        mails = conn.execute(select(b_event).order_by(b_event.c.ID)).all()
        log_rows = conn.execute(select(b_event_log).order_by(b_event_log.c.ID)).all()
    print(f"Mail events queued in b_event for the site to send ({len(mails)}):", file=out)
    for mail in mails:
        print(f"  #{mail.ID} {mail.EVENT_NAME} site {mail.LID} sent={mail.SUCCESS_EXEC}", file=out)
        print(f"     C_FIELDS: {mail.C_FIELDS}", file=out)
    print(f"\nAdmin event log (b_event_log) entries ({len(log_rows)}):", file=out)
    for row in log_rows:
        print(f"  {row.SEVERITY} {row.AUDIT_TYPE_ID} {row.ITEM_ID}: {row.DESCRIPTION}", file=out)
    print(file=out)
