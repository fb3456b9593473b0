"""The FHIR mapping (``labsync.lis.fhir.reader``): the official R4 examples in
``/work/shared/data/fhir-r4`` read as the site will store them, and small hand-written
resources for each rule of issue 13."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from labsync.errors import BadLisData
from labsync.lis.body import decode_json
from labsync.lis.fhir.bundle import Resources, searchset
from labsync.lis.fhir.reader import (
    ABNORMAL,
    Rules,
    missing_observations,
    order_ids,
    read_report,
)
from labsync.model import LisOrder, OrderStatus, PdfKind, TestResult

DATA = Path("/work/shared/data/fhir-r4")
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs /work/shared/data/fhir-r4")


def _load(name: str) -> Any:
    return decode_json((DATA / name).read_bytes(), what=name)


DEFAULT_RULES = Rules()


def _bundle_order(name: str, rules: Rules = DEFAULT_RULES) -> LisOrder:
    page = searchset(_load(name), name)
    ((report, where),) = page.matches
    return read_report("ORD", report, page.resources, where, rules)


def _read(report: dict[str, Any], *observations: dict[str, Any],
          rules: Rules = DEFAULT_RULES) -> LisOrder:
    """A hand-written report, its Observations given alongside it as a Bundle would."""
    resources = Resources()
    for obs in observations:
        resources.add(_json(obs))
    return read_report("ORD", _json(report), resources, "report", rules)


def _json(value: Any) -> Any:
    """``value`` as the client would have it: sent as JSON, numbers read as their text."""
    return decode_json(json.dumps(value).encode(), what="test")


def _report(*obs_ids: str, status: str = "final", **more: Any) -> dict[str, Any]:
    return {"resourceType": "DiagnosticReport", "id": "r", "status": status,
            "identifier": [{"system": "urn:orders", "value": "ORD"}],
            "result": [{"reference": f"Observation/{i}"} for i in obs_ids], **more}


def _obs(rid: str, code: str = "GLU", **more: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]}, **more}


def _one(obs: dict[str, Any], **report: Any) -> TestResult:
    (result,) = _read(_report(obs["id"], **report), obs).results
    return result


# -- the official examples ----------------------------------------------------------------


def test_general_health_profile_flattens_its_three_panels_into_48_rows():
    order = _bundle_order("Bundle-ghp.json")

    assert order.status is OrderStatus.COMPLETED
    assert len(order.results) == 48  # 22 chemistry + 17 CBC + 9 urinalysis; no panel rows
    assert "24323-8" not in {r.code for r in order.results}  # the chemistry panel itself
    assert [r.code for r in order.results[:2]] == ["2951-2", "2823-3"]  # result order kept
    assert order.changed_at == datetime(2015, 8, 16, 10, 35, 23, tzinfo=UTC)
    assert order.version is None and order.pdf is None


def test_general_health_profile_keeps_literals_flags_and_ranges():
    by_code = {r.code: r for r in _bundle_order("Bundle-ghp.json").results}

    assert by_code["711-2"] == TestResult(  # Eosinophils: HH, a range served as 0.40
        code="711-2", name="Eosinophils", value="0.92", unit="x10*9/L", ref_min="0.04",
        ref_max="0.40", abnormal=True,
        result_date=datetime(2015, 8, 16, 6, 40, 17, tzinfo=UTC))  # the report's date
    assert (by_code["789-8"].value, by_code["789-8"].ref_max) == ("5.9", "6.0")
    assert by_code["751-8"].abnormal and by_code["731-0"].abnormal  # LL and L
    assert not by_code["718-7"].abnormal
    assert (by_code["704-7"].ref_min, by_code["704-7"].ref_max) == (None, "0.21")  # high only
    assert by_code["2756-5"].value == "5.0"  # pH, not 5
    assert (by_code["2887-8"].value, by_code["2887-8"].unit) == ("Negative", None)  # coded
    assert (by_code["30391-7"].value, by_code["30391-7"].unit) == ("<1", "/uL")  # comparator
    assert by_code["2951-2"].name == "Sodium [Moles/volume] in Serum or Plasma"  # a display


def test_lipid_panel_names_from_code_text_and_ranges_high_or_low_only():
    results = _bundle_order("Bundle-lipids.json").results

    assert [(r.name, r.value, r.ref_min, r.ref_max) for r in results] == [
        ("Cholesterol", "6.3", None, "4.5"),
        ("Triglyceride", "1.3", None, "2.0"),
        ("Cholesterol in HDL", "1.3", "1.5", None),
        ("LDL Chol. (Calc)", "4.6", None, "3.0"),
    ]
    # No date of their own: the report's effectiveDateTime, with its offset.
    assert {r.result_date for r in results} == {
        datetime(2011, 3, 4, 8, 30, tzinfo=timezone(timedelta(hours=11)))}


def test_microbiology_flattens_organisms_members_and_components():
    order = _bundle_order("Bundle-lri-example.json")
    values = [(r.code, r.value) for r in order.results]

    assert len(order.results) == 20
    assert values[:5] == [("624-7", "Normal flora"), ("624-7", "Moderate Growth"),
                          ("624-7", "Klebsiella pneumonia"), ("624-7", "Heavy growth"),
                          ("28-1", "<0.06")]  # an organism, then its members
    assert values[12:14] == [("664-3", "Many"), ("664-3", "WBCS")]  # a gram stain's components
    assert not any(r.abnormal for r in order.results)  # "S" (susceptible) is no flag
    # "2016-08-18": a date without a time is midnight, site time (naive).
    assert order.results[0].result_date == datetime(2016, 8, 18)


def test_microbiology_report_carries_three_order_identifiers():
    page = searchset(_load("Bundle-lri-example.json"), "lri")
    ((report, where),) = page.matches

    assert order_ids(report, where, Rules()) == ["RP723234", "250401", "RFP 123456"]
    assert order_ids(report, where, Rules(order_system="https://acme.org/identifiers")) == [
        "RP723234", "250401", "RFP 123456"]
    assert order_ids(report, where, Rules(order_system="urn:other")) == []


def test_cbc_report_names_observations_its_bundle_lacks_until_they_are_added():
    page = searchset(_load("Bundle-f001.json"), "f001")
    ((report, where),) = page.matches

    assert missing_observations(report, page.resources, where) == [
        f"Observation/f00{i}" for i in range(1, 6)]
    with pytest.raises(BadLisData, match="Observation/f001 is not in the answer"):
        read_report("nr1239044", report, page.resources, where, Rules())

    page.resources.add(_load("Observation-f001.json"))
    page.resources.add(_load("Observation-f004.json"))
    assert missing_observations(report, page.resources, where) == [
        "Observation/f002", "Observation/f003", "Observation/f005"]


def test_glucose_and_erythrocytes_examples_map_as_the_issue_says():
    resources = Resources()
    resources.add(_load("Observation-f001.json"))
    resources.add(_load("Observation-f004.json"))
    report = copy.deepcopy(searchset(_load("Bundle-f001.json"), "f").matches[0][0])
    report["result"] = [{"reference": "Observation/f001"}, {"reference": "Observation/f004"}]

    glucose, erythrocytes = read_report("nr1239044", report, resources, "f", Rules()).results

    plus_one = timezone(timedelta(hours=1))
    assert glucose == TestResult(
        code="15074-8", name="Glucose [Moles/volume] in Blood", value="6.3", unit="mmol/l",
        ref_min="3.1", ref_max="6.2", abnormal=True,
        result_date=datetime(2013, 4, 2, 9, 30, 10, tzinfo=plus_one))  # effectivePeriod.start
    assert erythrocytes.abnormal and erythrocytes.unit == "10^12/L"
    assert erythrocytes.ref_min is not None and erythrocytes.ref_min.startswith(
        " 12-14 y Male: 4.4 - 5.2")  # referenceRange.text, whole, in REFERENCE_MIN
    assert erythrocytes.ref_min.endswith("4.1 - 4.9  x  10^12/L       ")
    assert erythrocytes.ref_max is None


def test_pathology_report_carries_its_pdf_inline():
    report = _load("DiagnosticReport-gingival-mass.json")

    order = read_report("P73456090", report, Resources(), "gm", Rules())

    assert order.status is OrderStatus.COMPLETED and order.results == ()
    assert order.pdf is not None and order.pdf.kind is PdfKind.INLINE
    assert order.pdf.data is not None and order.pdf.data.startswith(b"%PDF-1.7")
    assert len(order.pdf.data) == 551_998


# -- hand-written: one rule each ----------------------------------------------------------


@pytest.mark.parametrize(("fhir", "status"), [
    ("registered", OrderStatus.RECEIVED), ("partial", OrderStatus.PROCESSING),
    ("preliminary", OrderStatus.PROCESSING), ("final", OrderStatus.COMPLETED),
    ("amended", OrderStatus.COMPLETED), ("corrected", OrderStatus.COMPLETED),
    ("appended", OrderStatus.COMPLETED), ("cancelled", OrderStatus.CANCELLED),
    ("entered-in-error", OrderStatus.CANCELLED),
])
def test_report_status_maps_to_the_sites_status(fhir, status):
    assert _read(_report(status=fhir)).status is status


@pytest.mark.parametrize("fhir", ["unknown", "finished", None, 3])
def test_a_report_status_labsync_does_not_map_is_bad_data(fhir):
    with pytest.raises(BadLisData, match="status"):
        _read(_report(status=fhir))


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error"])
def test_a_cancelled_observation_is_no_result_row(status):
    kept = _obs("a", "GLU", valueString="5")
    gone = _obs("b", "HGB", valueString="140", status=status)

    order = _read(_report("a", "b"), kept, gone)

    assert [r.code for r in order.results] == ["GLU"]


def test_test_code_comes_from_the_first_configured_code_system_present():
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "valueString": "x",
           "code": {"coding": [{"system": SNOMED, "code": "S1", "display": "Snomed name"},
                               {"system": LOINC, "code": "L1", "display": "Loinc name"}]}}
    report = _report("o")

    assert _read(report, obs).results[0].code == "L1"
    assert _read(report, obs, rules=Rules(code_systems=(SNOMED, LOINC))).results[0].code == "S1"
    assert _read(report, obs, rules=Rules(code_systems=("urn:none",))).results[0].code == "S1"
    assert _read(report, obs).results[0].name == "Loinc name"  # the chosen coding's display


def test_name_is_code_text_else_chosen_display_else_first_display():
    def name(code: dict[str, Any]) -> str | None:
        return _one({"resourceType": "Observation", "id": "o", "status": "final",
                     "valueString": "x", "code": code}).name

    codings = [{"system": SNOMED, "code": "S", "display": "First"},
               {"system": LOINC, "code": "L"}]
    assert name({"text": "Глюкоза", "coding": codings}) == "Глюкоза"
    assert name({"coding": codings}) == "First"  # the chosen (LOINC) has no display
    assert name({"text": "Only text"}) == "Only text"


def test_an_observation_with_neither_code_nor_name_is_bad_data():
    with pytest.raises(BadLisData, match="neither a code nor a name"):
        _one({"resourceType": "Observation", "id": "o", "status": "final", "code": {},
              "valueString": "x"})


@pytest.mark.parametrize(("value", "expected"), [
    ('"valueQuantity": {"value": 5.40, "unit": "mmol/L"}', ("5.40", "mmol/L")),
    ('"valueQuantity": {"value": 5, "comparator": "<", "code": "mg/dL"}', ("<5", "mg/dL")),
    ('"valueQuantity": {"value": 1.50E+3}', ("1.50E+3", None)),
    ('"valueString": "Отрицательно"', ("Отрицательно", None)),
    ('"valueCodeableConcept": {"text": "Positive", "coding": [{"display": "Pos"}]}',
     ("Positive", None)),
    ('"valueCodeableConcept": {"coding": [{"code": "260385009", "display": "Negative"}]}',
     ("Negative", None)),
    ('"valueInteger": 142', ("142", None)),
    ('"valueBoolean": false', ("false", None)),
    ('"valueRange": {"low": {"value": 2.0, "unit": "%"}, "high": {"value": 5}}',
     ("2.0-5", "%")),
    ('"valueRange": {"high": {"value": 10}}', ("<=10", None)),
    ('"valueRatio": {"numerator": {"value": 1}, "denominator": {"value": 128}}',
     ("1:128", None)),
    ('"valueTime": "10:30:00"', ("10:30:00", None)),
    ('"note": [{"text": "no value yet"}]', (None, None)),
])
def test_every_value_type_becomes_the_text_the_site_shows(value, expected):
    resources = Resources()
    resources.add(decode_json(('{"resourceType": "Observation", "id": "o", "status": "final", '
                               '"code": {"text": "Test"}, ' + value + "}").encode(), what="o"))

    (result,) = read_report("ORD", _json(_report("o")), resources, "r", Rules()).results

    assert (result.value, result.unit) == expected


@pytest.mark.parametrize("value", [
    {"valueSampledData": {"origin": {"value": 0}, "period": 1, "dimensions": 1}},
    {"valueAttachment": {"contentType": "image/png"}},
    {"valueString": "a", "valueInteger": 1},
    {"valueQuantity": {"value": "5.4"}},  # a decimal sent as a string is not a number
    {"valueQuantity": {"value": 5, "comparator": "~"}},
    {"valueString": "bad\x00text"},
])
def test_a_value_that_is_not_a_lab_value_is_refused_by_name(value):
    with pytest.raises(BadLisData):
        _one(_obs("o", **value))


@pytest.mark.parametrize("code", sorted(ABNORMAL))
def test_each_abnormal_interpretation_code_flags_the_row(code):
    interpretation = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                             "v3-ObservationInterpretation", "code": code}]}]
    assert _one(_obs("o", valueString="x", interpretation=interpretation)).abnormal is True


@pytest.mark.parametrize("code", ["N", "S", "R", "I", "NEG", "IND"])
def test_other_interpretations_are_not_abnormal(code):
    assert _one(_obs("o", valueString="x",
                     interpretation=[{"coding": [{"code": code}]}])).abnormal is False


def test_reference_range_text_without_low_or_high_goes_whole_into_the_minimum():
    result = _one(_obs("o", valueString="1:40", referenceRange=[
        {"text": "< 1:80 (negative)"}, {"low": {"value": 1}}]))

    assert (result.ref_min, result.ref_max) == ("< 1:80 (negative)", None)


@pytest.mark.parametrize(("sent", "expected"), [
    ("2024-05-14T10:30:00+03:00", datetime(2024, 5, 14, 10, 30,
                                           tzinfo=timezone(timedelta(hours=3)))),
    ("2024-05-14T07:30:15.250Z", datetime(2024, 5, 14, 7, 30, 15, 250000, tzinfo=UTC)),
    ("2024-05-14", datetime(2024, 5, 14)),  # no time: midnight, site time
    ("2024-05", datetime(2024, 5, 1)),
    ("2024", datetime(2024, 1, 1)),
    ("2024-05-14T09:00:00", datetime(2024, 5, 14, 9, 0)),  # no offset: site time
])
def test_result_dates_keep_their_offset_and_a_date_alone_is_midnight(sent, expected):
    got = _one(_obs("o", valueString="x", effectiveDateTime=sent)).result_date

    assert got == expected
    assert (got.utcoffset() is None) == (expected.utcoffset() is None)


def test_result_date_falls_back_from_effective_to_issued_to_the_reports_own():
    with_period = _obs("a", "A", valueString="1", effectivePeriod={"start": "2024-05-01"},
                       issued="2024-05-03T00:00:00Z")
    issued_only = _obs("b", "B", valueString="1", issued="2024-05-03T08:00:00Z")
    undated = _obs("c", "C", valueString="1")

    results = _read(_report("a", "b", "c", effectiveDateTime="2024-04-30T12:00:00Z"),
                    with_period, issued_only, undated).results

    assert [r.result_date for r in results] == [
        datetime(2024, 5, 1), datetime(2024, 5, 3, 8, tzinfo=UTC),
        datetime(2024, 4, 30, 12, tzinfo=UTC)]
    assert _read(_report("c"), undated).results[0].result_date is None


def test_contained_observations_and_panels_of_them_are_read():
    report = _report(contained=[
        _obs("panel", "PANEL", hasMember=[{"reference": "#k"}, {"reference": "#na"}]),
        _obs("k", "K", valueQuantity={"value": 4}),
        _obs("na", "NA", valueQuantity={"value": 140}),
    ], result=[{"reference": "#panel"}])

    assert [(r.code, r.value) for r in _read(report).results] == [("K", "4"), ("NA", "140")]


def test_a_contained_reference_that_is_not_there_is_bad_data():
    with pytest.raises(BadLisData, match="#gone is not in the report"):
        _read(_report(result=[{"reference": "#gone"}]))


def test_a_panel_member_named_twice_and_a_cycle_give_each_row_once():
    panel = _obs("p", "P", hasMember=[{"reference": "Observation/a"},
                                      {"reference": "Observation/p"}])
    member = _obs("a", "A", valueString="1", hasMember=[{"reference": "Observation/p"}])

    order = _read(_report("p", "a"), panel, member)

    assert [r.code for r in order.results] == ["A"]


def test_changed_at_and_version_come_from_meta():
    order = _read(_report(meta={"versionId": "7", "lastUpdated": "2024-05-14T12:00:00.250+03:00"}))

    assert order.changed_at == datetime(2024, 5, 14, 9, 0, 0, 250000, tzinfo=UTC)
    assert order.version == "7"


def test_last_updated_without_an_offset_is_bad_data():
    with pytest.raises(BadLisData, match="no time-zone offset"):
        _read(_report(meta={"lastUpdated": "2024-05-14T12:00:00"}))


def test_the_first_pdf_form_is_the_orders_pdf_and_other_forms_are_passed_over():
    forms = [{"contentType": "text/html", "url": "Binary/html"},
             {"contentType": "application/pdf; charset=binary", "url": "Binary/17"},
             {"contentType": "application/pdf", "url": "Binary/18"}]

    pdf = _read(_report(presentedForm=forms)).pdf

    assert pdf is not None and (pdf.kind, pdf.url) == (PdfKind.URL, "Binary/17")
    assert _read(_report(presentedForm=forms[:1])).pdf is None
    assert _read(_report()).pdf is None


def test_inline_pdf_data_that_is_not_base64_is_handed_on_for_the_pdf_check_to_refuse():
    pdf = _read(_report(presentedForm=[{"contentType": "application/pdf",
                                        "data": "not base64 at all!"}])).pdf

    assert pdf is not None and pdf.kind is PdfKind.INLINE
    assert not (pdf.data or b"").startswith(b"%PDF-")


def test_missing_observations_lists_what_the_lis_can_be_asked_for():
    report = _report(result=[{"reference": "Observation/a"},
                             {"reference": "https://lis.example/fhir/Observation/b"},
                             {"reference": "Observation/c/_history/2"}])
    resources = Resources()
    resources.add(_obs("a", valueString="1", hasMember=[{"reference": "Observation/m"}]))

    assert missing_observations(report, resources, "r") == [
        "Observation/m", "https://lis.example/fhir/Observation/b", "Observation/c/_history/2"]


def test_a_reference_to_something_other_than_an_observation_is_bad_data():
    resources = Resources()
    resources.add({"resourceType": "Specimen", "id": "s"})
    report = _report(result=[{"reference": "Specimen/s"}])

    with pytest.raises(BadLisData, match="not an Observation"):
        read_report("ORD", report, resources, "r", Rules())
