"""How many LIS requests adaptive polling saves: a seeded, discrete-time simulation.

Orders arrive through the simulated days, each with a turnaround drawn from ``MIX``. Passes
run every ``interval``. Two strategies see the same orders:

- baseline: every pending order is asked on every pass, as the brief's PHP agent does;
- adaptive: an order is asked at the first pass at or after its next-poll time, which is
  the time of its last poll plus :func:`labsync.polling.poll_delay` (the real function,
  seeded) of its age: now − arrival, or with ``--age-from order-date`` now − midnight of
  the order's day, as the engine counts it. A zero delay means the next pass.

A completed order costs one status request (the pass that sees it) plus one PDF request.
Passes start exactly on the interval and take no time; LIS failures are not simulated
(every request succeeds); no order is cancelled. ``MIX``, ``HOURLY`` and ``WEEKDAY`` are
assumptions, not lab data. docs/polling.md has the figures.

    python -m bench.polling_sim [--days 7] [--orders-per-day 500] [--interval 15m]
                                [--seed 1] [--warmup-days 28] [--stale-after 30d]
                                [--age-from arrival|order-date] [--json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from labsync.config import parse_duration
from labsync.polling import poll_delay

HOUR = 3600.0
DAY = 86400.0
DEFAULT_STALE_AFTER = 30 * DAY  # sync.stale_after's default
AGE_FROM = ("arrival", "order-date")


@dataclass(frozen=True)
class Kind:
    """A kind of test and its turnaround, uniform in [low, high]; ``None``: never completes."""

    name: str
    share: float
    low: float | None
    high: float | None


# An assumption for a typical commercial lab network, not measured data.
MIX: tuple[Kind, ...] = (
    Kind("biochemistry", 0.55, 2 * HOUR, 8 * HOUR),
    Kind("haematology/coagulation", 0.20, 1 * HOUR, 4 * HOUR),
    Kind("immunology/serology", 0.15, 1 * DAY, 3 * DAY),
    Kind("microbiology culture", 0.07, 3 * DAY, 7 * DAY),
    Kind("never completes", 0.03, None, None),  # lost sample, order stuck in the LIS
)

# Relative arrivals by hour of day: a morning peak, ~89 % between 8:00 and 20:00.
HOURLY = (0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2, 10, 12, 11, 9,
          7, 6, 6, 6, 6, 5, 4, 3, 2, 1.5, 1, 0.5)
# Orders per day relative to --orders-per-day, Monday first; the mean over a week is 1.
WEEKDAY = (1.1, 1.1, 1.1, 1.1, 1.1, 0.9, 0.6)


@dataclass(frozen=True)
class Order:
    """One simulated order. Times are seconds since Monday 00:00 of the first simulated day."""

    arrival: float
    done: float  # when the LIS completes it; math.inf if never
    kind: str


@dataclass
class Outcome:
    """What one strategy did with one order, counting only passes inside the window."""

    requests: int = 0  # status requests
    seen: float | None = None  # time of the pass that saw the completion, if before the end


@dataclass
class Window:
    """The passes that run and the part of them that is counted."""

    interval: float
    end: float  # no pass at or after this
    count_from: float  # requests and deliveries before this are not counted

    @property
    def passes(self) -> int:
        return math.ceil(self.end / self.interval)

    @property
    def first_counted(self) -> int:
        return math.ceil(self.count_from / self.interval)

    def pass_at_or_after(self, t: float) -> int:
        return math.ceil(t / self.interval)


def make_orders(days: int, orders_per_day: float, rng: random.Random) -> list[Order]:
    """``days`` of arrivals following ``HOURLY`` and ``WEEKDAY``, turnarounds from ``MIX``."""
    orders = []
    weights = [k.share for k in MIX]
    for day in range(days):
        for _ in range(round(orders_per_day * WEEKDAY[day % 7])):
            hour = rng.choices(range(24), weights=HOURLY)[0]
            arrival = day * DAY + (hour + rng.random()) * HOUR
            kind = rng.choices(MIX, weights=weights)[0]
            if kind.low is None or kind.high is None:
                done = math.inf
            else:
                done = arrival + rng.uniform(kind.low, kind.high)
            orders.append(Order(arrival, done, kind.name))
    return orders


def baseline(orders: Sequence[Order], window: Window) -> tuple[list[Outcome], list[int]]:
    """Every pending order asked on every pass; also the status requests made at each pass.

    Counted rather than stepped: an order is asked at every pass from the first at or after
    its arrival up to and including the first at or after its completion, which is what
    iterating the passes over the pending orders would do (tests/test_polling.py checks).
    """
    per_pass = [0] * (window.passes + 1)
    outcomes = []
    for order in orders:
        first = window.pass_at_or_after(order.arrival)
        # An order that never completes is "seen" at a pass past the end: asked on all of them.
        seen = window.pass_at_or_after(order.done) if order.done != math.inf else window.passes
        last = min(seen, window.passes - 1)
        lo = max(first, window.first_counted)
        outcome = Outcome(requests=max(last - lo + 1, 0))
        if seen < window.passes:
            outcome.seen = seen * window.interval
        if outcome.requests:
            per_pass[lo] += 1
            per_pass[last + 1] -= 1
        outcomes.append(outcome)
    running, counts = 0, []
    for delta in per_pass[:-1]:
        running += delta
        counts.append(running)
    return outcomes, counts[window.first_counted:]


def adaptive(orders: Sequence[Order], window: Window, *, stale_after: float,
             rng: random.Random, age_from: str = "arrival") -> tuple[list[Outcome], list[int]]:
    """An order asked only when its next poll is due, as ``labsync.polling`` schedules it.

    ``age_from="arrival"``: age = now − arrival, as the issue defines it. ``"order-date"``:
    age counted from midnight of the order's day, as the engine (``labsync.apply``) counts
    it because ``local_lab_orders.ORDER_DATE`` is a DATE: older, so polled less at first.
    """
    interval = timedelta(seconds=window.interval)
    stale = timedelta(seconds=stale_after)
    per_pass = [0] * window.passes
    outcomes = [Outcome() for _ in orders]
    due = [(window.pass_at_or_after(o.arrival), i) for i, o in enumerate(orders)]
    heapq.heapify(due)
    while due and due[0][0] < window.passes:
        k, i = heapq.heappop(due)
        order, now = orders[i], k * window.interval
        if k >= window.first_counted:
            outcomes[i].requests += 1
            per_pass[k] += 1
        if order.done <= now:
            outcomes[i].seen = now
            continue
        origin = order.arrival if age_from == "arrival" else order.arrival // DAY * DAY
        delay = poll_delay(timedelta(seconds=now - origin), interval=interval,
                           stale_after=stale, rng=rng)
        heapq.heappush(due, (max(k + 1, window.pass_at_or_after(now + delay.total_seconds())), i))
    return outcomes, per_pass[window.first_counted:]


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (``p`` in 0..1); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(p * len(ordered)) - 1, 0)]


@dataclass
class Tally:
    """One strategy's figures over the counted window."""

    status_requests: int
    pdf_requests: int
    delivered: int
    pending_at_end: int
    stale_at_end: int
    requests_per_delivered: float | None
    delay_median_s: float | None
    delay_p95_s: float | None
    delay_max_s: float | None
    requests_per_pass_mean: float
    requests_per_pass_max: int
    status_requests_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.status_requests + self.pdf_requests


def tally(orders: Sequence[Order], outcomes: Sequence[Outcome], per_pass: Sequence[int],
          window: Window, stale_after: float) -> Tally:
    delivered = [(o, r) for o, r in zip(orders, outcomes, strict=True)
                 if r.seen is not None and r.seen >= window.count_from]
    pending = [o for o, r in zip(orders, outcomes, strict=True)
               if r.seen is None and o.arrival < window.end]
    delays = [r.seen - o.done for o, r in delivered if r.seen is not None]
    by_kind = {k.name: 0 for k in MIX}
    for order, outcome in zip(orders, outcomes, strict=True):
        by_kind[order.kind] += outcome.requests
    status = sum(r.requests for r in outcomes)
    total = status + len(delivered)
    return Tally(
        status_requests=status,
        pdf_requests=len(delivered),
        delivered=len(delivered),
        pending_at_end=len(pending),
        stale_at_end=sum(window.end - o.arrival >= stale_after for o in pending),
        requests_per_delivered=total / len(delivered) if delivered else None,
        delay_median_s=percentile(delays, 0.5),
        delay_p95_s=percentile(delays, 0.95),
        delay_max_s=max(delays, default=None),
        requests_per_pass_mean=sum(per_pass) / len(per_pass) if per_pass else 0.0,
        requests_per_pass_max=max(per_pass, default=0),
        status_requests_by_kind=by_kind,
    )


@dataclass
class Run:
    """One simulation: its orders, both strategies' per-order outcomes and their tallies."""

    days: int
    warmup_days: int
    age_from: str
    window: Window
    orders: list[Order]
    baseline: list[Outcome]
    adaptive: list[Outcome]
    baseline_tally: Tally
    adaptive_tally: Tally

    def summary(self) -> dict[str, Any]:
        counted = [o for o in self.orders if o.arrival >= self.window.count_from]
        b, a = self.baseline_tally, self.adaptive_tally
        return {
            "days": self.days,
            "warmup_days": self.warmup_days,
            "age_from": self.age_from,
            "orders_total": len(self.orders),
            "orders_arrived_in_window": len(counted),
            "passes_counted": self.window.passes - self.window.first_counted,
            "baseline": {**asdict(b), "requests": b.requests},
            "adaptive": {**asdict(a), "requests": a.requests},
            "requests_saved_fraction": 1 - a.requests / b.requests if b.requests else None,
        }


def simulate(days: int = 7, orders_per_day: float = 500, interval: float = 15 * 60.0,
             seed: int = 1, warmup_days: int = 0,
             stale_after: float = DEFAULT_STALE_AFTER, age_from: str = "arrival") -> Run:
    """Simulate ``warmup_days`` + ``days``, counting only the last ``days``."""
    if age_from not in AGE_FROM:
        raise ValueError(f"age_from must be one of {AGE_FROM}, not {age_from!r}")
    orders = make_orders(warmup_days + days, orders_per_day, random.Random(seed))
    window = Window(interval=interval, end=(warmup_days + days) * DAY,
                    count_from=warmup_days * DAY)
    base, base_per_pass = baseline(orders, window)
    adapt, adapt_per_pass = adaptive(orders, window, stale_after=stale_after,
                                     rng=random.Random(f"{seed}/jitter"), age_from=age_from)
    return Run(days, warmup_days, age_from, window, orders, base, adapt,
               tally(orders, base, base_per_pass, window, stale_after),
               tally(orders, adapt, adapt_per_pass, window, stale_after))


def human(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(title: str, run: Run) -> str:
    b, a = run.baseline_tally, run.adaptive_tally
    rows: list[tuple[str, str, str]] = [
        ("LIS status requests", f"{b.status_requests:,}", f"{a.status_requests:,}"),
        ("+ PDF requests", f"{b.pdf_requests:,}", f"{a.pdf_requests:,}"),
        ("= LIS requests", f"{b.requests:,}", f"{a.requests:,}"),
        ("results delivered", f"{b.delivered:,}", f"{a.delivered:,}"),
        ("requests per delivered result", ratio(b.requests_per_delivered),
         ratio(a.requests_per_delivered)),
        ("status requests per pass, mean", f"{b.requests_per_pass_mean:.1f}",
         f"{a.requests_per_pass_mean:.1f}"),
        ("status requests per pass, max", f"{b.requests_per_pass_max:,}",
         f"{a.requests_per_pass_max:,}"),
        ("delivery delay, median", human(b.delay_median_s), human(a.delay_median_s)),
        ("delivery delay, p95", human(b.delay_p95_s), human(a.delay_p95_s)),
        ("delivery delay, max", human(b.delay_max_s), human(a.delay_max_s)),
        ("pending at the end (stale)", f"{b.pending_at_end:,} ({b.stale_at_end:,})",
         f"{a.pending_at_end:,} ({a.stale_at_end:,})"),
    ]
    rows += [(f"  of which {name}", f"{b.status_requests_by_kind[name]:,}",
              f"{a.status_requests_by_kind[name]:,}") for name in b.status_requests_by_kind]
    summary = run.summary()
    lines = [title, f"{'':36}{'baseline':>12}{'adaptive':>12}"]
    lines += [f"{label:36}{x:>12}{y:>12}" for label, x, y in rows]
    saved = summary["requests_saved_fraction"]
    if saved is not None:
        lines.append(f"adaptive polling makes {saved:.1%} fewer LIS requests")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.polling_sim",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--days", type=int, default=7, help="days counted (default 7)")
    parser.add_argument("--orders-per-day", type=float, default=500,
                        help="mean orders per day over a week (default 500)")
    parser.add_argument("--interval", type=parse_duration, default=15 * 60.0,
                        help="time between passes, e.g. 15m (default)")
    parser.add_argument("--stale-after", type=parse_duration, default=DEFAULT_STALE_AFTER,
                        help="sync.stale_after (default 30d)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup-days", type=int, default=28,
                        help="history simulated before the steady-state run's counted days"
                             " (default 28)")
    parser.add_argument("--age-from", choices=AGE_FROM, default="arrival",
                        help="adaptive's order age: since arrival (default) or since midnight"
                             " of the order's date, as the engine counts it")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.days < 1 or args.orders_per_day <= 0 or args.warmup_days < 0:
        parser.error("--days and --orders-per-day must be positive, --warmup-days ≥ 0")

    fresh, steady = (
        simulate(args.days, args.orders_per_day, args.interval, args.seed, warmup,
                 args.stale_after, args.age_from)
        for warmup in (0, args.warmup_days))
    if args.json:
        print(json.dumps({
            "params": {"days": args.days, "orders_per_day": args.orders_per_day,
                       "interval_s": args.interval, "stale_after_s": args.stale_after,
                       "seed": args.seed, "warmup_days": args.warmup_days,
                       "age_from": args.age_from},
            "mix": [asdict(k) for k in MIX],
            "from_empty": fresh.summary(),
            "steady_state": steady.summary(),
        }))
        return 0
    print(f"{args.days} day{'s' * (args.days != 1)}, {args.orders_per_day:g} orders/day on "
          f"average, a pass every {human(args.interval)}, stale after "
          f"{args.stale_after / DAY:g} d, age from {args.age_from}, seed {args.seed}")
    print()
    print(table(f"From an empty queue ({len(fresh.orders):,} orders):", fresh))
    print()
    print(table(f"Steady state: the last {args.days} days after {args.warmup_days} days of "
                f"history ({steady.summary()['orders_arrived_in_window']:,} orders arrived "
                f"in them, {len(steady.orders):,} in all):", steady))
    return 0


if __name__ == "__main__":
    sys.exit(main())
