"""The mapper: an answer as plain data → ``labsync.model``, field by field; values keep
their literal text, and what it cannot use is refused naming the order, the key and the
expression (``labsync/lis/mapped/mapper.py``)."""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from labsync.errors import BadLisData
from labsync.lis.body import decode_json
from labsync.lis.mapped import mapper
from labsync.lis.mapped.spec import Spec, spec_from
from labsync.model import LisOrderRef, OrderStatus, Patient, PdfKind, TestResult
from labsync.testing.pdfs import sample_pdf

MSK = timezone(timedelta(hours=3))
NESTED = {
    "status": "state.code", "order_id": "referral.number", "changed_at": "referral.updated",
    "version": "referral.etag", "pdf_base64": "documents[?type=='pdf'] | [0].content",
    "status_map": {"new": "received", "in_work": "processing", "done": "completed",
                   "rejected": "cancelled", "3": "completed"},
    "results": {"each": "samples[].tests[]", "name": "title", "value": "result.value",
                "unit": "result.unit", "ref_min": "norm.low", "ref_max": "norm.high",
                "abnormal": "result.flag", "abnormal_values": ("H", "L", "1"),
                "result_date": "result.approved_at"},
}


def spec(**changes: Any) -> Spec:
    options = {**NESTED, **changes}
    return spec_from({k: v for k, v in options.items() if v is not None})


def referral(*tests: dict[str, Any], status: Any = "done", **more: Any) -> dict[str, Any]:
    return {"referral": {"number": "R-1"}, "state": {"code": status},
            "samples": [{"tests": list(tests)}], **more}


def order(answer: Any, the_spec: Spec | None = None, external_id: str = "R-1") -> Any:
    return mapper.order_from(external_id, answer, the_spec or spec())


def test_json_numbers_keep_their_literal_text() -> None:
    answer = decode_json(b'{"state": {"code": "done"}, "samples": [{"tests": ['
                         b'{"code": "K", "result": {"value": 5.40}, "norm": {"low": 3.50, '
                         b'"high": 1e308}}, {"code": "Z", "result": {"value": -0.0}}]}]}',
                         what="test")

    results = order(answer).results

    assert [(r.value, r.ref_min, r.ref_max) for r in results] == [
        ("5.40", "3.50", "1e308"), ("-0.0", None, None)]
    assert all(type(r.value) is str for r in results)  # plain text, not JsonNumber


def test_soap_values_give_their_text_decimals_their_digits() -> None:
    answer = referral({"code": "A", "result": {"value": Decimal("3.90"), "unit": 7},
                       "norm": {"low": Decimal("-0.50"), "high": 6.1}})

    (result,) = order(answer).results

    assert (result.value, result.unit, result.ref_min, result.ref_max) == (
        "3.90", "7", "-0.50", "6.1")


def test_a_status_is_matched_by_its_exact_text_a_number_by_its_literal() -> None:
    number = decode_json(b'{"state": {"code": 3}, "samples": []}', what="t")
    other_literal = decode_json(b'{"state": {"code": 3.0}, "samples": []}', what="t")

    assert order(number).status is OrderStatus.COMPLETED
    with pytest.raises(BadLisData, match=r"status '3\.0' is not in lis\.mapped\.status_map"):
        order(other_literal)
    with pytest.raises(BadLisData, match="status 'Done' is not in"):
        order(referral(status="Done"))


def test_an_unknown_status_is_bad_data_naming_the_value_and_the_known_ones() -> None:
    with pytest.raises(BadLisData) as caught:
        order(referral(status="archived"))

    assert str(caught.value) == (
        "order R-1: status 'archived' is not in lis.mapped.status_map (known: 'new', "
        "'in_work', 'done', 'rejected', '3')")


@pytest.mark.parametrize(("answer", "message"), [
    ({"state": {}}, "order R-1: lis.mapped.status (state.code) gave nothing"),
    (referral({"code": "A", "result": {}}),
     "order R-1: result 1 (A): lis.mapped.results.value (result.value) gave nothing"),
    (referral({"result": {"value": 1}}),
     "order R-1: result 1: has neither a code (lis.mapped.results.code (code)) nor a name "
     "(lis.mapped.results.name (title))"),
    ({"state": {"code": "done"}},
     "order R-1: lis.mapped.results.each (samples[].tests[]) gave nothing for a completed "
     "order"),
    ({"state": {"code": "done"}, "samples": {"tests": []}},
     "order R-1: lis.mapped.results.each (samples[].tests[]) gave nothing for a completed "
     "order"),
    (referral({"code": "A", "result": {"value": True}}),
     "order R-1: result 1 (A): lis.mapped.results.value (result.value) must be a number, a "
     "string or null, not a boolean"),
    (referral({"code": "A", "result": {"value": "1", "flag": {"x": 1}}}),
     "order R-1: result 1 (A): lis.mapped.results.abnormal (result.flag) must be true, false "
     "or null, not {'x': 1} (or list the abnormal values in "
     "lis.mapped.results.abnormal_values)"),
    (referral({"code": "A", "result": {"value": "a\x00b"}}),
     "order R-1: result 1 (A): lis.mapped.results.value (result.value) contains a NUL "
     "character"),
    (referral({"code": "A", "result": {"value": "1", "approved_at": "yesterday"}}),
     "order R-1: result 1 (A): lis.mapped.results.result_date (result.approved_at): "
     "'yesterday' is not an ISO 8601 date-time"),
    (referral({"code": "A", "result": {"value": "1", "approved_at": "0999-01-01T00:00"}}),
     "order R-1: result 1 (A): lis.mapped.results.result_date (result.approved_at): "
     "'0999-01-01T00:00' is out of range (years 1000-9998)"),
    (referral(referral={"number": "R-2"}),
     "order R-1: the answer is about another order (lis.mapped.order_id (referral.number) "
     "gave 'R-2')"),
    (referral(referral={"number": "R-1", "updated": "2024-05-14T12:00:00"}),
     "order R-1: lis.mapped.changed_at (referral.updated) has no time-zone offset"),
    (referral(documents=[{"type": "pdf", "content": "not base64!"}]),
     "PDF of order R-1: lis.mapped.pdf_base64 (documents[?type=='pdf'] | [0].content) is "
     "not valid base64"),
])
def test_what_cannot_be_used_is_refused_naming_the_order_and_the_key(
        answer: dict[str, Any], message: str) -> None:
    with pytest.raises(BadLisData) as caught:
        order(answer)

    assert str(caught.value) == message


def test_a_processing_order_may_have_no_results_yet() -> None:
    assert order({"state": {"code": "in_work"}}).results == ()


def test_an_empty_list_or_a_null_wrapper_is_a_completed_order_without_results() -> None:
    # zeep makes SOAP's empty <Results/> null: the field is there, the list is empty
    soap = spec(results={"each": "Results.Result[]"})

    assert order(referral()).results == ()
    assert order({"state": {"code": "done"}, "Results": None}, soap).results == ()
    with pytest.raises(BadLisData, match="gave nothing for a completed order"):
        order({"state": {"code": "done"}, "Result": None}, soap)
    with pytest.raises(BadLisData, match=r"results\.each \(Results\) must give a list, not an "
                                         "object"):
        order({"state": {"code": "done"}, "Results": {"Result": []}},
              spec(results={"each": "Results"}))


def test_results_are_not_read_for_a_received_or_cancelled_order() -> None:
    junk = {"samples": "not a list"}

    assert order({"state": {"code": "new"}, **junk}).results == ()
    assert order({"state": {"code": "rejected"}, **junk}).results == ()


def test_abnormal_is_a_boolean_or_a_listed_value_numbers_by_their_literal() -> None:
    flags = [True, False, None, "H", "L", "N", "", decode_json(b"1", what="t"),
             decode_json(b"0", what="t")]
    answer = referral(*[{"code": f"T{i}", "result": {"value": "1", "flag": flag}}
                        for i, flag in enumerate(flags)])

    assert [r.abnormal for r in order(answer).results] == [
        True, False, False, True, True, False, False, True, False]
    strict = spec(results={**NESTED["results"], "abnormal_values": ()})
    with pytest.raises(BadLisData, match="must be true, false or null, not 'H'"):
        order(referral({"code": "A", "result": {"value": "1", "flag": "H"}}), strict)


def test_result_dates_keep_their_offset_and_soap_gives_datetimes_and_dates() -> None:
    answer = referral(*[{"code": f"D{i}", "result": {"value": "1", "approved_at": moment}}
                        for i, moment in enumerate([
                            "2024-05-14T10:30:00+03:00", "2024-05-14T07:30:15Z",
                            "2024-05-14T09:00:00", datetime(2024, 5, 14, 8, tzinfo=MSK),
                            date(2024, 5, 14), None, ""])])

    dates = [r.result_date for r in order(answer).results]

    assert dates == [datetime(2024, 5, 14, 10, 30, tzinfo=MSK),
                     datetime(2024, 5, 14, 7, 30, 15, tzinfo=UTC),
                     datetime(2024, 5, 14, 9, 0), datetime(2024, 5, 14, 8, tzinfo=MSK),
                     datetime(2024, 5, 14, 0, 0), None, None]
    assert dates[2] is not None and dates[2].tzinfo is None


def test_missing_optional_fields_are_written_as_the_qlab_path_writes_them() -> None:
    (result,) = order(referral({"title": "Комментарий", "result": {"value": "<5"}})).results

    assert result == TestResult(code=None, name="Комментарий", value="<5")


def test_change_time_version_and_an_inline_pdf_of_a_completed_order() -> None:
    pdf = sample_pdf("inline")
    encoded = base64.b64encode(pdf).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    answer = referral(referral={"number": "R-1", "updated": "2024-05-14T12:00:00.25+03:00",
                                "etag": decode_json(b"7", what="t")},
                      documents=[{"type": "xml", "content": "PHg+"},
                                 {"type": "pdf", "content": wrapped}])

    got = order(answer)

    assert (got.changed_at, got.version) == (datetime(2024, 5, 14, 12, 0, 0, 250000,
                                                      tzinfo=MSK), "7")
    assert got.pdf is not None and got.pdf.kind is PdfKind.INLINE and got.pdf.data == pdf
    assert order({**answer, "state": {"code": "in_work"}}).pdf is None
    assert order(referral()).pdf is None  # completed, no document yet


def test_an_expression_that_cannot_be_applied_is_bad_data_naming_its_key() -> None:
    with pytest.raises(BadLisData, match=r"lis\.mapped\.results\.value \(abs\(result\.value\)\)"
                                         " cannot be applied"):
        order(referral({"code": "A", "result": {"value": "x"}}),
              spec(results={**NESTED["results"], "value": "abs(result.value)"}))


def test_orders_found_by_phone_map_their_status_and_patient() -> None:
    the_spec = spec(find_each="result.referrals[]", find={
        "id": "number", "status": "state", "order_date": "date", "phone": "patient.phone",
        "last_name": "patient.surname", "first_name": "patient.name",
        "birth_date": "patient.birthday"})
    answer = {"result": {"referrals": [
        {"number": "R-9", "state": "in_work", "date": "2024-05-10T09:00:00",
         "patient": {"phone": "+79991234567", "surname": "Ли", "name": "Ким",
                     "birthday": "1985-03-21"}}]}}

    assert mapper.refs_from(answer, "orders of phone …4567", the_spec) == [LisOrderRef(
        external_id="R-9", status=OrderStatus.PROCESSING, order_date=date(2024, 5, 10),
        patient=Patient(phone="+79991234567", last_name="Ли", first_name="Ким",
                        birth_date=date(1985, 3, 21)))]
    assert mapper.refs_from({"result": {"referrals": None}}, "x", the_spec) == []
    phone_as_number = decode_json(b'{"result": {"referrals": [{"number": "R-1", "state": '
                                  b'"new", "patient": {"phone": 79991234567}}]}}', what="t")
    with pytest.raises(BadLisData, match=r"lis\.mapped\.find\.phone \(patient\.phone\) must "
                                         "be a string"):
        mapper.refs_from(phone_as_number, "x", the_spec)


def test_the_spec_names_each_fields_expression_for_the_dry_run() -> None:
    sources = spec().sources()

    assert sources["status"] == "state.code"
    assert sources["results.value"] == "result.value"
    assert sources["results.code"] == "code"  # a field's default is its own name
