"""Small helpers the engine tests share."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import insert, select

from labsync import logs
from labsync.app import build_sync, open_app
from labsync.config import Config
from labsync.lis.qlab import QlabClient
from labsync.store.tables import local_lab_orders, local_lab_results
from labsync.sync import PassSummary


def run_pass(config: Config, *, due_only: bool = False, now: Any = None) -> PassSummary:
    """One real pass, as `sync-once --all` runs it, but retry waits do not really sleep."""
    lis = QlabClient(config.lis, sleep=lambda _s: None)
    with open_app(config, lis=lis) as app:
        engine = app.sync
        if now is not None:
            engine = build_sync(config, app.engine, lis, app.fitter, now=now)
        return engine.run_pass(due_only=due_only)


def add_orders(db: Any, names: list[str], user_id: int = 7) -> None:
    """Many pending orders at once (one multi-row INSERT), for the larger tests."""
    with db.engine.begin() as conn:
        conn.execute(insert(local_lab_orders),
                     [{"USER_ID": user_id, "EXTERNAL_ORDER_ID": n, "STATUS": "received"}
                      for n in names])


@contextmanager
def restored_logging() -> Iterator[None]:
    """Put back what ``logs.setup`` changes process-wide: root handlers and level, library
    logger levels, the redactor's secrets and headers, structlog's configuration and contextvars."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    lib_levels = {name: logging.getLogger(name).level for name in logs.LIBRARY_LOGGERS}
    known_secrets = list(logs.REDACTOR.secrets)
    known_headers = list(logs.REDACTOR.headers)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        for name, lib_level in lib_levels.items():
            logging.getLogger(name).setLevel(lib_level)
        logs.REDACTOR.secrets[:] = known_secrets
        logs.REDACTOR.headers[:] = known_headers
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()


def results(db: Any, external_id: str) -> list[Any]:
    """The order's result rows, typed (datetimes as datetime on SQLite too)."""
    r, o = local_lab_results, local_lab_orders
    query = (select(r).join(o, o.c.ID == r.c.ORDER_ID).where(o.c.EXTERNAL_ORDER_ID == external_id)
             .order_by(r.c.TEST_CODE, r.c.ID))
    with db.engine.connect() as conn:
        return list(conn.execute(query))


def completed_count(db: Any) -> int:
    """How many of the site's orders are completed."""
    return int(db.scalar("SELECT COUNT(*) FROM local_lab_orders WHERE STATUS = 'completed'"))


def order_row(db: Any, external_id: str) -> Any:
    return db.rows("SELECT * FROM local_lab_orders WHERE EXTERNAL_ORDER_ID = :ext",
                   ext=external_id)[0]


def events(db: Any) -> list[Any]:
    return db.rows("SELECT * FROM b_event ORDER BY ID")


def event_log(db: Any) -> list[Any]:
    return db.rows("SELECT * FROM b_event_log ORDER BY ID")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


RESULTS = [
    {"code": "HGB", "name": "Haemoglobin", "value": 128, "unit": "g/L", "ref_min": "120",
     "ref_max": "160", "abnormal": False, "result_date": "2026-11-20T09:30:00+03:00"},
    {"code": "GLU", "name": "Glucose", "value": "7.9", "unit": "mmol/L", "ref_min": "3.9",
     "ref_max": "6.1", "abnormal": True, "result_date": "2026-11-20T09:30:00+03:00"},
    {"code": "HIV", "name": "HIV 1/2 antibodies", "value": "negative", "unit": None,
     "ref_min": None, "ref_max": None, "abnormal": None, "result_date": "2026-11-20T10:00:00"},
]


_FIELD = re.compile(r's:\d+:"([^"]*)";s:\d+:"([^"]*)";')


def mail_fields(c_fields: str) -> dict[str, str]:
    """A ``b_event.C_FIELDS`` of quote-free values as a dict (the PHP round trip is tested
    with the real php-cli in test_phpserial.py)."""
    return dict(_FIELD.findall(c_fields))
