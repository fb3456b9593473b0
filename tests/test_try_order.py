"""``labsync try-order``: one order asked, what labsync would write shown, nothing written;
for every adapter (the mapped one over REST and SOAP, and QLAB)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from labsync import cli
from labsync.model import OrderStatus, Patient, TestResult
from labsync.phpserial import serialize_strings
from labsync.store.tables import metadata
from labsync.testing.fake_qlab import FakeQlab
from labsync.testing.fake_rest_lims import FakeRestLims
from labsync.testing.lims_server import LimsServer
from labsync.testing.pdfs import sample_pdf
from tests.conftest import API_KEY, Db, add_order, add_user
from tests.helpers import restored_logging
from tests.mapped_support import TOKEN, fake_of, write_example

MSK = timezone(timedelta(hours=3))
GLU = TestResult(code="GLU", name="Глюкоза", value="6.30", unit="ммоль/л", ref_min="3.90",
                 ref_max="6.10", abnormal=True,
                 result_date=datetime(2024, 5, 14, 10, 30, tzinfo=MSK))
NOTE = TestResult(code=None, name="Комментарий", value="<5")
PATIENT = Patient(phone="+79991234567", last_name="Иванова", first_name="Анна")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with restored_logging():
        yield


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def snapshot(db: Db) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table labsync knows, to show that nothing changed."""
    with db.engine.connect() as conn:
        return {table.name: sorted((tuple(row) for row in conn.execute(select(table))),
                                   key=repr)
                for table in metadata.sorted_tables}


def temp_leftovers() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("labsync-try")}


@pytest.fixture
def medwork() -> Iterator[LimsServer]:
    with fake_of("medwork-rest") as fake:
        yield fake


def site_with_order(db: Db, external_id: str = "T-1") -> int:
    add_user(db, 7, email="anna@example.org", name="Анна")
    return add_order(db, external_id, 7)


def mail_fields(out: str) -> dict[str, str]:
    """The C_FIELDS the dry run printed under its mail line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  mail: LAB_"))
    fields = {}
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        key, _, value = line.strip().partition(" ")
        fields[key] = value.strip()
    return fields


# -- the mapped adapter ---------------------------------------------------------------------


def test_a_completed_order_shows_its_rows_pdf_and_mail_and_writes_nothing(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pdf = sample_pdf("T-1", size=40_000)
    medwork.add_order("T-1", results=[GLU, NOTE], pdf=pdf, patient=PATIENT)
    local_id = site_with_order(db)
    config = write_example("medwork-rest", medwork, db.url, tmp_path)
    before, leftovers = snapshot(db), temp_leftovers()

    status, out, _err = run(capsys, "--config", str(config), "try-order", "T-1")

    assert status == 0
    assert "LIS status: completed    ← status: order.status" in out
    assert f"site: local_lab_orders.ID {local_id}, USER_ID 7, STATUS received" in out
    assert "local_lab_orders.STATUS → completed, SYNCED_AT → now" in out
    assert "local_lab_results: 2 to insert, 0 to update, 0 to delete" in out
    for line in ("RESULT_VALUE  '6.30'", "← results.value: result", "REFERENCE_MIN '3.90'",
                 "IS_ABNORMAL   'Y'", "← results.abnormal: out_of_range",
                 "RESULT_DATE   2024-05-14 10:30:00", "TEST_CODE     NULL"):
        assert line in out
    pdf_path = tmp_path / "lab-results" / "7" / "T-1.pdf"
    assert f"PDF: {len(pdf)} bytes" in out and "checked (starts with %PDF-" in out
    assert f"a pass would put it at {pdf_path}" in out
    assert out.rstrip().endswith("nothing was written.")
    # Nothing written: not a row, not a file, no temporary folder left.
    assert snapshot(db) == before
    assert not (tmp_path / "lab-results").exists() or not any(
        p.is_file() for p in (tmp_path / "lab-results").rglob("*"))
    assert temp_leftovers() == leftovers
    # The mail it showed is the mail a pass then queues.
    shown = mail_fields(out)
    assert shown["ORDER_ID"] == "T-1" and shown["LOCAL_ORDER_ID"] == str(local_id)
    assert run(capsys, "--config", str(config), "sync-once")[0] == 0
    (queued,) = db.rows("SELECT C_FIELDS FROM b_event")
    assert queued.C_FIELDS == serialize_strings(shown)
    assert pdf_path.read_bytes() == pdf


def test_raw_prints_the_answer_as_received_with_the_credential_masked(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    echoing = TestResult(code="ECHO", name="echo", value=f"Token {TOKEN}")  # the LIS echoes it
    medwork.add_order("T-2", status=OrderStatus.PROCESSING, results=[echoing])
    config = write_example("medwork-rest", medwork, db.url, tmp_path)

    status, out, err = run(capsys, "--config", str(config), "try-order", "T-2", "--raw")

    assert status == 0
    assert "LIS answer as received:" in out
    assert '"number": "T-2", "status": "IN_WORK"' in out
    assert TOKEN not in out + err and '"result": "***"' in out
    assert "a pass would: keep the order pending" in out
    assert "site: it is not in local_lab_orders; shown as a new order" in out


def test_an_unknown_status_is_a_problem_naming_it_and_the_raw_answer_still_shows(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medwork.add_order("T-3", results=[GLU], raw_status="ON_HOLD")
    config = write_example("medwork-rest", medwork, db.url, tmp_path)

    status, out, _err = run(capsys, "--config", str(config), "try-order", "T-3", "--raw")

    assert status == 1
    assert '"status": "ON_HOLD"' in out
    assert "problems (1):" in out
    assert ("bad_data: order T-3: status 'ON_HOLD' is not in lis.mapped.status_map (known: "
            "'NEW', 'IN_WORK', 'DONE', 'CANCELED')") in out


def test_an_order_the_lis_does_not_know_is_a_problem(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_example("medwork-rest", medwork, db.url, tmp_path)

    status, out, _err = run(capsys, "--config", str(config), "try-order", "NOPE")

    assert status == 1
    assert "unknown_order: order NOPE: the order is unknown to the LIS (HTTP 404)" in out


def test_a_pdf_not_ready_is_shown_and_the_order_waits_for_it(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medwork.add_order("T-4", results=[GLU], pdf=None)
    site_with_order(db, "T-4")
    config = write_example("medwork-rest", medwork, db.url, tmp_path)

    status, out, _err = run(capsys, "--config", str(config), "try-order", "T-4")

    assert status == 0
    assert "PDF: not ready yet" in out
    assert "local_lab_orders.STATUS → processing" in out and "mail: none" in out


def test_a_pdf_that_is_no_pdf_is_a_problem(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medwork.add_order("T-5", results=[GLU], pdf=b"<html>oops</html>")
    config = write_example("medwork-rest", medwork, db.url, tmp_path)

    status, out, _err = run(capsys, "--config", str(config), "try-order", "T-5")

    assert status == 1 and "PDF: PDF of order T-5: not a PDF" in out


def test_a_soap_order_shows_what_each_expression_gave(
        db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with fake_of("calab-soap") as lims:
        lims.add_order("S-1", results=[GLU], pdf=sample_pdf("soap"), patient=PATIENT)
        site_with_order(db, "S-1")
        config = write_example("calab-soap", lims, db.url, tmp_path)
        before = snapshot(db)

        status, out, err = run(capsys, "--config", str(config), "try-order", "S-1", "--raw")

    assert status == 0, out
    assert "<tns:StateCode>3</tns:StateCode>" in out  # the envelope as received
    assert "LIS status: completed    ← status: StateCode" in out
    assert "REFERENCE_MIN '3.90'" in out and "← results.ref_min: RefLow" in out
    assert "fetched by the order's id" in out
    assert TOKEN not in out + err
    assert snapshot(db) == before


def test_an_unusable_mapping_exits_2_listing_its_problems(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_example("medwork-rest", medwork, db.url, tmp_path)
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('status = "order.status"', 'status = "order.[status"')
                      .replace('value = "result"', 'value = "result)"'), encoding="utf-8")

    status, out, err = run(capsys, "--config", str(config), "try-order", "T-1")

    assert status == 2 and out == ""
    assert "lis.mapped.status: 'order.[status' is not a JMESPath expression" in err
    assert "lis.mapped.results.value: 'result)' is not a JMESPath expression" in err
    assert "Traceback" not in err


def test_rest_without_base_url_exits_2_naming_the_key(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_example("medwork-rest", medwork, db.url, tmp_path)
    assert isinstance(medwork, FakeRestLims)
    config.write_text(config.read_text(encoding="utf-8").replace(
        f'base_url = "{medwork.base_url}"', ""), encoding="utf-8")

    status, _out, err = run(capsys, "--config", str(config), "try-order", "T-1")

    assert status == 2
    assert 'lis.base_url: required with lis.mapped.transport = "rest"' in err


# -- QLAB -------------------------------------------------------------------------------------


def test_qlab_orders_are_tried_the_same_way_its_key_masked(
        db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_cli import write_config

    with FakeQlab(api_key=API_KEY) as fake:
        body = (b'{"id": "Q-1", "status": "completed", "results": [{"code": "K", "name": '
                b'"Kalium", "value": 5.40, "unit": "' + API_KEY.encode() + b'"}]}')
        fake.add_order("Q-1", results_body=body, pdf=sample_pdf("qlab"))
        site_with_order(db, "Q-1")
        config = write_config(tmp_path / "labsync.toml", db_url=db.url,
                              base_url=fake.base_url, pdf_dir=tmp_path / "lab-results")
        before = snapshot(db)

        status, out, err = run(capsys, "--config", str(config), "try-order", "Q-1", "--raw")

    assert status == 0, out
    assert '"value": 5.40' in out and API_KEY not in out + err
    assert "RESULT_VALUE  '5.40'" in out and "RESULT_UNIT   '***'" in out
    assert "LIS status: completed\n" in out  # QLAB names no expressions
    assert "fetched by the order's id" in out
    assert snapshot(db) == before


def test_an_adapter_without_the_raw_hook_is_asked_as_a_pass_asks(
        db: Db, medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from labsync.lis.mapped.client import MappedClient

    medwork.add_order("T-6", status=OrderStatus.RECEIVED)
    monkeypatch.delattr(MappedClient, "answer_as_received")
    config = write_example("medwork-rest", medwork, db.url, tmp_path)

    status, out, _err = run(capsys, "--config", str(config), "try-order", "T-6", "--raw")

    assert status == 0
    assert "(this adapter cannot show its answer as received)" in out
    assert "LIS status: received" in out


def test_the_database_missing_is_no_problem_for_the_mapping(
        medwork: LimsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medwork.add_order("T-7", results=[GLU], pdf=sample_pdf())
    missing = tmp_path / "no-such.db"
    config = write_example("medwork-rest", medwork, f"sqlite:///{missing}", tmp_path)

    status, out, _err = run(capsys, "--config", str(config), "try-order", "T-7")

    assert status == 0
    assert f"site: the database {missing} does not exist" in out
    assert not missing.exists()
    assert str(tmp_path / "lab-results" / "<USER_ID>" / "T-7.pdf") in out

