"""When to ask the LIS about a pending order again: by its age, and after failures.

Most results arrive within hours (biochemistry, haematology); some take days (cultures,
histology); a few never do (a sample lost, an order forgotten in the LIS). Asking about
every pending order on every pass spends most LIS requests on orders that cannot have
changed. The schedule below asks often while an answer is likely, then less and less.
``bench/polling_sim.py`` measures what it saves; docs/polling.md has the figures.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

# (age below, delay before the next poll). The interval of the pass is the floor: a
# fresh order is asked on every pass.
_SCHEDULE: tuple[tuple[timedelta, timedelta], ...] = (
    (timedelta(hours=2), timedelta(0)),
    (timedelta(hours=12), timedelta(minutes=30)),
    (timedelta(days=2), timedelta(hours=1)),
    (timedelta(days=7), timedelta(hours=3)),
)
_OLDER = timedelta(hours=6)  # a week old, not yet stale
STALE_DELAY = timedelta(hours=24)
MAX_FAILURE_BACKOFF = timedelta(hours=6)
JITTER = 0.1


def poll_delay(age: timedelta, *, interval: timedelta, stale_after: timedelta,
               rng: random.Random | None = None) -> timedelta:
    """How long to wait before asking again about a pending order of this ``age``.

    Zero means "on the next pass": a delay no longer than ``interval`` would otherwise land
    a moment after the next pass starts and skip it. Longer delays get ±10 % jitter so
    orders placed together do not stay in lockstep.
    """
    if age >= stale_after:
        base = STALE_DELAY
    else:
        base = next((delay for limit, delay in _SCHEDULE if age < limit), _OLDER)
    if base <= interval:
        return timedelta(0)
    return base * (rng or random).uniform(1 - JITTER, 1 + JITTER)


def failure_delay(failures: int, *, rng: random.Random | None = None) -> timedelta:
    """Backoff after ``failures`` consecutive failures: 1 min doubling to 6 h, ±20 % jitter.

    With passes 15 minutes apart the first few failures are simply retried on the next pass.
    """
    doublings = min(max(failures - 1, 0), 10)  # 2**10 min already exceeds the cap
    base = min(timedelta(minutes=1) * 2 ** doublings, MAX_FAILURE_BACKOFF)
    return base * (rng or random).uniform(0.8, 1.2)


def recheck_delay(since_completion: timedelta, *, window: timedelta,
                  rng: random.Random | None = None) -> timedelta | None:
    """When to ask again about a completed order, for corrections; None once ``window`` is over.

    Corrections come mostly soon after a result is released, so the waits double with
    the order's time since completion: about 1 h, 2 h, 4 h… up to a day. That is ~11
    requests for a 7-day window.
    """
    base = min(max(since_completion, RECHECK_FIRST), RECHECK_MAX)
    delay = base * (rng or random).uniform(1 - JITTER, 1 + JITTER)
    if since_completion + delay > window:
        return None  # the next ask would fall outside the window: this was the last
    return delay


RECHECK_FIRST = timedelta(hours=1)
RECHECK_MAX = timedelta(hours=24)


def is_stale(age: timedelta, stale_after: timedelta) -> bool:
    return age >= stale_after


def order_age(order_date: date | None, first_seen: datetime | None, now: datetime,
              zone: ZoneInfo) -> timedelta:
    """How long the order has been waiting, for the polling schedule.

    Counted from when labsync first saw it (within one pass of its arrival): ``ORDER_DATE``
    is only a date, and counting from its midnight would make a morning's orders look hours
    old on their first poll. An order dated more than a day before labsync first saw it (a
    backlog labsync found when it was installed) counts from its date instead.
    """
    start = first_seen or now
    if order_date is not None:
        midnight = datetime.combine(order_date, time(), zone)
        ordered = midnight.astimezone(UTC).replace(tzinfo=None)
        if ordered < start - timedelta(days=1):
            start = ordered
    return max(now - start, timedelta(0))
