"""`labsync check` warns when the site has no active mail template for labsync's events."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from labsync.checks import run_checks
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
