"""`labsync check` and the mail templates: the site's (Bitrix backend) or labsync's own (SMTP)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from labsync.checks import check_all, run_checks
from tests.conftest import make_config

# The columns of Bitrix's b_event_message / b_event_message_site that the check reads.
_DDL = [
    "CREATE TABLE IF NOT EXISTS b_event_message (ID INT NOT NULL PRIMARY KEY, "
    "EVENT_NAME VARCHAR(255) NOT NULL, LID CHAR(2), ACTIVE CHAR(1) NOT NULL DEFAULT 'Y', "
    "SUBJECT VARCHAR(255))",
    "CREATE TABLE IF NOT EXISTS b_event_message_site (EVENT_MESSAGE_ID INT NOT NULL, "
    "SITE_ID CHAR(2) NOT NULL, PRIMARY KEY (EVENT_MESSAGE_ID, SITE_ID))",
]


@pytest.fixture
def templates(db):
    with db.engine.begin() as conn:
        for statement in _DDL:
            conn.execute(text(statement))
        conn.execute(text("DELETE FROM b_event_message_site"))
        conn.execute(text("DELETE FROM b_event_message"))
    yield db
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE b_event_message_site"))
        conn.execute(text("DROP TABLE b_event_message"))


def _template(db, message_id, event, *, active="Y", lid=None, sites=()):
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO b_event_message (ID, EVENT_NAME, LID, ACTIVE) "
                          "VALUES (:i, :e, :l, :a)"), {"i": message_id, "e": event, "l": lid,
                                                      "a": active})
        for site in sites:
            conn.execute(text("INSERT INTO b_event_message_site VALUES (:i, :s)"),
                         {"i": message_id, "s": site})


def _template_problems(config):
    problems, _notes = run_checks(config)
    return [p for p in problems if p.startswith("notify.")]


def test_no_template_for_either_event_is_two_problems(templates, fake_lis, tmp_path):
    problems = _template_problems(make_config(templates, fake_lis, tmp_path / "p"))
    assert len(problems) == 2
    assert problems[0].startswith("notify.event_name: no active mail template for "
                                  "LAB_RESULTS_READY on site s1")
    assert problems[1].startswith("notify.updated_event_name:")


def test_active_templates_bound_to_the_site_are_fine(templates, fake_lis, tmp_path):
    _template(templates, 1, "LAB_RESULTS_READY", sites=("s1",))
    _template(templates, 2, "LAB_RESULTS_UPDATED", lid="s1")  # older Bitrix: LID column
    assert _template_problems(make_config(templates, fake_lis, tmp_path / "p")) == []


def test_inactive_or_other_site_templates_do_not_count(templates, fake_lis, tmp_path):
    _template(templates, 1, "LAB_RESULTS_READY", active="N", sites=("s1",))
    _template(templates, 2, "LAB_RESULTS_UPDATED", sites=("s2",))
    assert len(_template_problems(make_config(templates, fake_lis, tmp_path / "p"))) == 2


def test_without_the_template_tables_the_check_says_it_could_not_look(db, fake_lis, tmp_path):
    problems, notes = run_checks(make_config(db, fake_lis, tmp_path / "p"))
    assert not [p for p in problems if p.startswith("notify.")]
    assert any("mail templates not checked" in n for n in notes)


def test_a_template_check_that_could_not_look_is_skipped_not_ok(db, fake_lis, tmp_path):
    report = check_all(make_config(db, fake_lis, tmp_path / "p"))
    [finding] = [f for f in report.findings if "mail template" in f.text]
    assert finding.verdict == "skipped"
    assert finding.text.startswith("mail templates not checked: b_event_message is not readable")


def test_active_templates_are_ok_findings_naming_event_and_site(templates, fake_lis, tmp_path):
    _template(templates, 1, "LAB_RESULTS_READY", sites=("s1",))
    _template(templates, 2, "LAB_RESULTS_UPDATED", sites=("s1",))
    report = check_all(make_config(templates, fake_lis, tmp_path / "p"))
    assert [(f.verdict, f.text) for f in report.findings if "mail template" in f.text] == [
        ("ok", "mail template for LAB_RESULTS_READY on site s1 is active"),
        ("ok", "mail template for LAB_RESULTS_UPDATED on site s1 is active"),
    ]


def test_with_the_smtp_backend_the_site_templates_are_not_asked_about(db, fake_lis, tmp_path):
    config = make_config(db, fake_lis, tmp_path / "p", notify={"backend": "smtp"},
                         smtp={"host": "127.0.0.1", "port": 1, "from": "lab@example.ru",
                               "starttls": False, "site_url": "https://lab.example.ru"})
    report = check_all(config)
    assert not [f for f in report.findings if "b_event_message" in f.text
                or "mail template for" in f.text]
    # Its own templates are checked instead: the built-in set, as nothing else is configured.
    assert [f.verdict for f in report.findings if f.text.startswith("mail: ")] == ["ok"]
