"""ORU^R01 → labsync orders: the real messages of tests/data/hl7v2 (copies of
shared/data/hl7v2, PROVENANCE.md), and one decision of issue 14 per test."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from labsync.lis.hl7.mapping import Mapped, map_oru, order_ids
from labsync.lis.hl7.parse import MessageProblem, parse_message, split_messages
from labsync.model import LisOrder, OrderStatus, PdfKind, TestResult
from labsync.testing.pdfs import sample_pdf

DATA = Path(__file__).parent / "data" / "hl7v2"
MSK = ZoneInfo("Europe/Moscow")
PLUS7 = timezone(timedelta(hours=7))
MSH = "MSH|^~\\&|LAB|FAC|SITE|SF|20240514120000+0300||ORU^R01^ORU_R01|{id}|P|2.5.1"


def mapped_file(name: str, order_id: str = "placer") -> Mapped:
    (message,) = split_messages((DATA / name).read_bytes())
    return map_oru(parse_message(message, "utf-8"), order_id=order_id, zone=MSK)


def mapped(*segments: str, order_id: str = "placer", control: str = "M1") -> Mapped:
    text = "\r".join([MSH.format(id=control), *segments]) + "\r"
    return map_oru(parse_message(text.encode(), "utf-8"), order_id=order_id, zone=MSK)


def one(*segments: str, **kwargs: str) -> LisOrder:
    (order,) = mapped(*segments, **kwargs).orders
    return order


def by_code(order: LisOrder) -> dict[str | None, TestResult]:
    return {r.code: r for r in order.results}


OBR = "OBR|1|ORD-1|FIL-1|CBC^Blood count"


def obr(status: str = "F", *, placer: str = "ORD-1", filler: str = "FIL-1") -> str:
    fields = ["OBR", "1", placer, filler, "CBC^Blood count"] + [""] * 21
    fields[25] = status
    return "|".join(fields)


def obx(n: int, value: str, *, vt: str = "NM", code: str = "GLU^Glucose^LN", sub: str = "",
        unit: str = "", ref: str = "", flag: str = "", status: str = "F",
        observed: str = "") -> str:
    return "|".join(["OBX", str(n), vt, code, sub, value, unit, ref, flag, "", "", status,
                     "", "", observed])


# -- the real messages -------------------------------------------------------------------------


def test_the_nist_cbc_has_one_order_of_28_final_results_with_units_ranges_and_flags() -> None:
    result = mapped_file("LRI_2.0-NG_CBC_Typ_Message.hl7")
    (order,) = result.orders
    rows = by_code(order)

    assert order.external_id == "ORD666555" and order.status is OrderStatus.COMPLETED
    assert len(order.results) == 28
    assert rows["26453-1"] == TestResult(
        "26453-1", "Erythrocytes [#/volume] in Blood", "4.41", "10*6/uL", "4.3 to 6.2", None,
        False, datetime(2011, 1, 3, 14, 34, 28, tzinfo=timezone(timedelta(hours=-8))))
    assert rows["718-7"].abnormal and rows["26464-8"].abnormal  # L, HH
    assert rows["38892-6"].value == "Present ++ out of ++++"  # CWE: its text
    assert rows["6742-1"].value == "Many spherocytes present."  # TX
    assert order.changed_at == datetime(2011, 5, 31, 14, 5, 51,
                                        tzinfo=timezone(timedelta(hours=-5)))
    assert order.version == "NIST-LRI-NG-002.00" and order.pdf is None


def test_the_filler_number_is_the_order_id_when_configured_so() -> None:
    (order,) = mapped_file("LRI_2.0-NG_CBC_Typ_Message.hl7", order_id="filler").orders

    assert order.external_id == "R-991133"  # R-991133^NIST Lab Filler: the first component


def test_a_message_with_mixed_obx_statuses_is_processing_and_hides_the_unverified_rows(
        ) -> None:
    first, second = mapped_file("LAB-ORU-1.hl7").orders

    assert (first.external_id, second.external_id) == ("88502218", "855238581")
    assert first.status is OrderStatus.PROCESSING  # OBR-25 F, but OBX-11 P and I rows
    assert [r.code for r in first.results] == ["11273-0", "20570-8", "11125-2"]  # no I rows
    assert second.status is OrderStatus.PROCESSING
    assert by_code(first)["11273-0"].result_date == datetime(2014, 10, 6, 6, 27, tzinfo=PLUS7)


def test_its_final_follow_up_completes_both_orders_with_every_value() -> None:
    orders = {o.external_id: o for o in mapped_file("LAB-ORU-2.hl7").orders}

    assert {k: o.status for k, o in orders.items()} == {
        "855238581": OrderStatus.COMPLETED, "88502218": OrderStatus.COMPLETED}
    assert by_code(orders["88502218"])["20509-6"].value == "13.4"
    assert by_code(orders["88502218"])["11156-7"].value == "8.2"  # empty in the first message
    assert len(orders["855238581"].results) == 5


def test_a_structured_numeric_value_is_text_and_an_underscore_range_stays_whole() -> None:
    (order,) = mapped_file("ORU-R01-RMGEAD.hl7").orders
    (glucose,) = order.results

    assert (order.external_id, glucose.code, glucose.name) == ("845439", "1554-5", "GLUCOSE")
    assert (glucose.value, glucose.unit, glucose.ref_min, glucose.ref_max) == (
        "182", "mg/dl", "70_105", None)
    assert glucose.abnormal and order.status is OrderStatus.COMPLETED
    assert glucose.result_date == datetime(2002, 2, 15, 7, 30,
                                           tzinfo=timezone(timedelta(hours=6)))  # OBR-7


def test_a_corrected_result_completes_its_order_with_the_new_value() -> None:
    (final,) = mapped_file("ORU_R01_2.5.1_SampleTestCase1.hl7", "filler").orders
    (corrected,) = mapped_file("ORU_R01_2.5.1_SampleTestCase3.hl7", "filler").orders

    assert final.external_id == corrected.external_id == "9700123"
    assert final.status is corrected.status is OrderStatus.COMPLETED
    assert [r.code for r in final.results] == [r.code for r in corrected.results] == [
        "10368-9.1"]  # OBX-4 is 1: the sub-id is part of the row's key
    assert (final.results[0].value, corrected.results[0].value) == ("50", "25")
    assert corrected.results[0].ref_min == "<10 ug/dl"
    assert final.results[0].ref_min == "<9 mcg/dL:  Acceptable background lead exposure"
    # MSH-7 has no offset: site time; OBX-14 has its own
    assert final.changed_at == datetime(2010, 9, 29, 11, 7, 2, tzinfo=MSK)
    assert final.results[0].result_date == datetime(2008, 8, 15, 10, 30,
                                                    tzinfo=timezone(timedelta(hours=-7)))
    assert final.is_older_than(corrected)


def test_three_string_results_with_the_same_set_id_are_three_rows() -> None:
    (order,) = mapped_file("ORU_R01_2.5.1_SampleTestCase6.hl7", "filler").orders

    assert [(r.name, r.value) for r in order.results] == [
        ("Campylobacter Jejuni AB", "Isolated"), ("Salmonella", "Isolated"),
        ("Shigella", "Not Isolated")]


def test_two_obrs_of_one_order_are_one_order_processing_until_both_are_final() -> None:
    (order,) = mapped_file("realm-cj-joeslab.hl7").orders

    assert order.external_id == "23456" and order.status is OrderStatus.PROCESSING
    assert [(r.code, r.value) for r in order.results] == [
        ("625-4.1", "Campylobacter jejuni"), ("10368-9", "50")]


def test_a_message_without_the_configured_order_id_is_refused_naming_the_key() -> None:
    with pytest.raises(MessageProblem, match=r'OBR-2 .placer order number. is empty.*'
                                             r'order_id = "placer"') as caught:
        mapped_file("ORU_R01_2.5.1_SampleTestCase1.hl7", "placer")
    assert caught.value.ack == "AE" and caught.value.where == "OBR^1^2"


def test_order_ids_lists_what_a_message_is_about() -> None:
    (message,) = split_messages((DATA / "LAB-ORU-2.hl7").read_bytes())

    assert order_ids(parse_message(message, "utf-8"), "placer") == ["855238581", "88502218"]


# -- statuses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("obr25", "obx11", "status"), [
    ("F", "F", OrderStatus.COMPLETED), ("C", "C", OrderStatus.COMPLETED),
    ("P", "P", OrderStatus.PROCESSING), ("F", "P", OrderStatus.PROCESSING),
    ("X", "X", OrderStatus.CANCELLED), ("", "F", OrderStatus.COMPLETED),
    ("", "C", OrderStatus.COMPLETED), ("", "P", OrderStatus.PROCESSING),
    ("", "I", OrderStatus.PROCESSING), ("A", "F", OrderStatus.PROCESSING),
    ("O", "", OrderStatus.PROCESSING),
])
def test_order_status_from_obr_25_and_obx_11(obr25: str, obx11: str, status: OrderStatus
                                             ) -> None:
    assert one(obr(obr25), obx(1, "5.4", status=obx11)).status is status


def test_an_order_without_any_obx_and_obr_25_empty_or_o_is_received() -> None:
    assert one(obr("")).status is OrderStatus.RECEIVED
    assert one(obr("O")).status is OrderStatus.RECEIVED


def test_a_cancelled_order_carries_no_results() -> None:
    assert one(obr("X"), obx(1, "5.4")).results == ()


@pytest.mark.parametrize("dropped", ["X", "D", "N", "W"])
def test_obx_that_cannot_be_obtained_or_was_deleted_drops_its_test(dropped: str) -> None:
    order = one(obr(""), obx(1, "5.4"), obx(2, "1.0", code="K^Potassium", status=dropped))

    assert [r.code for r in order.results] == ["GLU"]
    assert order.status is OrderStatus.COMPLETED


def test_a_result_status_that_is_not_one_is_refused() -> None:
    with pytest.raises(MessageProblem, match="OBR-25 'Q' is not a result status"):
        one(obr("Q"), obx(1, "5.4"))


# -- values ------------------------------------------------------------------------------------


def test_values_are_kept_exactly_as_sent_after_unescaping() -> None:
    order = one(obr(), obx(1, "5.40"), obx(2, "a\\S\\b \\T\\ c\\.br\\d\\E\\", vt="ST",
                                             code="T^Text"), obx(3, "\\H\\pos\\N\\", vt="ST",
                                                                 code="P^Pos"))

    assert [r.value for r in order.results] == ["5.40", "a^b & c\nd\\", "pos"]


@pytest.mark.parametrize(("sn", "text"), [("<^5", "<5"), ("^10^-^20", "10-20"),
                                          ("^182", "182"), ("^1^:^128", "1:128"),
                                          (">^100", ">100"), ("^2^+", "2+")])
def test_structured_numbers_are_written_as_text(sn: str, text: str) -> None:
    assert one(obr(), obx(1, sn, vt="SN")).results[0].value == text


def test_coded_values_are_their_text() -> None:
    order = one(obr(), obx(1, "260385009^Negative^SCT", vt="CWE"),
                obx(2, "POS^^L^^^^^^Positive, weak", vt="CWE", code="HIV^HIV"),
                obx(3, "N^^HL70078", vt="CE", code="X^X"))

    assert [r.value for r in order.results] == ["Negative", "Positive, weak", "N"]


def test_repetitions_and_continuation_rows_are_joined_by_line_breaks() -> None:
    order = one(obr(), obx(1, "line 1~line 2", vt="FT", code="NOTE^Note"),
                obx(2, "line 3", vt="FT", code="NOTE^Note"),
                obx(3, "other", vt="FT", code="NOTE^Note", sub="2"))

    assert [(r.code, r.value) for r in order.results] == [
        ("NOTE", "line 1\nline 2\nline 3"), ("NOTE.2", "other")]


def test_the_code_system_is_kept_out_of_the_code_and_text_is_the_name() -> None:
    (row,) = one(obr(), obx(1, "5.4", code="2345-7^Glucose [Mass/volume]^LN")).results
    (named,) = one(obr(), obx(1, "5.4", code="^Глюкоза")).results

    assert (row.code, row.name) == ("2345-7", "Glucose [Mass/volume]")
    assert (named.code, named.name, named.key) == (None, "Глюкоза", "name:Глюкоза")


def test_a_row_with_neither_code_nor_name_is_refused() -> None:
    with pytest.raises(MessageProblem, match="neither a code nor a name"):
        one(obr(), obx(1, "5.4", code=""))


def test_the_unit_is_its_identifier() -> None:
    (row,) = one(obr(), obx(1, "50", unit="ug/dL^microgram per deciliter^UCUM")).results

    assert row.unit == "ug/dL"


@pytest.mark.parametrize(("ref", "low", "high"), [
    ("3.5-5.1", "3.5", "5.1"), ("3.5 - 5.1", "3.5", "5.1"), ("0-10", "0", "10"),
    ("3,5-5,1", "3,5", "5,1"), ("<10", "<10", None), ("-3-3", "-3-3", None),
    ("4.3 to 6.2", "4.3 to 6.2", None), ("M: 13-17 F: 12-15", "M: 13-17 F: 12-15", None),
    ("> 1\\T\\< 5", "> 1&< 5", None), ("", None, None),
])
def test_a_range_is_split_only_when_it_is_unambiguous(ref: str, low: str | None,
                                                      high: str | None) -> None:
    (row,) = one(obr(), obx(1, "5", ref=ref)).results

    assert (row.ref_min, row.ref_max) == (low, high)


@pytest.mark.parametrize(("flag", "abnormal"), [
    ("H", True), ("HH", True), ("L", True), ("LL", True), ("A", True), ("AA", True),
    (">", True), ("<", True), ("N", False), ("", False), ("h", True), ("N~H", True)])
def test_abnormal_flags(flag: str, abnormal: bool) -> None:
    assert one(obr(), obx(1, "5", flag=flag)).results[0].abnormal is abnormal


# -- dates -------------------------------------------------------------------------------------


def test_result_dates_obx_14_else_obr_7_else_obr_22_with_msh_7s_offset_when_none() -> None:
    fields = obr().split("|")
    fields[7], fields[22] = "20240513080000", "20240514110000+0500"
    with_obr7 = "|".join(fields)
    fields[7] = ""
    with_obr22 = "|".join(fields)
    plus3 = timezone(timedelta(hours=3))

    assert one(obr(), obx(1, "5", observed="20240513090000-0100")).results[0].result_date == \
        datetime(2024, 5, 13, 9, tzinfo=timezone(timedelta(hours=-1)))
    assert one(obr(), obx(1, "5", observed="20240513090000")).results[0].result_date == \
        datetime(2024, 5, 13, 9, tzinfo=plus3)
    assert one(with_obr7, obx(1, "5")).results[0].result_date == datetime(2024, 5, 13, 8,
                                                                          tzinfo=plus3)
    assert one(with_obr22, obx(1, "5")).results[0].result_date == datetime(
        2024, 5, 14, 11, tzinfo=timezone(timedelta(hours=5)))
    assert one(obr(), obx(1, "5")).results[0].result_date is None


def test_without_any_offset_a_result_date_stays_site_time_and_changed_at_is_site_time() -> None:
    text = "\r".join(["MSH|^~\\&|L|F|||20240514120000||ORU^R01|M2|P|2.5", obr(),
                      obx(1, "5", observed="20240513090000")])
    (order,) = map_oru(parse_message(text.encode(), "utf-8"), order_id="placer",
                       zone=MSK).orders

    assert order.results[0].result_date == datetime(2024, 5, 13, 9)  # naive: site time
    assert order.changed_at == datetime(2024, 5, 14, 12, tzinfo=MSK)


@pytest.mark.parametrize(("msh7", "match"), [("", "MSH-7 .* is empty"),
                                             ("2024-05-14", "MSH-7: .* not an HL7 date")])
def test_a_message_without_a_usable_msh_7_is_refused(msh7: str, match: str) -> None:
    text = f"MSH|^~\\&|L|F|||{msh7}||ORU^R01|M3|P|2.5\r{obr()}\r"

    with pytest.raises(MessageProblem, match=match):
        map_oru(parse_message(text.encode(), "utf-8"), order_id="placer", zone=MSK)


def test_a_bad_observation_date_is_refused_naming_its_field() -> None:
    with pytest.raises(MessageProblem, match="OBX-14") as caught:
        one(obr(), obx(1, "5", observed="13/05/2024"))
    assert caught.value.where == "OBX^1^14"


# -- what is not an ORU^R01 --------------------------------------------------------------------


def test_another_message_type_is_rejected_with_ar() -> None:
    text = "MSH|^~\\&|L|F|||20240514||ADT^A01|M4|P|2.5\rPID|1\r"

    with pytest.raises(MessageProblem) as caught:
        map_oru(parse_message(text.encode(), "utf-8"), order_id="placer", zone=MSK)
    assert (caught.value.ack, caught.value.code) == ("AR", "200")


def test_a_message_without_control_id_or_obr_or_with_obx_first_is_an_error() -> None:
    for text, match in [
        ("MSH|^~\\&|L|F|||20240514||ORU^R01||P|2.5\r" + obr(), "MSH-10"),
        (MSH.format(id="M5") + "\rPID|1", "no OBR segment"),
        (MSH.format(id="M6") + "\r" + obx(1, "5") + "\r" + obr(), "before any OBR"),
    ]:
        with pytest.raises(MessageProblem, match=match) as caught:
            map_oru(parse_message(text.encode(), "utf-8"), order_id="placer", zone=MSK)
        assert caught.value.ack == "AE"


# -- the PDF -----------------------------------------------------------------------------------

PDF = sample_pdf("hl7 report", size=3000)
B64 = base64.b64encode(PDF).decode("ascii")


@pytest.mark.parametrize("value", [
    f"^AP^PDF^Base64^{B64}",
    f"^application^pdf^Base64^{B64}",
    f"PDF^AP^PDF^BASE64^{B64}",
    f"^AP^^Base64^{B64}",
    f"^^application/pdf^base64^{B64}",
    f"Application^PDF^Base64^{B64}",  # shifted by one
    f"^AP^PDF^Base64^{B64[:1000]}\\.br\\{B64[1000:2000]}\\X0D0A\\{B64[2000:]}",
    f"^AP^PDF^Base64^{B64.rstrip('=')}",  # padding dropped
    f"^AP^PDF^Base64^{B64[:2000]}~{B64[2000:]}",  # split over repetitions
])
def test_an_ed_pdf_in_its_variants_is_the_orders_inline_pdf_and_not_a_row(value: str) -> None:
    order = one(obr(), obx(1, "5.4"), obx(2, value, vt="ED", code="PDF^Report"))

    assert order.pdf is not None and order.pdf.kind is PdfKind.INLINE
    assert order.pdf.data == PDF
    assert [r.code for r in order.results] == ["GLU"]


def test_a_pdf_split_over_continuation_rows_is_joined() -> None:
    order = one(obr(), obx(1, f"^AP^PDF^Base64^{B64[:1600]}", vt="ED", code="PDF^Report"),
                obx(2, B64[1600:], vt="ED", code="PDF^Report"))

    assert order.pdf is not None and order.pdf.data == PDF


def test_a_pdf_sent_as_text_is_found_by_its_base64_signature() -> None:
    order = one(obr(), obx(1, B64, vt="TX", code="RPT^Report"))

    assert order.pdf is not None and order.pdf.data == PDF and order.results == ()


def test_base64_that_does_not_decode_is_refused_as_an_empty_pdf_with_a_note() -> None:
    result = mapped(obr(), obx(1, "5.4"), obx(2, "^AP^PDF^Base64^JVBER!!not*base64",
                                              vt="ED", code="PDF^Report"))
    (order,) = result.orders

    assert order.pdf is not None and order.pdf.data == b""  # labsync.pdfs refuses it
    assert any("does not decode" in n for n in result.notes)
    assert [r.code for r in order.results] == ["GLU"]


def test_an_ed_that_is_not_a_pdf_is_left_out_with_a_note() -> None:
    png = base64.b64encode(b"\x89PNG\r\n" + b"0" * 50).decode()
    result = mapped(obr(), obx(1, f"^IM^PNG^Base64^{png}", vt="ED", code="IMG^Image"))
    (order,) = result.orders

    assert order.pdf is None and order.results == ()
    assert any("not a PDF" in n for n in result.notes)


def test_each_order_of_a_message_gets_its_own_pdf() -> None:
    other = base64.b64encode(sample_pdf("second")).decode()
    orders = mapped(obr(placer="A"), obx(1, f"^AP^PDF^Base64^{B64}", vt="ED", code="R^R"),
                    obr(placer="B"), obx(1, f"^AP^PDF^Base64^{other}", vt="ED",
                                         code="R^R")).orders

    assert [(o.external_id, o.pdf.data if o.pdf else None) for o in orders] == [
        ("A", PDF), ("B", sample_pdf("second"))]
