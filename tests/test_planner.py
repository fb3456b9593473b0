"""The planner on its own: pure decisions, property-tested with hypothesis.

A small simulator carries a plan out on an in-memory copy of the order (``_after``), the
way ``labsync.execute`` does on the database, so the properties can be checked without
I/O: a plan carried out and planned again writes nothing new; an older answer never
replaces a newer one; a plan never writes an order that is not its own.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from labsync import planner
from labsync.model import LisOrder, OrderStatus, TestResult
from labsync.pdfs import StagedPdf
from labsync.planner import Answer, Local, Plan, Seen
from labsync.store.db import TextFitter
from labsync.store.orders import PendingOrder

NOW = datetime(2026, 12, 1, 9, 0)
OWNER = "me:1:aaaaaaaaaaaa"
STATE_COLUMNS = ("LEASE_OWNER", "POLLS", "FIRST_SEEN_AT", "STALE_AT", "NOTIFIED_AT",
                 "COMPLETED_AT", "PDF_PATH", "RESULTS_VERSION", "UPDATE_NOTIFIED_VERSION",
                 "RESULTS_HASH", "RESULTS_COUNT", "FAILURES", "FAILURES_TOTAL", "LAST_ERROR")


def _policy(*, required: bool = True, wait: float = 0.0) -> planner.Policy:
    return planner.policy(zone=ZoneInfo("Europe/Moscow"), fitter=TextFitter(), interval=900,
                          stale_after=30 * 86400, recheck_days=14, pdf_required=required,
                          pdf_wait=wait)


def _order(status: str | None = "received", **extra: Any) -> PendingOrder:
    return PendingOrder(id=11, external_id="P-1", user_id=7, status=status, order_date=None,
                        **extra)


def _pdf() -> StagedPdf:
    return StagedPdf(temp_path=Path("/pdfs/7/.P-1.x.part"), final_path=Path("/pdfs/7/P-1.pdf"),
                     size=1000, sha256="ab" * 32)


def _state(**values: Any) -> SimpleNamespace:
    base = dict.fromkeys(STATE_COLUMNS)
    base.update(POLLS=0, FAILURES=0, FAILURES_TOTAL=0, FIRST_SEEN_AT=NOW - timedelta(hours=1))
    base.update(values)
    return SimpleNamespace(**base)


def _after(local: Local, plan: Plan) -> Local:
    """The order as the executor would leave it after carrying ``plan`` out."""
    if not plan.writes:
        return local
    stored = {int(r["ID"]): dict(r) for r in local.stored}
    for row_id, changed in plan.rows.update:
        stored[row_id].update(changed)
    for row_id in plan.rows.delete:
        del stored[row_id]
    next_id = max(stored, default=100) + 1
    for i, row in enumerate(plan.rows.insert):
        stored[next_id + i] = {**row, "ID": next_id + i}
    assert local.current is not None
    status = plan.status or local.current.status
    values = {} if local.state is None else dict(vars(local.state))
    if local.state is None:
        values = vars(_state(FIRST_SEEN_AT=NOW))
    values.update(plan.state)
    if plan.mail is not None and plan.mail.kind == "ready":
        values["NOTIFIED_AT"] = NOW
    state = SimpleNamespace(**values)
    completed = status == "completed"
    asked = PendingOrder(
        id=local.asked.id, external_id=local.asked.external_id, user_id=local.asked.user_id,
        status=status, order_date=None, recheck=completed, results_hash=state.RESULTS_HASH,
        first_seen_at=state.FIRST_SEEN_AT, stale_at=state.STALE_AT,
        results_count=len(stored), pdf_missing=completed and state.PDF_PATH is None)
    return Local(asked, asked, state, list(stored.values()), plan.seen or local.seen, OWNER)


# -- strategies --------------------------------------------------------------------------------

_codes = st.sampled_from(["GLU", "HGB", "ALT", None])
_text = st.text(alphabet="abc<>5.0 ", min_size=0, max_size=6)
_result = st.builds(TestResult, code=_codes, name=st.sampled_from(["Glucose", "Hb", "x"]),
                    value=_text, unit=st.sampled_from([None, "g/l"]),
                    abnormal=st.booleans())
_results = st.lists(_result, max_size=5).map(tuple)
_status = st.sampled_from(list(OrderStatus))
_moment = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 12, 1),
                       timezones=st.just(UTC))


@st.composite
def _situations(draw: st.DrawFn) -> tuple[Local, Answer, planner.Policy]:
    required = draw(st.booleans())
    policy = _policy(required=required, wait=0.0 if required else draw(
        st.sampled_from([0.0, 3600.0])))
    lis = LisOrder("P-1", draw(_status), draw(_results), changed_at=draw(st.none() | _moment),
                   version=draw(st.none() | st.sampled_from(["1", "2"])))
    pdf = _pdf() if lis.status is OrderStatus.COMPLETED and draw(st.booleans()) else None
    if required and lis.status is OrderStatus.COMPLETED and pdf is None:
        pdf = _pdf()  # the pass never plans a required form that is missing: it fails first
    earlier = LisOrder("P-1", OrderStatus.PROCESSING, draw(_results))
    stored = []
    if draw(st.booleans()):  # the site already shows preliminary results
        rows, _ = planner.rows_of(earlier, None, policy)
        stored = [{**row, "ID": 200 + i} for i, row in enumerate(rows)]
    order = _order(draw(st.sampled_from(["received", "processing", None])),
                   results_count=len(stored))
    state = _state(RESULTS_COUNT=len(stored)) if draw(st.booleans()) or stored else None
    return Local(order, order, state, stored, None, OWNER), Answer(lis, pdf), policy


# -- properties ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(_situations())
def test_a_plan_carried_out_then_planned_again_writes_nothing_new(situation):
    local, answer, policy = situation
    first = planner.plan(local, answer, NOW, policy)
    again = planner.plan(_after(local, first), answer, NOW + timedelta(seconds=1), policy)
    assert not again.rows.any, again.rows
    assert again.mail is None
    assert again.publish is None or again.publish == answer.pdf
    assert again.status in (None, _after(local, first).asked.status)
    assert again.outcome not in ("completed", "corrected", "cancelled")


@settings(max_examples=200, deadline=None)
@given(_situations(), st.integers(min_value=1, max_value=10 ** 6))
def test_an_older_answer_never_replaces_a_newer_one(situation, seconds_older):
    local, answer, policy = situation
    newer = datetime(2026, 11, 30, 12, 0)
    local = Local(local.asked, local.current, local.state, local.stored,
                  Seen(changed_at=newer, version="9"), OWNER)
    older = LisOrder("P-1", answer.order.status, answer.order.results,
                     changed_at=(newer - timedelta(seconds=seconds_older)).replace(tzinfo=UTC),
                     version="8")
    result = planner.plan(local, Answer(older, answer.pdf), NOW, policy)
    assert result.outcome == "skipped" and not result.writes
    assert not result.rows.any and result.mail is None and result.status is None
    assert result.state == {} and result.seen is None


@settings(max_examples=200, deadline=None)
@given(_situations(), st.sampled_from(["user", "external_id", "gone", "lease"]))
def test_no_plan_writes_an_order_that_is_not_its_own(situation, what):
    local, answer, policy = situation
    asked = local.asked
    if what == "user":
        current = PendingOrder(asked.id, asked.external_id, 8, asked.status, None)
    elif what == "external_id":
        current = PendingOrder(asked.id, "P-2", asked.user_id, asked.status, None)
    else:
        current = None if what == "gone" else asked
    state = _state(LEASE_OWNER="another:2:bbbbbbbbbbbb") if what == "lease" else local.state
    result = planner.plan(Local(asked, current, state, local.stored, None, OWNER), answer,
                          NOW, policy)
    assert result.outcome == "skipped" and not result.writes
    assert result.state == {} and not result.rows.any and result.mail is None


@settings(max_examples=200, deadline=None)
@given(_situations())
def test_rows_name_no_order_and_only_this_orders_pdf(situation):
    local, answer, policy = situation
    result = planner.plan(local, answer, NOW, policy)
    for row in result.rows.insert:
        assert "ORDER_ID" not in row and "ID" not in row  # the executor adds its own order
        assert row["PDF_PATH"] in (None, "/pdfs/7/P-1.pdf")
    stored_ids = {r["ID"] for r in local.stored}
    assert {i for i, _ in result.rows.update} <= stored_ids
    assert set(result.rows.delete) <= stored_ids


# -- the PDF policy ------------------------------------------------------------------------------


GLUCOSE = (TestResult("GLU", "Glucose", "5.40"),)


def _completed(results: tuple[TestResult, ...] = GLUCOSE) -> LisOrder:
    return LisOrder("P-1", OrderStatus.COMPLETED, tuple(results))


def test_without_a_required_pdf_a_completed_order_is_published_with_empty_pdf_path():
    local = Local(_order(), _order(), _state(), (), None, OWNER)
    result = planner.plan(local, Answer(_completed()), NOW, _policy(required=False))
    assert result.outcome == "completed" and result.mail is not None
    assert [row["PDF_PATH"] for row in result.rows.insert] == [None]
    assert "PDF_PATH" not in result.state and result.publish is None


def test_with_pdf_wait_a_completed_order_waits_then_is_published_without_it():
    policy = _policy(required=False, wait=3600)
    local = Local(_order(), _order(), _state(), (), None, OWNER)
    waiting = planner.plan(local, Answer(_completed()), NOW, policy)
    assert waiting.outcome == "pending" and waiting.mail is None
    assert waiting.status == "processing"  # shown as in the lab meanwhile
    assert waiting.seen == Seen(pdf_wait_since=NOW)
    assert waiting.state["NEXT_POLL_AT"] <= NOW + timedelta(hours=1)
    later = _after(local, waiting)
    still = planner.plan(later, Answer(_completed()), NOW + timedelta(minutes=59), policy)
    assert still.outcome == "pending" and still.seen is None  # the wait started at NOW
    done = planner.plan(later, Answer(_completed()), NOW + timedelta(hours=1), policy)
    assert done.outcome == "completed" and done.mail is not None


def test_a_pdf_that_comes_later_is_stored_without_a_second_mail_or_a_correction():
    policy = _policy(required=False)
    local = Local(_order(), _order(), _state(), (), None, OWNER)
    first = planner.plan(local, Answer(_completed()), NOW, policy)
    after = _after(local, first)
    assert after.asked.pdf_missing
    late = planner.plan(after, Answer(_completed(), _pdf()), NOW + timedelta(hours=2), policy)
    assert late.outcome == "rechecked" and late.mail is None
    assert late.publish is not None and late.state["PDF_PATH"] == "/pdfs/7/P-1.pdf"
    assert [changed for _, changed in late.rows.update] == [{"PDF_PATH": "/pdfs/7/P-1.pdf"}]
    assert "RESULTS_VERSION" not in late.state


def test_a_correction_bumps_the_version_and_queues_one_updated_mail():
    policy = _policy()
    local = Local(_order(), _order(), _state(), (), None, OWNER)
    first = planner.plan(local, Answer(_completed(), _pdf()), NOW, policy)
    after = _after(local, first)
    corrected = _completed((TestResult("GLU", "Glucose", "5.60"),))
    result = planner.plan(after, Answer(corrected), NOW + timedelta(hours=1), policy)
    assert result.outcome == "corrected"
    assert result.mail == planner.Mail("updated", 2)
    assert [changed for _, changed in result.rows.update] == [{"RESULT_VALUE": "5.60"}]
    again = planner.plan(_after(after, result), Answer(corrected), NOW + timedelta(hours=2),
                         policy)
    assert again.outcome == "rechecked" and again.mail is None


def test_a_failure_backs_off_and_tells_the_admin_log_once_per_new_problem():
    policy = _policy()
    first = planner.failure(_order(), None, "transient", "order P-1: HTTP 503", NOW, policy)
    assert first.admin_log == "Order P-1: HTTP 503"
    state = _state(FAILURES=1, LAST_ERROR="order P-1: HTTP 503")
    again = planner.failure(_order(), state, "transient", "order P-1: HTTP 503", NOW, policy)
    assert again.admin_log is None and again.state["FAILURES"] == 2
    assert again.state["NEXT_POLL_AT"] > first.state["NEXT_POLL_AT"] - timedelta(seconds=1)


def test_the_admin_log_names_the_order_once():
    assert planner.about("QL-1", "order QL-1: HTTP 503") == "Order QL-1: HTTP 503"
    assert (planner.about("QL-1", "results of order QL-1: HTTP 503")
            == "Results of order QL-1: HTTP 503")
    assert planner.about("QL-1", "the LIS said no") == "Order QL-1: the LIS said no"
