"""Logging: JSON and console lines, library loggers, redaction, and ``order`` on every line."""

from __future__ import annotations

import json
import logging
from collections import namedtuple
from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import pytest
import structlog
from requests.structures import CaseInsensitiveDict

from labsync import logs
from labsync.testing.fake_qlab import Fault
from tests.conftest import API_KEY, add_order, add_user
from tests.helpers import RESULTS, event_log, restored_logging, run_pass

SECRET = "sekret-value-8c2d4e"

Setup = Callable[..., StringIO]


@pytest.fixture
def setup_logs() -> Iterator[Setup]:
    """``setup_logs(fmt=..., secrets=...)`` → the StringIO the lines go to.

    ``logs.setup`` changes process-wide state (the root logger, structlog's configuration, the
    redactor's secrets); all of it is put back afterwards so other tests are not affected.
    """
    with restored_logging():
        logs.REDACTOR.secrets.clear()  # start from what each test configures, nothing else
        structlog.contextvars.clear_contextvars()

        def setup(fmt: str = "json", level: str = "info",
                  secrets: tuple[str, ...] = ()) -> StringIO:
            stream = StringIO()
            logs.setup(level, fmt, secrets, stream=stream)
            return stream

        yield setup


def lines(stream: StringIO) -> list[dict[str, Any]]:
    """Every line of the stream, each parsed as one JSON object."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# -- formats ----------------------------------------------------------------------------------


def test_structlog_line_is_one_json_object_with_event_level_and_timestamp(setup_logs):
    stream = setup_logs(fmt="json")

    structlog.get_logger("labsync.test").info("order.completed", order="A-1", results=12)

    [line] = lines(stream)
    assert line["event"] == "order.completed"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert (line["order"], line["results"]) == ("A-1", 12)


@pytest.mark.parametrize("name", ["urllib3", "apscheduler", "sqlalchemy", "sqlalchemy.pool",
                                  "urllib3.connectionpool"])
def test_library_loggers_come_out_as_json_through_the_same_handler(setup_logs, name):
    stream = setup_logs(fmt="json")

    logging.getLogger(name).warning("pool is full, discarding connection: %s", "api.qlab.ru")

    [line] = lines(stream)
    assert line["event"] == "pool is full, discarding connection: api.qlab.ru"
    assert line["level"] == "warning"
    assert line["logger"] == name
    assert "timestamp" in line


def test_library_debug_chatter_is_dropped(setup_logs):
    stream = setup_logs(fmt="json")

    logging.getLogger("urllib3.connectionpool").info("Starting new HTTP connection (1)")
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT * FROM b_user")
    # apscheduler's INFO is chatter too; its warnings (a run skipped or missed) are not.
    logging.getLogger("apscheduler.scheduler").info("Scheduler started")
    logging.getLogger("apscheduler.scheduler").info(
        "Adding job tentatively -- it will be properly scheduled when the scheduler starts")
    logging.getLogger("apscheduler.executors.default").info('Running job "sync"')
    logging.getLogger("apscheduler.scheduler").warning(
        'Execution of job "sync" skipped: maximum number of running instances reached (1)')

    assert [line["logger"] for line in lines(stream)] == ["apscheduler.scheduler"]
    assert lines(stream)[0]["level"] == "warning"


def test_holding_back_a_logger_keeps_its_lines_for_the_caller_and_out_of_the_output(
        setup_logs):
    stream = setup_logs(fmt="json", secrets=(SECRET,))
    lis = structlog.get_logger("labsync.lis")

    with logs.held("labsync.lis") as held:
        lis.warning("lis.retry", attempt=1, detail=f"HTTP 503 {SECRET}")
        lis.debug("below the level: not held either")
        structlog.get_logger("labsync.sync").info("pass.started")  # another logger: not held
    lis.warning("lis.retry", attempt=2)  # after the block: out as usual

    assert [(e["event"], e.get("attempt")) for e in held] == [("lis.retry", 1)]
    assert held[0]["detail"] == "HTTP 503 ***"  # redacted like any line
    assert [(line["event"], line.get("attempt")) for line in lines(stream)] == [
        ("pass.started", None), ("lis.retry", 2)]


def test_level_setting_drops_lower_lines(setup_logs):
    stream = setup_logs(fmt="json", level="warning")
    log = structlog.get_logger("labsync.test")

    log.info("pass.started")
    log.warning("order.failed", order="A-1")

    assert [line["event"] for line in lines(stream)] == ["order.failed"]


def test_setting_up_twice_does_not_duplicate_lines(setup_logs):
    setup_logs(fmt="json")
    stream = setup_logs(fmt="json")

    structlog.get_logger("labsync.test").info("pass.started")
    logging.getLogger("urllib3").warning("once")

    assert [line["event"] for line in lines(stream)] == ["pass.started", "once"]
    assert sum(getattr(h, "_labsync", False) for h in logging.getLogger().handlers) == 1


def test_console_format_is_readable_key_value_lines(setup_logs):
    stream = setup_logs(fmt="console")

    structlog.get_logger("labsync.test").warning("order.failed", order="A-1", error_kind="auth")
    logging.getLogger("urllib3").warning("connection pool is full")

    first, second = stream.getvalue().splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    assert "order.failed" in first
    assert "warning" in first
    assert "order=A-1" in first and "error_kind=auth" in first
    assert "\x1b[" not in stream.getvalue()  # no colours on something that is not a terminal
    assert "connection pool is full" in second and "urllib3" in second


def test_auto_format_is_json_when_the_stream_is_not_a_terminal(setup_logs):
    stream = setup_logs(fmt="auto")

    structlog.get_logger("labsync.test").info("pass.started", pass_id=3)

    [line] = lines(stream)
    assert (line["event"], line["pass_id"]) == ("pass.started", 3)


# -- redaction --------------------------------------------------------------------------------


def test_configured_secret_is_masked_in_an_event_value(setup_logs):
    stream = setup_logs(secrets=(SECRET,))

    structlog.get_logger("labsync.test").warning(
        "lis.retry", detail=f"HTTP 500: bad key {SECRET}!", **{"what": SECRET})

    text = stream.getvalue()
    assert SECRET not in text
    [line] = lines(stream)
    assert line["detail"] == "HTTP 500: bad key ***!"
    assert line["what"] == "***"


def test_configured_secret_is_masked_inside_nested_dicts_lists_and_tuples(setup_logs):
    stream = setup_logs(secrets=(SECRET,))

    structlog.get_logger("labsync.test").info(
        "lis.answer", body={"errors": [{"msg": f"key {SECRET} refused"}], "echo": (SECRET, 1)})

    assert SECRET not in stream.getvalue()
    [line] = lines(stream)
    assert line["body"] == {"errors": [{"msg": "key *** refused"}], "echo": ["***", 1]}


def test_configured_secret_is_masked_inside_any_other_value(setup_logs):
    stream = setup_logs(secrets=(SECRET,))

    structlog.get_logger("labsync.test").info(
        "lis.request", headers=CaseInsensitiveDict({"Authorization": f"Bearer {SECRET}"}),
        raw=f"bad key {SECRET}".encode(), seen={SECRET})

    assert SECRET not in stream.getvalue()
    assert len(lines(stream)) == 1


def test_namedtuple_value_is_logged_masked_not_a_crash(setup_logs):
    stream = setup_logs(secrets=(SECRET,))
    Attempt = namedtuple("Attempt", "url status")

    structlog.get_logger("labsync.test").info(
        "lis.attempt", attempt=Attempt(f"https://lis/v2?key={SECRET}", 500))

    [line] = lines(stream)
    assert line["attempt"] == ["https://lis/v2?key=***", 500]


def test_secret_in_an_exception_and_its_traceback_is_masked(setup_logs):
    stream = setup_logs(secrets=(SECRET,))
    log = structlog.get_logger("labsync.test")

    try:
        raise RuntimeError(f"LIS said: bad key {SECRET}")
    except RuntimeError as exc:
        log.exception("order.internal_error", order="A-1")
        log.warning("order.failed", error=exc)

    text = stream.getvalue()
    assert SECRET not in text
    first, second = lines(stream)
    assert "Traceback" in first["exception"]
    assert "RuntimeError: LIS said: bad key ***" in first["exception"]
    assert second["error"] == "RuntimeError: LIS said: bad key ***"


def test_secret_in_a_library_loggers_traceback_is_masked(setup_logs):
    stream = setup_logs(secrets=(SECRET,))

    try:
        raise ValueError(f"job failed with {SECRET}")
    except ValueError:
        logging.getLogger("apscheduler.executors.default").exception("Job raised %s", SECRET)

    assert SECRET not in stream.getvalue()
    [line] = lines(stream)
    assert line["event"] == "Job raised ***"
    assert "ValueError: job failed with ***" in line["exception"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_url_password_is_masked_without_being_configured(setup_logs, fmt):
    stream = setup_logs(fmt=fmt)

    structlog.get_logger("labsync.test").error(
        "db.retry", error="cannot connect to mysql+pymysql://labsync:hunter2pw@db:3306/bitrix")
    logging.getLogger("sqlalchemy.pool").warning("dropped https://user:p4ss%40w0rd@lis/v2")

    text = stream.getvalue()
    assert "hunter2pw" not in text and "p4ss" not in text
    assert "mysql+pymysql://labsync:***@db:3306/bitrix" in text
    assert "https://user:***@lis/v2" in text


@pytest.mark.parametrize("header", [
    "X-Api-Key: {key}", "x-api-key={key}", "{{'X-Api-Key': '{key}'}}",
    '{{"X-Api-Key": "{key}", "Accept": "application/json"}}'])
def test_api_key_header_text_is_masked_without_being_configured(setup_logs, header):
    key = "hdrkey-91ab3c"
    stream = setup_logs()

    structlog.get_logger("labsync.test").warning("lis.request", headers=header.format(key=key))
    logging.getLogger("urllib3").warning("sent %s", header.format(key=key))

    assert key not in stream.getvalue()
    assert len(lines(stream)) == 2


def test_short_secrets_are_not_masked_so_words_survive(setup_logs):
    stream = setup_logs(secrets=("s1", "", "abc"))

    structlog.get_logger("labsync.test").info("mail.queued", site="s1", note="abc order")

    [line] = lines(stream)
    assert (line["site"], line["note"]) == ("s1", "abc order")


# -- a real pass where the LIS echoes the key -------------------------------------------------


def _assert_key_nowhere(db, stream: StringIO, key_part: str = API_KEY) -> None:
    assert stream.getvalue(), "the pass logged nothing"
    assert key_part not in stream.getvalue()
    descriptions = [row.DESCRIPTION for row in event_log(db)]
    assert descriptions, "the failure was not written to b_event_log"
    assert all(key_part not in d for d in descriptions)
    errors = [row.LAST_ERROR for row in db.rows("SELECT LAST_ERROR FROM labsync_orders")]
    assert errors and all(e and key_part not in e for e in errors)


@pytest.mark.parametrize("endpoint", ["results", "pdf"])
def test_lis_error_echoing_the_api_key_never_reaches_logs_event_log_or_state(
        db, fake_lis, config, setup_logs, endpoint):
    # The redactor is NOT told the key: nothing on the way may have put it in a message.
    stream = setup_logs(fmt="json")
    add_user(db, 7)
    add_order(db, "LEAK-1", 7)
    fake_lis.add_order("LEAK-1", results=RESULTS)
    fake_lis.inject(None, endpoint, Fault(status=500, body=f"bad key {API_KEY}".encode()),
                    times=None)

    summary = run_pass(config)

    assert summary.failed == 1
    assert any(line["event"] == "lis.retry" for line in lines(stream))
    assert any(line["event"] == "order.failed" for line in lines(stream))
    _assert_key_nowhere(db, stream)


def test_lis_data_echoing_the_api_key_never_reaches_logs_event_log_or_state(
        db, fake_lis, config, setup_logs):
    stream = setup_logs(fmt="json")
    add_user(db, 7)
    add_order(db, "LEAK-2", 7)
    fake_lis.add_order("LEAK-2", results_body=json.dumps(
        {"status": f"bad key {API_KEY}", "results": []}).encode())

    summary = run_pass(config)

    assert summary.failed == 1
    _assert_key_nowhere(db, stream)


def test_lis_data_echoing_the_api_key_at_the_excerpt_limit_leaks_no_part_of_it(
        db, fake_lis, config, setup_logs):
    stream = setup_logs(fmt="json")
    add_user(db, 7)
    add_order(db, "LEAK-3", 7)
    padding = "x" * 185  # repr() quote + 185 + space: the key starts 13 characters before the cut
    fake_lis.add_order("LEAK-3", results_body=json.dumps(
        {"status": f"{padding} {API_KEY}", "results": []}).encode())

    summary = run_pass(config)

    assert summary.failed == 1
    _assert_key_nowhere(db, stream, key_part=API_KEY[:10])


# -- order on every line of an order's work ---------------------------------------------------


def test_every_line_of_an_orders_work_carries_the_order_worker_threads_included(
        db, fake_lis, config, setup_logs):
    stream = setup_logs(fmt="json", level="debug")
    add_user(db, 7)
    add_user(db, 8, email=None)
    long_value = [{**RESULTS[0], "value": "9" * 600}]
    orders = {"ORD-RETRY": 7, "ORD-LONG": 7, "ORD-NOMAIL": 8, "ORD-FAIL": 7, "ORD-WAIT": 7}
    for ext, user_id in orders.items():
        add_order(db, ext, user_id)
        fake_lis.add_order(ext, results=long_value if ext == "ORD-LONG" else RESULTS)
    fake_lis.set_status("ORD-WAIT", "processing")
    fake_lis.inject("ORD-RETRY", "results", Fault(status=503), times=1)
    fake_lis.inject("ORD-FAIL", "results", Fault(status=400), times=None)

    summary = run_pass(config)

    assert (summary.completed, summary.failed, summary.pending) == (3, 1, 1)
    logged = lines(stream)
    per_order = [line for line in logged
                 if line["event"].split(".")[0] in ("order", "mail", "result")
                 or line["event"] == "lis.retry"]
    missing = [line for line in per_order if "order" not in line]
    assert not missing, missing
    assert all(line["order"] in orders for line in per_order)
    events = {(line["event"], line["order"]) for line in per_order}
    assert ("lis.retry", "ORD-RETRY") in events  # logged from a worker thread
    assert ("result.value_fitted", "ORD-LONG") in events
    assert ("mail.skipped", "ORD-NOMAIL") in events
    assert ("order.failed", "ORD-FAIL") in events
    assert ("order.processing", "ORD-WAIT") in events
    assert {o for e, o in events if e == "order.completed"} == {
        "ORD-RETRY", "ORD-LONG", "ORD-NOMAIL"}
    # The pass's own lines belong to no order: the binding does not leak between jobs.
    assert all("order" not in line for line in logged if line["event"].startswith("pass."))
    assert structlog.contextvars.get_contextvars() == {}


def test_a_pool_reset_of_a_dropped_connection_is_one_warning_without_a_traceback(setup_logs):
    stream = setup_logs(fmt="json")
    try:
        raise ConnectionError(2013, "Lost connection to MySQL server during query")
    except ConnectionError:
        logging.getLogger("sqlalchemy.pool.impl.QueuePool").error(
            "Exception during reset or similar", exc_info=True)
    logging.getLogger("sqlalchemy.engine").error("kept as it is", exc_info=False)

    [pool, other] = lines(stream)
    assert pool["level"] == "warning" and "exception" not in pool
    assert pool["event"] == ("Exception during reset or similar: ConnectionError: "
                             "[Errno 2013] Lost connection to MySQL server during query")
    assert "Traceback" not in stream.getvalue()
    assert (other["level"], other["event"]) == ("error", "kept as it is")
