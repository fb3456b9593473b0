"""The adaptive polling policy, and the simulation that measures what it saves."""

from __future__ import annotations

import json
import math
import random
from datetime import timedelta

import pytest

from bench import polling_sim
from bench.polling_sim import Order, Run, Window, simulate
from labsync.polling import failure_delay, is_stale, poll_delay

MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
INTERVAL = 15 * MIN
STALE_AFTER = 30 * DAY


class Midpoint(random.Random):
    """An rng whose jitter is always the middle of its range: the undisturbed delay."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def delays(age: timedelta, *, interval: timedelta = INTERVAL, n: int = 300,
           seed: int = 7) -> list[timedelta]:
    rng = random.Random(seed)
    return [poll_delay(age, interval=interval, stale_after=STALE_AFTER, rng=rng)
            for _ in range(n)]


# ── poll_delay ───────────────────────────────────────────────────────────────────────────


NEXT_PASS = timedelta(0)  # poll_delay's "ask again on the next pass"


@pytest.mark.parametrize("age", [timedelta(0), 30 * MIN, HOUR, 2 * HOUR - timedelta(seconds=1)])
def test_order_younger_than_two_hours_is_asked_on_every_pass(age: timedelta) -> None:
    assert set(delays(age)) == {NEXT_PASS}


BANDS = [
    (2 * HOUR, 30 * MIN),
    (6 * HOUR, 30 * MIN),
    (12 * HOUR - timedelta(seconds=1), 30 * MIN),
    (12 * HOUR, HOUR),
    (DAY, HOUR),
    (2 * DAY - timedelta(seconds=1), HOUR),
    (2 * DAY, 3 * HOUR),
    (5 * DAY, 3 * HOUR),
    (7 * DAY - timedelta(seconds=1), 3 * HOUR),
    (7 * DAY, 6 * HOUR),
    (20 * DAY, 6 * HOUR),
    (STALE_AFTER - timedelta(seconds=1), 6 * HOUR),
    (STALE_AFTER, 24 * HOUR),
    (90 * DAY, 24 * HOUR),
]


@pytest.mark.parametrize(("age", "band"), BANDS)
def test_each_age_band_has_its_delay(age: timedelta, band: timedelta) -> None:
    got = poll_delay(age, interval=INTERVAL, stale_after=STALE_AFTER, rng=Midpoint())
    assert got == band


@pytest.mark.parametrize(("age", "band"), BANDS)
def test_delay_is_jittered_within_ten_percent_of_its_band(age: timedelta,
                                                          band: timedelta) -> None:
    got = delays(age)
    assert all(band * 0.9 <= d <= band * 1.1 for d in got)
    # Jitter really spreads orders out: both sides of the band are reached.
    assert min(got) < band * 0.95 and max(got) > band * 1.05


def test_stale_order_is_asked_once_a_day() -> None:
    assert not is_stale(STALE_AFTER - timedelta(seconds=1), STALE_AFTER)
    assert is_stale(STALE_AFTER, STALE_AFTER)
    assert all(21.6 * HOUR <= d <= 26.4 * HOUR for d in delays(STALE_AFTER + DAY))
    short = timedelta(days=3)
    assert poll_delay(4 * DAY, interval=INTERVAL, stale_after=short, rng=Midpoint()) == DAY


@pytest.mark.parametrize(("age", "interval"), [
    (3 * HOUR, 30 * MIN),  # 30 min band equal to the interval
    (3 * HOUR, HOUR),  # 30 min band under a 1 h interval
    (DAY, 2 * HOUR),  # 1 h band
    (3 * DAY, 8 * HOUR),  # 3 h band
    (10 * DAY, 6 * HOUR),  # 6 h band equal to the interval
    (40 * DAY, 2 * DAY),  # stale, 24 h band
])
def test_band_no_longer_than_the_interval_means_the_next_pass(age: timedelta,
                                                               interval: timedelta) -> None:
    assert set(delays(age, interval=interval)) == {NEXT_PASS}


@pytest.mark.parametrize("age", [band_age for band_age, _ in BANDS])
def test_older_order_skips_at_least_one_default_pass(age: timedelta) -> None:
    # Never below the interval: past two hours every delay, jitter included, is longer
    # than a 15-minute pass, so the order is not asked on the very next one.
    assert min(delays(age)) > INTERVAL


# ── failure_delay ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("failures", "base"), [
    (0, MIN), (1, MIN), (2, 2 * MIN), (3, 4 * MIN), (4, 8 * MIN), (5, 16 * MIN),
    (8, 128 * MIN), (9, 256 * MIN), (10, 6 * HOUR), (11, 6 * HOUR), (41, 6 * HOUR),
])
def test_failure_backoff_doubles_from_one_minute_up_to_six_hours(failures: int,
                                                                 base: timedelta) -> None:
    assert failure_delay(failures, rng=Midpoint()) == base
    rng = random.Random(failures)
    got = [failure_delay(failures, rng=rng) for _ in range(300)]
    assert all(base * 0.8 <= d <= base * 1.2 for d in got)
    assert min(got) < base * 0.9 and max(got) > base * 1.1


def test_failure_backoff_stays_capped_after_many_failures() -> None:
    assert failure_delay(42, rng=Midpoint()) == 6 * HOUR
    assert failure_delay(1000, rng=Midpoint()) == 6 * HOUR


# ── reproducibility ──────────────────────────────────────────────────────────────────────


def test_seeded_rng_gives_the_same_delays_again() -> None:
    ages = [age for age, _ in BANDS]

    def draw(seed: int) -> list[timedelta]:
        rng = random.Random(seed)
        return ([poll_delay(a, interval=INTERVAL, stale_after=STALE_AFTER, rng=rng)
                 for a in ages] + [failure_delay(n, rng=rng) for n in range(12)])

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


# ── the simulation ───────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def day() -> Run:
    return simulate(days=1, orders_per_day=50, seed=3)


def brute_force_baseline(orders: list[Order], window: Window) -> list[tuple[int, float | None]]:
    """Step every pass over every pending order, the way the brief's PHP agent does."""
    requests = [0] * len(orders)
    seen: list[float | None] = [None] * len(orders)
    for k in range(window.passes):
        now = k * window.interval
        for i, order in enumerate(orders):
            if order.arrival <= now and seen[i] is None:
                requests[i] += k >= window.first_counted
                if order.done <= now:
                    seen[i] = now
    return list(zip(requests, seen, strict=True))


def test_adaptive_asks_the_lis_less_than_baseline(day: Run) -> None:
    assert day.adaptive_tally.requests < day.baseline_tally.requests
    # Per order too: adaptive asks at a subset of the passes baseline asks at.
    for base, adapt in zip(day.baseline, day.adaptive, strict=True):
        assert adapt.requests <= base.requests


def test_baseline_asks_about_an_order_at_every_pass_while_it_is_pending(day: Run) -> None:
    got = [(o.requests, o.seen) for o in day.baseline]
    assert got == brute_force_baseline(day.orders, day.window)
    interval = day.window.interval
    for order, outcome in zip(day.orders, day.baseline, strict=True):
        if outcome.seen is None:
            continue
        passes_while_pending = math.ceil(order.done / interval) - math.ceil(order.arrival /
                                                                             interval)
        assert outcome.requests == passes_while_pending + 1
        assert (outcome.requests >= 2) == (passes_while_pending >= 1)


def test_both_strategies_deliver_the_same_orders_but_for_the_last_poll_delay(day: Run) -> None:
    base = {i for i, o in enumerate(day.baseline) if o.seen is not None}
    adapt = {i for i, o in enumerate(day.adaptive) if o.seen is not None}
    assert base and adapt <= base
    # Adaptive may not have asked yet about an order completed shortly before the end: at
    # most one band (≤ 1 h at ages under a day, +10 %) plus the pass it waits for.
    for i in base - adapt:
        assert day.window.end - day.orders[i].done <= 1.1 * 3600 + day.window.interval
    assert day.baseline_tally.pdf_requests == len(base)
    assert day.adaptive_tally.pdf_requests == len(adapt)


def test_delivery_delays_are_positive_and_bounded_by_the_poll_delay(day: Run) -> None:
    interval = day.window.interval
    for strategy in (day.baseline, day.adaptive):
        for order, outcome in zip(day.orders, strategy, strict=True):
            if outcome.seen is not None:
                assert outcome.seen >= order.done
    b, a = day.baseline_tally, day.adaptive_tally
    assert b.delay_max_s is not None and b.delay_max_s <= interval
    # Within a day of arrival the largest band is 1 h (asked at least that often).
    assert a.delay_p95_s is not None and a.delay_p95_s <= 3600
    assert a.delay_max_s is not None and a.delay_max_s <= 1.1 * 3600 + interval
    assert a.delay_median_s is not None and b.delay_median_s is not None
    assert a.delay_median_s >= b.delay_median_s


def test_steady_state_counts_only_its_last_days_and_polls_stale_orders_daily() -> None:
    run = simulate(days=1, orders_per_day=40, seed=4, warmup_days=3,
                   stale_after=2 * 86400)
    start = run.window.count_from
    for tally, outcomes in ((run.baseline_tally, run.baseline),
                            (run.adaptive_tally, run.adaptive)):
        delivered = [o for o in outcomes if o.seen is not None and o.seen >= start]
        assert tally.delivered == len(delivered) == tally.pdf_requests
        # Orders finished during the warm-up cost nothing in the counted day.
        for outcome in outcomes:
            if outcome.seen is not None and outcome.seen < start:
                assert outcome.requests == 0
        assert tally.requests_per_pass_mean * run.summary()["passes_counted"] == pytest.approx(
            tally.status_requests)
    assert run.adaptive_tally.stale_at_end > 0
    never = [(o, r) for o, r in zip(run.orders, run.adaptive, strict=True)
             if o.done == math.inf and start - o.arrival >= 2 * 86400]
    assert never
    # Stale all through the counted day: asked at most twice (24 h ± 10 % apart).
    assert all(r.requests <= 2 for _, r in never)


def test_age_from_the_order_date_polls_less_and_later() -> None:
    by_arrival = simulate(days=2, orders_per_day=40, seed=5)
    by_date = simulate(days=2, orders_per_day=40, seed=5, age_from="order-date")
    assert by_date.adaptive_tally.requests < by_arrival.adaptive_tally.requests
    late, early = by_date.adaptive_tally.delay_median_s, by_arrival.adaptive_tally.delay_median_s
    assert late is not None and early is not None and late > early
    assert by_date.baseline_tally == by_arrival.baseline_tally
    with pytest.raises(ValueError, match="age_from"):
        simulate(days=1, orders_per_day=5, age_from="first-seen")


def test_simulation_is_reproducible_from_its_seed() -> None:
    first = simulate(days=1, orders_per_day=30, seed=11).summary()
    assert simulate(days=1, orders_per_day=30, seed=11).summary() == first
    assert simulate(days=1, orders_per_day=30, seed=12).summary() != first


def test_cli_json_is_one_object_with_both_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert polling_sim.main(["--days", "1", "--orders-per-day", "20", "--warmup-days", "2",
                             "--interval", "30m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["interval_s"] == 1800
    for run in ("from_empty", "steady_state"):
        assert out[run]["adaptive"]["requests"] < out[run]["baseline"]["requests"]
    assert out["steady_state"]["warmup_days"] == 2


def test_cli_prints_a_table_for_both_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert polling_sim.main(["--days", "1", "--orders-per-day", "20", "--warmup-days",
                             "1"]) == 0
    out = capsys.readouterr().out
    assert "From an empty queue" in out and "Steady state" in out
    assert out.count("requests per delivered result") == 2
