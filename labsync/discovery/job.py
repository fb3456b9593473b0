"""The discovery job: ask the LIS for recent orders of eligible site users, by phone.

One run:

1. Close review cases whose order reached ``local_lab_orders`` meanwhile.
2. Pick the users due this run: active, logged in or with an order within
   ``eligible_days``, with a phone, not asked about for ``recheck``; never-asked first, then
   the longest ago (``labsync_discovery.LAST_CHECKED_AT``).
3. For each, ask the LIS about each of their phones (``find_orders``), within a budget of
   ``per_pass`` lookups; a phone shared by two users is asked once per run.
4. Each order the site does not have yet goes through ``matching.decide`` against every
   active user with the patient's phone: attached (a ``local_lab_orders`` row with
   ``STATUS='received'``, which the sync pass takes over) or recorded for review (and logged
   once to ``b_event_log``).

An LIS error stays with its user: logged, the user is asked again next run (transient) or
after ``recheck`` (anything else). ``LisAuthError`` ends the run's LIS work, as do ten
transient failures in a row. A database that cannot be reached raises ``StoreError``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import Connection, Engine, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from labsync.breaker import Breaker
from labsync.clock import utc_now
from labsync.config.discovery import DiscoveryConfig
from labsync.discovery import review as review_store
from labsync.discovery.matching import Attach, Candidate, Review, decide
from labsync.discovery.phones import mask_phone, national_digits, normalise_phone, phones_in
from labsync.errors import Interrupted, LisAuthError, LisError, StoreError, TransientLisError
from labsync.lis.base import LisClient
from labsync.model import LisOrderRef, OrderStatus
from labsync.store import bitrix
from labsync.store.db import TextFitter, describe_db_error
from labsync.store.tables import (
    b_user,
    b_user_phone_auth,
    labsync_discovery,
    local_lab_orders,
)
from labsync.store.tx import run_tx

log = structlog.get_logger("labsync.discovery")

_EXTERNAL_ID_LENGTH = 100  # local_lab_orders.EXTERNAL_ORDER_ID
_IN_CHUNK = 500
# What a profile's phone field may hold between the digits of one number.
_SEPARATORS = (" ", "-", "(", ")", ".", "/", "\t", "\u00a0")




@dataclass
class DiscoverySummary:
    """What one run did. ``lookups`` counts LIS requests, failed ones included."""

    users: int = 0
    lookups: int = 0
    lookup_failures: int = 0
    orders_new: int = 0  # found in the LIS, not in local_lab_orders
    attached: int = 0
    review: int = 0
    unmatched: int = 0  # no active site user has the patient's phone
    failed: int = 0  # an order whose database work failed; tried again next time
    outcome: str = "ok"  # ok | disabled | lis_auth | lis_unreachable | interrupted
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _DueUser:
    user_id: int
    has_row: bool
    phones: tuple[str, ...]


class _Halt(Exception):
    """Stop asking the LIS this run; ``outcome`` says why."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class DiscoveryJob:
    """Runs discovery; the daemon calls ``run`` every ``discovery.interval``."""

    def __init__(self, config: DiscoveryConfig, engine: Engine, lis: LisClient,
                 fitter: TextFitter, *, zone: ZoneInfo, site_id: str | None = None,
                 now: Callable[[], datetime] = utc_now) -> None:
        self.config = config
        self.engine = engine
        self.lis = lis
        self.fitter = fitter
        self.zone = zone
        self.site_id = site_id
        self.now = now

    def run(self, stop: threading.Event | None = None) -> DiscoverySummary:
        """One run. Does nothing unless ``discovery.enabled``; ``stop`` ends it between users."""
        summary = DiscoverySummary()
        if not self.config.enabled:
            summary.outcome = "disabled"
            return summary
        started = time.monotonic()
        stop = stop or threading.Event()
        now = self.now().replace(microsecond=0)
        try:
            run_tx(self.engine, lambda conn: review_store.resolve_known(conn, now), retry=True)
            users = run_tx(self.engine, lambda conn: self._due_users(conn, now), retry=True)
            log.info("discovery.started", due=len(users))
            _Run(self, now, summary).work(users, stop)
        except SQLAlchemyError as exc:
            raise StoreError(describe_db_error(exc)) from exc
        summary.duration_s = round(time.monotonic() - started, 3)
        log.info("discovery.finished", **summary.as_dict())
        return summary

    def site_time(self, now_utc: datetime) -> datetime:
        return now_utc.replace(tzinfo=UTC).astimezone(self.zone).replace(tzinfo=None)

    # -- who is due -------------------------------------------------------------------------

    def _due_users(self, conn: Connection, now: datetime) -> list[_DueUser]:
        """Eligible users not asked about within ``recheck``, oldest check first; ``per_pass``."""
        u, pa, d, o = b_user, b_user_phone_auth, labsync_discovery, local_lab_orders
        window = timedelta(days=self.config.eligible_days)
        now_site = self.site_time(now)
        recent_order = exists().where(o.c.USER_ID == u.c.ID,
                                      o.c.ORDER_DATE >= now_site.date() - window)
        has_phone = or_(pa.c.PHONE_NUMBER.is_not(None),
                        func.coalesce(u.c.PERSONAL_MOBILE, "") != "",
                        func.coalesce(u.c.PERSONAL_PHONE, "") != "")
        due = or_(d.c.LAST_CHECKED_AT.is_(None),
                  d.c.LAST_CHECKED_AT <= now - timedelta(seconds=self.config.recheck))
        query = (
            select(u.c.ID, u.c.PERSONAL_MOBILE, u.c.PERSONAL_PHONE, pa.c.PHONE_NUMBER,
                   d.c.USER_ID.label("ROTATION"))
            .select_from(u.outerjoin(pa, pa.c.USER_ID == u.c.ID)
                         .outerjoin(d, d.c.USER_ID == u.c.ID))
            .where(u.c.ACTIVE == "Y", or_(u.c.LAST_LOGIN >= now_site - window, recent_order),
                   has_phone, due)
            .order_by(d.c.LAST_CHECKED_AT.is_(None).desc(), d.c.LAST_CHECKED_AT,
                      u.c.LAST_LOGIN.desc(), u.c.ID)
            .limit(self.config.per_pass)
        )
        return [_DueUser(row.ID, row.ROTATION is not None, self.phones_of(row))
                for row in conn.execute(query)]

    def phones_of(self, row: Any) -> tuple[str, ...]:
        """A user's distinct E.164 numbers: phone login first, then mobile, then phone."""
        region = self.config.default_region
        found: list[str] = []
        for text in (row.PHONE_NUMBER, row.PERSONAL_MOBILE, row.PERSONAL_PHONE):
            for phone in phones_in(text, region):
                if phone not in found:
                    found.append(phone)
        return tuple(found)

    def candidates(self, conn: Connection, phone: str) -> list[Candidate]:
        """Every active site user with ``phone`` among their numbers, however it is written.

        SQL narrows the users down to those whose phone fields contain the number's national
        digits once separators are removed (a scan, done only for orders the site does not
        know yet); each is then checked exactly in Python.
        """
        u, pa = b_user, b_user_phone_auth
        pattern = f"%{national_digits(phone)}%"
        query = (
            select(u.c.ID, u.c.LAST_NAME, u.c.PERSONAL_BIRTHDAY, u.c.PERSONAL_MOBILE,
                   u.c.PERSONAL_PHONE, pa.c.PHONE_NUMBER)
            .select_from(u.outerjoin(pa, pa.c.USER_ID == u.c.ID))
            .where(u.c.ACTIVE == "Y", or_(pa.c.PHONE_NUMBER == phone,
                                          _digits_only(u.c.PERSONAL_MOBILE).like(pattern),
                                          _digits_only(u.c.PERSONAL_PHONE).like(pattern)))
            .order_by(u.c.ID)
        )
        return [
            # A zero date ('0000-00-00', which Bitrix's empty sql_mode lets in) is no birth date.
            Candidate(row.ID, row.LAST_NAME, row.PERSONAL_BIRTHDAY
                      if isinstance(row.PERSONAL_BIRTHDAY, date) else None)
            for row in conn.execute(query)
            if phone in self.phones_of(row)
        ]


class _Run:
    """The state of one run: the lookup budget, phones asked, the failure streak."""

    def __init__(self, job: DiscoveryJob, now: datetime, summary: DiscoverySummary) -> None:
        self.job = job
        self.config = job.config
        self.now = now
        self.summary = summary
        self.asked: set[str] = set()
        self.candidates: dict[str, list[Candidate]] = {}
        self.breaker = Breaker()  # the LIS refusing the key or down: the run's lookups end
        now_site = job.site_time(now)
        self.date_from = now_site.date() - timedelta(days=self.config.lookback_days)

    def work(self, users: Sequence[_DueUser], stop: threading.Event) -> None:
        budget = self.config.per_pass
        try:
            for user in users:
                if stop.is_set():
                    self.summary.outcome = "interrupted"
                    break
                fresh = [p for p in user.phones if p not in self.asked]
                # The first user always goes, so a budget below one user's phones still moves.
                if self.summary.lookups and self.summary.lookups + len(fresh) > budget:
                    break
                self.summary.users += 1
                self._user(user, fresh)
        except _Halt as halt:
            self.summary.outcome = halt.outcome

    def _user(self, user: _DueUser, phones: Iterable[str]) -> None:
        found, retry_soon = 0, False
        with structlog.contextvars.bound_contextvars(user_id=user.user_id):
            for phone in phones:
                self.asked.add(phone)
                refs = self._lookup(phone)
                if refs is None:
                    retry_soon = True
                elif refs:
                    found += self._orders(phone, refs)
        if not retry_soon:
            run_tx(self.job.engine, lambda conn: self._mark_checked(conn, user, found), retry=True)

    def _lookup(self, phone: str) -> Sequence[LisOrderRef] | None:
        """The LIS's orders for ``phone``; None after a transient failure (retry next run)."""
        self.summary.lookups += 1
        try:
            refs = self.job.lis.find_orders(phone, self.date_from)
        except Interrupted:  # stopping: a retry wait was cut short
            raise _Halt("interrupted") from None
        except LisAuthError as exc:
            self.breaker.refused()
            log.error("discovery.lis_auth", error=str(exc))
            raise _Halt(self.breaker.reason) from None
        except TransientLisError as exc:
            self.summary.lookup_failures += 1
            log.warning("discovery.lookup_failed", phone=mask_phone(phone), kind=exc.kind,
                        error=str(exc))
            if self.breaker.failed():
                log.error("discovery.lis_unreachable", failures_in_a_row=self.breaker.streak)
                raise _Halt(self.breaker.reason) from None
            return None
        except LisError as exc:  # permanent or bad data: asking again at once will not help
            self.summary.lookup_failures += 1
            self.breaker.answered()
            log.warning("discovery.lookup_failed", phone=mask_phone(phone), kind=exc.kind,
                        error=str(exc))
            return ()
        self.breaker.answered()
        return refs

    def _orders(self, asked: str, refs: Sequence[LisOrderRef]) -> int:
        """Attach or review each order the site does not know yet; return how many attached."""
        wanted = [r for r in refs if r.status != OrderStatus.CANCELLED]  # nothing to show
        known = run_tx(self.job.engine, lambda conn: _known_ids(
            conn, [r.external_id for r in wanted]), retry=True)
        attached = 0
        for ref in wanted:
            if ref.external_id in known:
                continue
            known.add(ref.external_id)  # the LIS may list an order twice
            if len(ref.external_id) > _EXTERNAL_ID_LENGTH:
                log.warning("discovery.order_id_too_long", length=len(ref.external_id))
                continue
            self.summary.orders_new += 1
            with structlog.contextvars.bound_contextvars(order=ref.external_id):
                try:
                    attached += self._order(asked, ref)
                except StoreError:
                    raise
                except SQLAlchemyError as exc:
                    self.summary.failed += 1
                    log.warning("discovery.order_failed", error=describe_db_error(exc))
        return attached

    def _order(self, asked: str, ref: LisOrderRef) -> int:
        phone = self._patient_phone(ref, asked)
        if phone not in self.candidates:
            self.candidates[phone] = run_tx(
                self.job.engine, lambda conn: self.job.candidates(conn, phone), retry=True)
        decision = decide(ref.patient, self.candidates[phone], self.config.match)
        if decision is None:
            self.summary.unmatched += 1
            log.info("discovery.no_site_user", phone=mask_phone(phone))
            return 0
        if isinstance(decision, Attach):
            user_id = decision.user_id
            inserted = run_tx(self.job.engine, lambda conn: self._attach(conn, ref, user_id),
                              retry=True)
            if inserted:
                self.summary.attached += 1
                log.info("discovery.attached", user_id=user_id)
            else:
                log.info("discovery.already_known")
            return int(inserted)
        case: Review = decision
        self.summary.review += 1
        try:
            new = run_tx(self.job.engine, lambda conn: self._review(conn, ref, phone, case),
                         retry=True)
        except IntegrityError:  # another process recorded the case first: refresh it
            new = run_tx(self.job.engine, lambda conn: self._review(conn, ref, phone, case),
                         retry=True)
        log.info("discovery.review", reason=case.reason, candidates=list(case.candidates),
                 new=new)
        return 0

    def _patient_phone(self, ref: LisOrderRef, asked: str) -> str:
        """The patient's own number as the LIS gives it; the number asked when it gives none.

        The policy compares site users with the patient's phone. An LIS without a readable
        phone on the order found it by the number asked, so that one stands in.
        """
        return normalise_phone(ref.patient.phone, self.config.default_region) or asked

    # -- writes -------------------------------------------------------------------------------

    def _attach(self, conn: Connection, ref: LisOrderRef, user_id: int) -> bool:
        """Insert the order for ``user_id``; False if the site has it already (a race)."""
        try:
            conn.execute(insert(local_lab_orders).values(
                USER_ID=user_id, EXTERNAL_ORDER_ID=ref.external_id, ORDER_DATE=ref.order_date,
                STATUS=OrderStatus.RECEIVED.value))
        except IntegrityError:  # the unique EXTERNAL_ORDER_ID: someone inserted it first
            return False
        review_store.resolve(conn, ref.external_id, self.now)
        return True

    def _review(self, conn: Connection, ref: LisOrderRef, phone: str, decision: Review) -> bool:
        new = review_store.record_review(conn, self.job.fitter, external_id=ref.external_id,
                                         phone=phone, review=decision, now=self.now)
        if new:
            users = ", ".join(map(str, decision.candidates))
            bitrix.add_event_log(
                conn, self.job.fitter, item_id=ref.external_id,
                now_site=self.job.site_time(self.now), site_id=self.job.site_id,
                description=(
                    f"Order {ref.external_id}, found in the LIS by phone "
                    f"{mask_phone(phone)}, was not attached to a site user: "
                    f"{review_store.REASON_TEXT[decision.reason]} (users {users}). "
                    "See `labsync review`."))
        return new

    def _mark_checked(self, conn: Connection, user: _DueUser, found: int) -> None:
        d = labsync_discovery
        values = {"LAST_CHECKED_AT": self.now, "ORDERS_FOUND": d.c.ORDERS_FOUND + found}
        if not user.has_row:
            try:
                conn.execute(insert(d).values(USER_ID=user.user_id, LAST_CHECKED_AT=self.now,
                                              ORDERS_FOUND=found))
                return
            except IntegrityError:  # another instance added the row meanwhile
                pass
        conn.execute(update(d).where(d.c.USER_ID == user.user_id).values(**values))


def _known_ids(conn: Connection, external_ids: Sequence[str]) -> set[str]:
    o = local_lab_orders
    known: set[str] = set()
    for start in range(0, len(external_ids), _IN_CHUNK):
        chunk = list(external_ids[start:start + _IN_CHUNK])
        known.update(conn.execute(select(o.c.EXTERNAL_ORDER_ID)
                                  .where(o.c.EXTERNAL_ORDER_ID.in_(chunk))).scalars())
    return known


def _digits_only(column: Any) -> Any:
    """``column`` with the separators people type between digits removed (SQL ``REPLACE``)."""
    expression: Any = func.coalesce(column, "")
    for separator in _SEPARATORS:
        expression = func.replace(expression, separator, "")
    return expression
