"""Discovery: orders found in the LIS by phone, attached only when one site user matches.

Engine tests run on SQLite and on real MariaDB (the ``db`` fixture) against the fake QLAB
over HTTP; the phone and matching tests are pure.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from labsync.config import Config
from labsync.config.discovery import DiscoveryConfig, discovery_config_from
from labsync.discovery.job import DiscoveryJob, DiscoverySummary, _Run
from labsync.discovery.matching import Attach, Candidate, Review, decide, normalise_name
from labsync.discovery.phones import normalise_phone, phones_in
from labsync.discovery.review import collect_review, dismiss_review, render_review
from labsync.errors import Interrupted
from labsync.lis.qlab import QlabClient
from labsync.model import LisOrderRef, OrderStatus, Patient
from labsync.store.db import detect_text_fitter, make_engine
from labsync.store.tables import b_user_phone_auth
from labsync.store.tx import run_tx
from labsync.testing.fake_qlab import Fault
from tests.conftest import add_order, add_user
from tests.helpers import RESULTS, event_log, events, order_row, results, run_pass

NOW = datetime(2026, 11, 20, 9, 0)  # UTC; 12:00 on the site (Europe/Moscow)
RECENT_LOGIN = datetime(2026, 11, 19, 18, 30)  # site time
PHONE = "+79161234567"
BORN = "1980-05-01"


@dataclass
class Clock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@contextmanager
def discovery(config: Config, clock: Clock | None = None,
              **settings: Any) -> Iterator[DiscoveryJob]:
    """A discovery job on the test database and the fake LIS; retry waits do not sleep."""
    engine = make_engine(config.database)
    lis = QlabClient(config.lis, sleep=lambda _s: None)
    try:
        yield DiscoveryJob(DiscoveryConfig(**{"enabled": True, **settings}), engine, lis,
                           detect_text_fitter(engine), zone=config.site.timezone, site_id="s1",
                           now=clock or Clock())
    finally:
        lis.close()
        engine.dispose()


def run_discovery(config: Config, clock: Clock | None = None, **settings: Any) -> DiscoverySummary:
    with discovery(config, clock, **settings) as job:
        return job.run()


def site_user(db: Any, user_id: int, *, last_name: str = "Иванова", born: str | None = BORN,
              mobile: str | None = None, phone: str | None = None, auth_phone: str | None = None,
              last_login: datetime | None = RECENT_LOGIN, active: str = "Y") -> None:
    add_user(db, user_id, last_name=last_name, active=active, PERSONAL_MOBILE=mobile,
             PERSONAL_PHONE=phone, LAST_LOGIN=last_login,
             PERSONAL_BIRTHDAY=date.fromisoformat(born) if born else None)
    if auth_phone is not None:
        with db.engine.begin() as conn:
            conn.execute(insert(b_user_phone_auth).values(USER_ID=user_id,
                                                          PHONE_NUMBER=auth_phone))


def lis_order(fake_lis: Any, external_id: str, *, phone: str = PHONE, last_name: str = "Иванова",
              born: str | None = BORN, status: str = "completed", **extra: Any) -> None:
    fake_lis.add_order(external_id, status=status, results=RESULTS, order_date="2026-11-19",
                       patient={"phone": phone, "last_name": last_name, "first_name": "Анна",
                                "birth_date": born}, **extra)


def local_orders(db: Any) -> list[Any]:
    return db.rows("SELECT USER_ID, EXTERNAL_ORDER_ID, STATUS FROM local_lab_orders ORDER BY ID")


def rotation(db: Any) -> dict[int, Any]:
    rows = db.rows("SELECT USER_ID, LAST_CHECKED_AT, ORDERS_FOUND FROM labsync_discovery")
    return {r.USER_ID: r for r in rows}


# -- phones (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("8 (916) 123-45-67", PHONE),  # the Russian trunk prefix 8
    ("+7 916 1234567", PHONE),
    ("89161234567", PHONE),
    ("916-123-45-67", PHONE),  # no prefix at all: the default region's
    ("79161234567", PHONE),  # country code without the +
    ("+7 (916) 123 45 67", PHONE),
    ("  8-916-123-45-67  ", PHONE),
    ("+7 (495) 123-45-67 доб. 12", "+74951234567"),  # an extension is not part of E.164
    ("+44 20 7946 0958", "+442079460958"),
    ("8 800 555-35-35", None),  # toll-free: a company's line, not a patient's
    ("123", None),
    ("abc", None),
    ("", None),
    ("   ", None),
    (None, None),
    ("00 7 916 123 45 67", None),
    ("1" * 300, None),
])
def test_phone_formats_normalise_to_e164_or_nothing(text, expected):
    assert normalise_phone(text, "RU") == expected


def test_free_text_fields_yield_every_number_in_them():
    assert phones_in("8-916-123-45-67, 8 495 123-45-67", "RU") == [PHONE, "+74951234567"]
    assert phones_in("89161234567 (мама)", "RU") == [PHONE]
    assert phones_in("8 (916) 123-45-67", "RU") == [PHONE]
    assert phones_in("позвонить после 18:00", "RU") == []
    assert phones_in(None, "RU") == []


def test_default_region_applies_to_numbers_without_country_code():
    assert normalise_phone("8 (701) 123-45-67", "KZ") == "+77011234567"
    assert normalise_phone("701 123 4567", "KZ") == "+77011234567"


# -- matching (pure) --------------------------------------------------------------------------

BIRTHDAY = date(1980, 5, 1)


def patient(last_name: str | None = "Иванова", born: date | None = BIRTHDAY) -> Patient:
    return Patient(phone=PHONE, last_name=last_name, first_name="Анна", birth_date=born)


@pytest.mark.parametrize(("lis", "site"), [
    ("СЕМЁНОВА", "Семенова"),
    ("семенова", "СЕМЁНОВА"),
    ("Петрова-Водкина", "петрова водкина"),
    ("  Петрова  -  Водкина ", "Петрова-Водкина"),
    ("Ｉｖａｎｏｖａ", "ivanova"),  # full-width letters (NFKC)
    ("Семе\u0308нова", "Семенова"),  # ё written as е + combining diaeresis
])
def test_last_names_compare_case_and_yo_insensitively(lis, site):
    assert normalise_name(lis) == normalise_name(site)
    assert decide(patient(lis), [Candidate(7, site, BIRTHDAY)]) == Attach(7)


def test_different_last_names_do_not_compare_equal():
    assert normalise_name("Иванова") != normalise_name("Иванов")
    assert normalise_name("Ефимова") != normalise_name("Фимова")


def test_auto_requires_both_factors_when_the_lis_gives_both():
    wrong_date = [Candidate(7, "Иванова", date(1981, 5, 1))]
    wrong_name = [Candidate(7, "Петрова", BIRTHDAY)]
    assert decide(patient(), wrong_date) == Review(
        "mismatch", (7,), "user 7: birth date differs, last name matches")
    assert decide(patient(), wrong_name) == Review(
        "mismatch", (7,), "user 7: birth date matches, last name differs")


def test_auto_requires_the_one_factor_the_lis_gives():
    assert decide(patient(born=None), [Candidate(7, "Иванова", None)]) == Attach(7)
    assert decide(patient(last_name=None), [Candidate(7, None, BIRTHDAY)]) == Attach(7)
    assert decide(patient(last_name=" "), [Candidate(7, "Петрова", BIRTHDAY)]) == Attach(7)
    assert isinstance(decide(patient(born=None), [Candidate(7, "Петрова", BIRTHDAY)]), Review)


def test_no_second_factor_from_the_lis_goes_to_review():
    decision = decide(patient(last_name=None, born=None), [Candidate(7, "Иванова", BIRTHDAY)])
    assert isinstance(decision, Review) and decision.reason == "no_second_factor"
    assert decision.candidates == (7,)


def test_a_site_user_without_birthday_never_matches_on_birth_date():
    decision = decide(patient(), [Candidate(7, "Иванова", None)])
    assert decision == Review("mismatch", (7,),
                              "user 7: birth date missing on the site, last name matches")
    assert decide(patient(), [Candidate(7, "Иванова", None)], "last_name") == Attach(7)


@pytest.mark.parametrize(("mode", "lis_patient", "expected"), [
    ("both", patient(), Attach(7)),
    ("both", patient(born=None), "no_second_factor"),
    ("both", patient(last_name=None), "no_second_factor"),
    ("birth_date", patient(last_name="Петрова"), Attach(7)),
    ("birth_date", patient(born=None), "no_second_factor"),
    ("last_name", patient(born=date(2001, 1, 1)), Attach(7)),
    ("last_name", patient(last_name=None), "no_second_factor"),
])
def test_match_modes(mode, lis_patient, expected):
    decision = decide(lis_patient, [Candidate(7, "Иванова", BIRTHDAY)], mode)
    if isinstance(expected, str):
        assert isinstance(decision, Review) and decision.reason == expected
    else:
        assert decision == expected


def test_family_sharing_a_phone_attaches_to_the_one_who_matches():
    family = [Candidate(7, "Иванова", BIRTHDAY), Candidate(8, "Иванов", date(2012, 3, 4))]
    son = Patient(phone=PHONE, last_name="ИВАНОВ", birth_date=date(2012, 3, 4))
    assert decide(son, family) == Attach(8)
    assert decide(patient(), family) == Attach(7)


def test_two_matching_users_are_ambiguous_and_none_is_picked():
    twins = [Candidate(8, "Иванова", BIRTHDAY), Candidate(7, "Иванова", BIRTHDAY),
             Candidate(9, "Петрова", BIRTHDAY)]
    decision = decide(patient(), twins)
    assert isinstance(decision, Review) and decision.reason == "ambiguous"
    assert decision.candidates == (7, 8, 9)
    assert decision.detail.startswith("users 7, 8 all match")


def test_no_candidates_means_nothing_to_decide():
    assert decide(patient(), []) is None


def test_a_user_found_through_two_phones_counts_once():
    same = [Candidate(7, "Иванова", BIRTHDAY), Candidate(7, "Иванова", BIRTHDAY)]
    assert decide(patient(), same) == Attach(7)


# -- config (pure) ----------------------------------------------------------------------------


def test_discovery_is_off_by_default():
    config, problems = discovery_config_from({})
    assert problems == [] and config == DiscoveryConfig() and config.enabled is False
    assert (config.default_region, config.match, config.per_pass) == ("RU", "auto", 500)
    assert config.max_lookups_per_hour == 2000
    assert discovery_config_from(None) == (DiscoveryConfig(), [])


def test_discovery_config_reads_every_key():
    config, problems = discovery_config_from({
        "enabled": True, "default_region": "kz", "match": "both", "lookback_days": 14,
        "per_pass": 200, "eligible_days": 60, "recheck": "12h", "interval": "30m"})
    assert problems == []
    assert config == DiscoveryConfig(enabled=True, default_region="KZ", match="both",
                                     lookback_days=14, per_pass=200, eligible_days=60,
                                     recheck=43200.0, interval=1800.0)
    assert config.max_lookups_per_hour == 400


def test_discovery_config_reports_every_problem_with_its_key():
    config, problems = discovery_config_from({
        "enabled": "yes", "default_region": "XX", "match": "phone", "lookback_days": 0,
        "per_pass": True, "eligible_days": "30", "recheck": "6 hours", "interval": "0m",
        "colour": "blue"})
    assert config == DiscoveryConfig()
    assert [p.split(":")[0] for p in problems] == [
        "discovery.colour", "discovery.enabled", "discovery.default_region", "discovery.match",
        "discovery.lookback_days", "discovery.per_pass", "discovery.eligible_days",
        "discovery.recheck", "discovery.interval"]
    assert discovery_config_from([1]) == (DiscoveryConfig(),
                                          ["discovery: must be a table ([discovery])"])


# -- the job on a real database and the fake LIS ---------------------------------------------


def test_matching_order_is_attached_and_a_normal_pass_completes_it(db, fake_lis, config):
    site_user(db, 7, last_name="Семенова", mobile="8 (916) 123-45-67")
    lis_order(fake_lis, "QL-1", last_name="СЕМЁНОВА")

    summary = run_discovery(config)

    assert (summary.users, summary.lookups, summary.attached, summary.review) == (1, 1, 1, 0)
    order = order_row(db, "QL-1")
    assert (order.USER_ID, order.STATUS, str(order.ORDER_DATE)) == (7, "received", "2026-11-19")
    assert rotation(db)[7].ORDERS_FOUND == 1
    assert event_log(db) == [] and collect_review(db.engine) == []

    passed = run_pass(config)

    assert (passed.checked, passed.completed, passed.events) == (1, 1, 1)
    assert order_row(db, "QL-1").STATUS == "completed"
    assert [r.TEST_CODE for r in results(db, "QL-1")] == ["GLU", "HGB", "HIV"]
    assert all(r.PDF_PATH.endswith("7/QL-1.pdf") for r in results(db, "QL-1"))
    assert len(events(db)) == 1


def test_an_order_the_site_has_is_left_alone(db, fake_lis, config):
    site_user(db, 7, mobile=PHONE)
    add_order(db, "QL-1", 9, status="completed")
    lis_order(fake_lis, "QL-1")

    summary = run_discovery(config)

    assert (summary.lookups, summary.orders_new, summary.attached) == (1, 0, 0)
    assert [tuple(r) for r in local_orders(db)] == [(9, "QL-1", "completed")]


def test_inserting_an_order_someone_else_just_inserted_is_not_an_error(db, fake_lis, config):
    site_user(db, 7, mobile=PHONE)
    ref = LisOrderRef("QL-1", OrderStatus.RECEIVED, date(2026, 11, 19), patient())
    with discovery(config) as job:
        race = _Run(job, NOW, DiscoverySummary())
        first = run_tx(job.engine, lambda conn: race._attach(conn, ref, 7))
        second = run_tx(job.engine, lambda conn: race._attach(conn, ref, 7))
    assert (first, second) == (True, False)
    assert [tuple(r) for r in local_orders(db)] == [(7, "QL-1", "received")]


def test_last_name_mismatch_goes_to_review_and_the_admin_log_once(db, fake_lis, config):
    site_user(db, 7, last_name="Иванова", auth_phone=PHONE)
    lis_order(fake_lis, "QL-2", last_name="Петрова")
    clock = Clock()

    first = run_discovery(config, clock)
    clock.advance(hours=7)
    second = run_discovery(config, clock)

    assert (first.review, second.review, first.attached + second.attached) == (1, 1, 0)
    assert fake_lis.request_count("orders") == 2
    assert local_orders(db) == []
    [case] = collect_review(db.engine)
    assert (case["order"], case["reason"], case["candidates"], case["phone"]) == (
        "QL-2", "mismatch", [7], PHONE)
    assert case["detail"] == "user 7: birth date matches, last name differs"
    assert (case["first_seen"], case["last_seen"]) == ("2026-11-20T09:00:00Z",
                                                       "2026-11-20T16:00:00Z")
    [line] = event_log(db)
    assert (line.ITEM_ID, line.SEVERITY, line.AUDIT_TYPE_ID, line.MODULE_ID) == (
        "QL-2", "WARNING", "LAB_SYNC", "labsync")
    assert "…4567" in line.DESCRIPTION and PHONE not in line.DESCRIPTION
    assert "users 7" in line.DESCRIPTION
    assert str(line.TIMESTAMP_X).startswith("2026-11-20 12:00:00")  # site time


def test_two_users_one_phone_both_matching_is_ambiguous(db, fake_lis, config):
    site_user(db, 7, auth_phone=PHONE)
    site_user(db, 8, phone="8 916 123 45 67", last_login=None)  # found by phone, not eligible
    lis_order(fake_lis, "QL-3")

    summary = run_discovery(config)

    assert (summary.review, summary.attached) == (1, 0)
    assert local_orders(db) == []
    [case] = collect_review(db.engine)
    assert (case["reason"], case["candidates"]) == ("ambiguous", [7, 8])
    assert len(event_log(db)) == 1


def test_a_shared_phone_is_asked_once_per_run_and_attaches_to_the_matching_user(
        db, fake_lis, config):
    site_user(db, 7, last_name="Иванова", mobile="+7 916 123-45-67")
    site_user(db, 8, last_name="Иванов", born="2012-03-04", mobile="89161234567")
    lis_order(fake_lis, "QL-4", last_name="Иванов", born="2012-03-04")

    summary = run_discovery(config)

    assert (summary.users, summary.lookups, summary.attached) == (2, 1, 1)
    assert fake_lis.request_count("orders") == 1
    assert [tuple(r) for r in local_orders(db)] == [(8, "QL-4", "received")]


def test_unknown_patient_phone_is_never_asked_and_nothing_is_recorded(db, fake_lis, config):
    site_user(db, 7, mobile=PHONE)
    lis_order(fake_lis, "QL-5", phone="+79031112233")

    summary = run_discovery(config)

    assert (summary.lookups, summary.orders_new) == (1, 0)
    assert local_orders(db) == [] and collect_review(db.engine) == [] and event_log(db) == []


def test_an_order_whose_patient_phone_no_site_user_has_is_ignored(db, fake_lis, config):
    site_user(db, 7, mobile=PHONE)
    other = [{"id": "QL-6", "order_date": "2026-11-19", "status": "completed",
              "patient": {"phone": "+79031112233", "last_name": "Иванова",
                          "birth_date": BORN}}]
    fake_lis.inject(None, "orders", Fault(body=json.dumps(other).encode()), times=1)

    summary = run_discovery(config)

    assert (summary.orders_new, summary.unmatched, summary.attached, summary.review) == (
        1, 1, 0, 0)
    assert local_orders(db) == [] and collect_review(db.engine) == [] and event_log(db) == []


def test_cancelled_orders_are_not_attached(db, fake_lis, config):
    site_user(db, 7, mobile=PHONE)
    lis_order(fake_lis, "QL-7", status="cancelled")
    assert run_discovery(config).orders_new == 0
    assert local_orders(db) == []


def test_only_active_users_who_logged_in_or_ordered_recently_are_asked(db, fake_lis, config):
    site_user(db, 1, mobile="+79160000001")  # logged in yesterday
    site_user(db, 2, mobile="+79160000002", last_login=datetime(2026, 1, 1))  # long ago
    site_user(db, 3, mobile="+79160000003", last_login=None)
    add_order(db, "OLD-3", 3, order_date=date(2026, 11, 1))  # but had an order this month
    site_user(db, 4, mobile="+79160000004", active="N")
    site_user(db, 5, mobile="not a phone")  # no valid phone: checked without asking
    site_user(db, 6)  # no phone at all: not eligible

    summary = run_discovery(config)

    assert (summary.users, summary.lookups) == (3, 2)
    assert sorted(rotation(db)) == [1, 3, 5]


def test_each_run_asks_at_most_per_pass_and_rotates_through_users(db, fake_lis, config):
    for user_id in range(1, 6):
        site_user(db, user_id, mobile=f"+7916000000{user_id}")
    clock = Clock()
    asked: list[int] = []

    for _run in range(3):
        before = fake_lis.request_count("orders")
        summary = run_discovery(config, clock, per_pass=2)
        asked.append(fake_lis.request_count("orders") - before)
        assert summary.lookups <= 2
        clock.advance(minutes=15)

    assert asked == [2, 2, 1]
    assert sorted(rotation(db)) == [1, 2, 3, 4, 5]
    # Nobody is asked again within discovery.recheck (6 h)...
    assert run_discovery(config, clock, per_pass=2).lookups == 0
    # ...and after it, the oldest checks come first.
    clock.now = NOW + timedelta(hours=6, minutes=1)
    checked_before = rotation(db)
    assert run_discovery(config, clock, per_pass=2).lookups == 2
    again = [uid for uid, row in rotation(db).items()
             if row.LAST_CHECKED_AT != checked_before[uid].LAST_CHECKED_AT]
    assert sorted(again) == [1, 2]


def test_a_lookup_budget_counts_phones_not_users(db, fake_lis, config):
    site_user(db, 1, auth_phone="+79160000001", mobile="+79160000011")
    site_user(db, 2, mobile="+79160000002")
    summary = run_discovery(config, per_pass=2)
    assert (summary.users, summary.lookups) == (1, 2)
    assert fake_lis.request_count("orders") == 2


def test_lis_failure_for_one_user_does_not_stop_the_others(db, fake_lis, config):
    for user_id in (1, 2, 3):
        phone = f"+7916000000{user_id}"
        site_user(db, user_id, mobile=phone)
        lis_order(fake_lis, f"QL-{user_id}", phone=phone)
    # Every attempt of the first lookup (retry_attempts = 3) fails.
    fake_lis.inject(None, "orders", Fault(status=500), times=3)

    summary = run_discovery(config)

    assert (summary.lookup_failures, summary.attached, summary.outcome) == (1, 2, "ok")
    assert [r.EXTERNAL_ORDER_ID for r in local_orders(db)] == ["QL-2", "QL-3"]
    assert sorted(rotation(db)) == [2, 3]  # user 1 stays due: asked again next run

    again = run_discovery(config)

    assert (again.users, again.attached) == (1, 1)
    assert sorted(r.EXTERNAL_ORDER_ID for r in local_orders(db)) == ["QL-1", "QL-2", "QL-3"]


def test_a_refused_api_key_ends_the_run(db, fake_lis, config):
    for user_id in (1, 2, 3):
        site_user(db, user_id, mobile=f"+7916000000{user_id}")
    fake_lis.inject(None, "orders", Fault(status=401), times=None)

    summary = run_discovery(config)

    assert (summary.outcome, summary.lookups) == ("lis_auth", 1)
    assert fake_lis.request_count("orders") == 1
    assert rotation(db) == {}


def test_a_stop_ends_the_run_between_users(db, fake_lis, config):
    for user_id in (1, 2):
        site_user(db, user_id, mobile=f"+7916000000{user_id}")
    stop = threading.Event()
    stop.set()
    with discovery(config) as job:
        summary = job.run(stop=stop)
    assert (summary.outcome, summary.lookups) == ("interrupted", 0)


def test_a_retry_wait_cut_short_by_a_stop_ends_the_run(db, fake_lis, config):
    site_user(db, 1, mobile="+79160000001")
    site_user(db, 2, mobile="+79160000002")
    fake_lis.inject(None, "orders", Fault(status=503), times=None)

    def interrupted(_seconds: float) -> None:
        raise Interrupted("stopping")

    engine = make_engine(config.database)
    lis = QlabClient(config.lis, sleep=interrupted)
    try:
        job = DiscoveryJob(DiscoveryConfig(enabled=True), engine, lis, detect_text_fitter(engine),
                           zone=config.site.timezone, now=Clock())
        summary = job.run()
    finally:
        lis.close()
        engine.dispose()
    assert (summary.outcome, summary.lookups) == ("interrupted", 1)
    assert rotation(db) == {}


def test_disabled_discovery_does_nothing(db, fake_lis, config):
    site_user(db, 7, mobile=PHONE)
    lis_order(fake_lis, "QL-1")
    assert run_discovery(config, enabled=False).outcome == "disabled"
    assert fake_lis.request_count() == 0 and local_orders(db) == []


def test_a_case_closes_once_the_order_is_attached_by_hand(db, fake_lis, config):
    site_user(db, 7, auth_phone=PHONE)
    site_user(db, 8, mobile=PHONE)
    lis_order(fake_lis, "QL-8")
    clock = Clock()
    run_discovery(config, clock)
    assert [c["order"] for c in collect_review(db.engine)] == ["QL-8"]

    add_order(db, "QL-8", 8)

    assert collect_review(db.engine) == []
    clock.advance(hours=7)
    assert run_discovery(config, clock).orders_new == 0
    [case] = collect_review(db.engine, include_resolved=True)
    assert case["resolved"] == "2026-11-20T16:00:00Z"
    assert len(event_log(db)) == 1


def test_a_dismissed_case_stays_closed(db, fake_lis, config):
    site_user(db, 7, auth_phone=PHONE)
    lis_order(fake_lis, "QL-9", last_name="Петрова")
    clock = Clock()
    run_discovery(config, clock)

    assert dismiss_review(db.engine, "QL-9") is True
    assert dismiss_review(db.engine, "QL-9") is False
    clock.advance(hours=7)
    run_discovery(config, clock)

    assert collect_review(db.engine) == []
    assert len(event_log(db)) == 1


def test_a_case_whose_reason_changes_is_logged_again(db, fake_lis, config):
    site_user(db, 7, auth_phone=PHONE, last_name="Петрова")
    lis_order(fake_lis, "QL-10")
    clock = Clock()
    run_discovery(config, clock)
    site_user(db, 8, mobile=PHONE)
    site_user(db, 9, mobile=PHONE)
    clock.advance(hours=7)

    run_discovery(config, clock)

    [case] = collect_review(db.engine)
    assert (case["reason"], case["candidates"]) == ("ambiguous", [7, 8, 9])
    assert len(event_log(db)) == 2


# -- the review list ---------------------------------------------------------------------------


def test_review_renders_for_a_terminal_and_as_json(db, fake_lis, config):
    assert render_review(collect_review(db.engine)) == (
        "No orders found by phone are waiting for review.")
    site_user(db, 7, auth_phone=PHONE)
    site_user(db, 8, mobile=PHONE)
    lis_order(fake_lis, "QL-11")
    site_user(db, 9, mobile="+79031112233", last_name="Сидорова")
    lis_order(fake_lis, "QL-12", phone="+79031112233", born=None, last_name="")
    run_discovery(config, match="both")

    rows = collect_review(db.engine)
    text = render_review(rows)

    assert [(r["order"], r["reason"]) for r in rows] == [("QL-11", "ambiguous"),
                                                        ("QL-12", "no_second_factor")]
    assert text.startswith("2 orders found in the LIS by phone were not attached")
    assert "QL-11  ambiguous  phone +79161234567  users 7, 8" in text
    assert "several site users with this phone match the patient" in text
    assert "first seen 2026-11-20 09:00 UTC" in text
    assert "QL-12  no_second_factor  phone +79031112233  users 9" in text
    assert "discovery.match is both and the LIS gives no birth date and no last name" in text
    decoded = json.loads(json.dumps(rows, ensure_ascii=False))
    assert decoded[0] == {
        "order": "QL-11", "reason": "ambiguous", "phone": PHONE, "candidates": [7, 8],
        "detail": rows[0]["detail"], "first_seen": "2026-11-20T09:00:00Z",
        "last_seen": "2026-11-20T09:00:00Z", "resolved": None}
