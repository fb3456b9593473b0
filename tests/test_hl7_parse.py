"""Reading HL7 v2 text: messages out of files and frames, MSH-18 charsets, escapes, dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from labsync.lis.hl7.dates import BadDate, parse_dtm, with_offset_of
from labsync.lis.hl7.parse import (
    MessageProblem,
    delivery_id,
    parse_message,
    read_header,
    split_messages,
)
from labsync.lis.hl7.text import CharsetError, Delimiters, codec_for, unescape

DATA = Path(__file__).parent / "data" / "hl7v2"
SHARED = Path(__file__).parents[2] / "shared" / "data" / "hl7v2"
D = Delimiters()


def _msh(charset: str = "", control: str = "C1", rest: str = "") -> str:
    return (f"MSH|^~\\&|LAB|FAC|SITE|SF|20240514120000||ORU^R01|{control}|P|2.5.1"
            f"||||||{charset}{rest}")


# -- splitting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.hl7")))
def test_every_real_message_is_one_message_starting_at_msh(name: str) -> None:
    (message,) = split_messages((DATA / name).read_bytes())

    assert message.startswith(b"MSH|^~\\&|")  # a byte-order mark in front is gone
    assert b"\n" not in message and b"\r\r" not in message


def test_the_test_data_is_the_shared_data_byte_for_byte() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not on this machine")
    for path in SHARED.glob("*.hl7"):
        assert (DATA / path.name).read_bytes() == path.read_bytes()


def test_segments_may_end_in_cr_lf_or_crlf_mixed_within_one_message() -> None:
    data = (_msh() + "\rPID|1\nOBR|1|A\r\nOBX|1|ST|X||v\n\n\r\n").encode()

    (message,) = split_messages(data)

    assert message.split(b"\r") == [_msh().encode(), b"PID|1", b"OBR|1|A", b"OBX|1|ST|X||v"]


def test_a_file_holds_several_messages_and_batch_envelopes_are_dropped() -> None:
    data = ("FHS|^~\\&|LAB\rBHS|^~\\&|LAB\r" + _msh(control="A") + "\rOBR|1|X\r"
            + _msh(control="B") + "\rOBR|1|Y\rBTS|2\rFTS|1\r").encode()

    messages = split_messages(data)

    assert [m.split(b"\r")[0].split(b"|")[9] for m in messages] == [b"A", b"B"]
    assert all(b"BTS" not in m and b"FHS" not in m for m in messages)


def test_mllp_framing_bytes_and_a_bom_around_a_message_are_dropped() -> None:
    data = b"\x0b\xef\xbb\xbf" + _msh().encode() + b"\rOBR|1|X\r\x1c\r"

    assert split_messages(data) == [_msh().encode() + b"\rOBR|1|X"]


def test_a_raw_newline_inside_a_value_continues_its_segment_instead_of_being_lost() -> None:
    data = (_msh() + "\rOBX|1|TX|NOTE||first line\nsecond line, lower case\rOBX|2|ST|X||y\r"
            ).encode()

    segments = split_messages(data)[0].split(b"\r")

    assert segments[1] == b"OBX|1|TX|NOTE||first line\nsecond line, lower case"
    assert segments[2] == b"OBX|2|ST|X||y"


def test_text_without_any_msh_is_one_message_whose_problem_is_reported() -> None:
    (message,) = split_messages(b"hello\r\nworld")

    with pytest.raises(MessageProblem, match="does not start with an MSH segment"):
        read_header(message, "utf-8")
    assert split_messages(b"\r\n \n") == []


# -- the header and the delivery id -----------------------------------------------------------


def test_the_header_gives_the_id_the_ack_and_the_order_need() -> None:
    raw = (DATA / "realm-cj-joeslab.hl7").read_bytes()
    header = read_header(split_messages(raw)[0], "utf-8")

    assert header.control_id == "1234567890"
    assert header.kind == ("ORU", "R01")
    assert header.timestamp == "20080818183002.1-0700"
    assert header.delivery_id == "Lab1^1234^CLIA|Joe's Lab^1234^CLIA|1234567890"


def test_a_delivery_id_is_the_control_id_alone_without_a_sender_and_fits_its_column() -> None:
    assert delivery_id("", "", "MSG-1") == "MSG-1"
    assert delivery_id("LAB", "", "MSG-1") == "LAB||MSG-1"
    long = delivery_id("A" * 300, "F", "MSG-1")
    assert len(long) <= 200 and long.startswith("MSG-1|sha256:")
    assert long == delivery_id("A" * 300, "F", "MSG-1")  # stable: a resend has the same id
    assert long != delivery_id("A" * 299, "F", "MSG-1")


def test_the_same_control_id_from_another_sender_is_another_delivery() -> None:
    first = read_header((_msh(control="77")).encode(), "utf-8")
    other = read_header(_msh(control="77").replace("|LAB|", "|LAB2|").encode(), "utf-8")

    assert first.delivery_id != other.delivery_id


def test_unusual_delimiters_are_read_from_msh_2() -> None:
    header = read_header(b"MSH#$*@%#LAB#FAC###20240514##ORU$R01#C9#P#2.5", "utf-8")

    assert (header.delims.field, header.delims.component, header.delims.repetition,
            header.delims.escape, header.delims.subcomponent) == ("#", "$", "*", "@", "%")
    assert header.kind == ("ORU", "R01") and header.control_id == "C9"


@pytest.mark.parametrize("msh", [
    b"MSH|  4|LAB|FAC|||20240514||ORU^R01|C1|P|2.5",  # found by the fuzz test (CI, stop 17)
    b"MSH|^^\\&|LAB|FAC|||20240514||ORU^R01|C1|P|2.5",
    b"MSH|&|LAB|FAC|||20240514||ORU^R01|C1|P|2.5",  # the default sub-component separator twice
    b"MSH|^~A&|LAB|FAC|||20240514||ORU^R01|C1|P|2.5",
    b"MSH|^~\x01&|LAB|FAC|||20240514||ORU^R01|C1|P|2.5",
])
def test_separators_that_cannot_split_a_message_are_a_problem_on_msh_2(msh: bytes) -> None:
    with pytest.raises(MessageProblem, match="MSH-") as caught:
        parse_message(msh + b"\rOBX|1|ST|X||1\r", "utf-8")

    assert caught.value.code == "102" and caught.value.where == "MSH^1^2"


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.hl7")))
def test_segments_and_fields_are_what_python_hl7_makes_of_every_real_message(name: str) -> None:
    hl7 = pytest.importorskip("hl7")
    for data in split_messages((DATA / name).read_bytes()):
        ours = parse_message(data, "utf-8")
        text = data.decode(ours.header.codec)
        # hl7.parse strips the text: a last segment of its own keeps the real last one whole
        theirs = [[str(f) for f in seg] for seg in hl7.parse(f"{text}\rZZZ|")][:-1]

        assert [list(seg.fields) for seg in ours.segments] == theirs


# -- charsets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("msh18", "codec"), [
    ("", "cp1251"), ("ASCII", "cp1251"), ("8859", "iso8859-1"), ("8859/1", "iso8859-1"),
    ("8859/5", "iso8859-5"), ("8859/9", "iso8859-9"), ("UNICODE UTF-8", "utf-8"),
    ("unicode  utf-8", "utf-8"), ("CP1251", "cp1251"), ("WINDOWS-1251", "cp1251"),
])
def test_msh_18_names_the_charset_per_table_0211_and_empty_or_ascii_means_the_default(
        msh18: str, codec: str) -> None:
    assert codec_for(msh18, "cp1251") == codec


@pytest.mark.parametrize("msh18", ["KLINGON", "8859/0", "UNICODE UTF-16", "ISO IR87"])
def test_a_charset_labsync_does_not_know_is_an_error_not_a_guess(msh18: str) -> None:
    with pytest.raises(CharsetError, match="MSH-18"):
        codec_for(msh18, "utf-8")


def test_a_cp1251_message_is_decoded_in_cp1251() -> None:
    data = (_msh("CP1251") + "\rOBX|1|ST|GLU^Глюкоза||норма|ммоль/л\r").encode("cp1251")

    message = parse_message(split_messages(data)[0], "utf-8")
    obx = next(message.named("OBX"))

    assert obx[3].comp(2) == "Глюкоза" and obx[5].text == "норма" and obx[6].text == "ммоль/л"


def test_an_empty_msh_18_uses_the_configured_encoding() -> None:
    data = (_msh() + "\rOBX|1|ST|X||Тест\r").encode("cp1251")

    assert next(parse_message(data, "cp1251").named("OBX"))[5].text == "Тест"
    with pytest.raises(MessageProblem, match="not valid utf-8"):
        parse_message(data, "utf-8")


def test_an_unknown_charset_in_a_message_is_a_problem_with_table_error_103() -> None:
    with pytest.raises(MessageProblem) as caught:
        read_header(_msh("EBCDIC").encode(), "utf-8")

    assert caught.value.code == "103" and caught.value.where == "MSH^1^18"
    assert caught.value.ack == "AE"


# -- escapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "text"), [
    ("a\\F\\b", "a|b"), ("a\\S\\b", "a^b"), ("a\\T\\b", "a&b"), ("a\\R\\b", "a~b"),
    ("a\\E\\b", "a\\b"), ("one\\.br\\two", "one\ntwo"), ("\\H\\bold\\N\\ text", "bold text"),
    ("x\\.sp2\\y", "x\n\ny"), ("x\\.sk3\\y", "x   y"), ("\\.in+4\\x", "x"),
    ("\\Zlocal\\x", "x"), ("\\X41\\BC", "ABC"),
])
def test_each_escape_sequence_becomes_what_it_stands_for(raw: str, text: str) -> None:
    assert unescape(raw, D, "utf-8") == text


def test_hex_escapes_are_bytes_in_the_messages_charset_even_split_over_two_escapes() -> None:
    assert unescape("\\XD0B0\\", D, "utf-8") == "а"
    assert unescape("\\XD0\\\\XB0\\", D, "utf-8") == "а"  # one character, two escapes
    assert unescape("\\XE0\\", D, "cp1251") == "а"
    assert unescape("\\X0D0A\\", D, "utf-8") == "\r\n"


def test_an_escaped_escape_before_letters_keeps_them(  # python-hl7 issue #84
        ) -> None:
    assert unescape("\\E\\R\\", D, "utf-8") == "\\R\\"


def test_text_that_only_looks_like_escapes_is_kept_as_written() -> None:
    assert unescape("C:\\dir\\file.txt", D, "utf-8") == "C:\\dir\\file.txt"
    assert unescape("5 \\ 3", D, "utf-8") == "5 \\ 3"  # never closed
    assert unescape("a\\Q\\b", D, "utf-8") == "a\\Q\\b"  # not a sequence
    assert unescape("\\XZZ\\", D, "utf-8") == "\\XZZ\\"  # not hex


def test_escaping_for_an_ack_round_trips_through_unescape() -> None:
    text = "OBX-5 | has ^ and ~ and & and \\ and\na break"

    assert unescape(D.escaped(text), D, "utf-8") == text
    assert all(c not in D.escaped(text) for c in "|^~&\n")


# -- fields -----------------------------------------------------------------------------------


def test_fields_split_into_repetitions_components_and_subcomponents() -> None:
    data = (_msh() + "\rOBR|1|T09-1&OLIS&ISO^^OLIS_Site_ID^ISO|X^MOLIS|A^B~C^D\r").encode()
    obr = next(parse_message(data, "utf-8").named("OBR"))

    assert obr[2].first() == "T09-1" and obr[3].first() == "X"
    assert [r.comp(2) for r in obr[4].reps()] == ["B", "D"]
    assert obr[99].text == "" and not obr[99]


def test_the_last_field_of_the_last_segment_keeps_its_trailing_blanks() -> None:
    data = (_msh() + "\rOBX|1|ST|X||two spaces  ").encode()

    assert next(parse_message(data, "utf-8").named("OBX"))[5].text == "two spaces  "


def test_msh_fields_are_numbered_as_the_standard_numbers_them() -> None:
    msh = next(parse_message(_msh("UNICODE UTF-8").encode(), "utf-8").named("MSH"))

    assert (msh[3].text, msh[9].text, msh[10].text, msh[18].text) == (
        "LAB", "ORU^R01", "C1", "UNICODE UTF-8")


# -- dates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "moment"), [
    ("20240514", datetime(2024, 5, 14)),
    ("202405141230", datetime(2024, 5, 14, 12, 30)),
    ("20240514123005.25", datetime(2024, 5, 14, 12, 30, 5, 250000)),
    ("20240514123005+0300", datetime(2024, 5, 14, 12, 30, 5,
                                     tzinfo=timezone(timedelta(hours=3)))),
    ("20080818183002.1-0700", datetime(2008, 8, 18, 18, 30, 2, 100000,
                                       tzinfo=timezone(timedelta(hours=-7)))),
    ("200808151030-0700", datetime(2008, 8, 15, 10, 30, tzinfo=timezone(timedelta(hours=-7)))),
    ("", None),
])
def test_hl7_dates_with_and_without_offsets(text: str, moment: datetime | None) -> None:
    assert parse_dtm(text) == moment
    if moment is not None:
        assert (parse_dtm(text).tzinfo is None) == (moment.tzinfo is None)  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ["2024-05-14", "20241340", "20240514+03", "20240230",
                                  "20240514120000+2500", "yesterday"])
def test_what_is_not_an_hl7_date_is_refused(text: str) -> None:
    with pytest.raises(BadDate):
        parse_dtm(text)


def test_a_time_without_offset_takes_the_offset_of_msh_7_if_that_has_one() -> None:
    plus7 = datetime(2014, 10, 6, 9, 31, tzinfo=timezone(timedelta(hours=7)))
    naive = datetime(2014, 10, 6, 8, 30)

    assert with_offset_of(naive, plus7) == naive.replace(tzinfo=timezone(timedelta(hours=7)))
    assert with_offset_of(naive, datetime(2014, 10, 6)) == naive  # neither: site time
    aware = datetime(2014, 10, 6, 8, 30, tzinfo=UTC)
    assert with_offset_of(aware, plus7) is aware
