"""``labsync run``: the jobs on a schedule, systemd's notify protocol, and a clean stop.

APScheduler 3 (BlockingScheduler, in-memory job store, jobs added at start-up) runs:

- ``sync``: a pass every ``sync.interval``, the first one at start;
- ``inbox`` / ``feed`` (adapters that push or list changes): every 2 s / 30 s, what the
  LIS delivered or changed (``labsync.sources``);
- ``takeover`` (MySQL/MariaDB): every 10 s, between passes, whether another instance died
  holding claims (``labsync.store.liveness``); if one did, the sync pass starts now and
  finishes its orders, instead of waiting for the next interval;
- ``housekeeping``: hourly; old pass records pruned, gauges refreshed;
- ``mail`` (when ``notify.backend = "smtp"``): every minute, labsync's outbox is sent;
- ``discovery`` (when ``[discovery] enabled``): orders placed at collection points, found
  by the patients' phones (``labsync.discovery``);
- ``watchdog``: when systemd armed one, ``WATCHDOG=1`` every half ``WatchdogSec`` while the
  sync job makes progress (a pass that stopped moving stops the pings; systemd restarts).

Every job: ``max_instances=1`` (never overlaps itself), ``coalesce`` (runs missed while the
host slept run once), ``misfire_grace_time`` of one interval. A job's exception is logged
and the next run still happens. SIGTERM/SIGINT: no new orders are taken, LIS waits are cut
short, the order in hand is finished (its transaction commits or rolls back whole), and the
process exits 0 within ``sync.stop_timeout``; a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import structlog
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError

from labsync import sdnotify
from labsync.app import App
from labsync.errors import LisError, StoreError
from labsync.mail import outbox
from labsync.store.orders import PENDING
from labsync.store.tables import b_event, labsync_orders, labsync_passes, local_lab_orders
from labsync.store.tx import run_tx

log = structlog.get_logger("labsync.daemon")

HOUSEKEEPING_EVERY = timedelta(hours=1)
TAKEOVER_EVERY = timedelta(seconds=10)
INBOX_EVERY = timedelta(seconds=2)  # an inbox is on local disk: draining an empty one is cheap
INBOX_MARGIN = 0.25  # seconds: the inbox job ends this long before its next run is due
FEED_EVERY = timedelta(seconds=30)  # unless the adapter says (ChangeFeed.feed_interval)
MAIL_EVERY = timedelta(minutes=1)
KEEP_PASSES = timedelta(days=90)
FORCED_EXIT = 130
START_FAILED = 75  # EX_TEMPFAIL: the adapter could not start its own work (a port taken)


def job_defaults(interval: float) -> dict[str, Any]:
    """What every job gets: never overlapping itself; missed runs coalesced into one."""
    return {"coalesce": True, "max_instances": 1, "misfire_grace_time": max(int(interval), 1)}


class Daemon:
    """The scheduler around one ``App``. ``run()`` blocks until a signal stops it."""

    def __init__(self, app: App, *, stop: threading.Event | None = None,
                 env: dict[str, str] | None = None,
                 scheduler_class: type[BaseScheduler] = BlockingScheduler) -> None:
        self.app = app
        self.env = env if env is not None else dict(os.environ)
        self.stop = stop or threading.Event()
        self.interval = app.config.sync.interval
        self.scheduler = scheduler_class(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(8)},  # one per job: none waits for another
            job_defaults=job_defaults(self.interval),
        )
        self._active = 0
        self._idle = threading.Condition()
        self._taken_over: set[str] = set()
        self.scheduler.add_listener(self._on_job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)

    # -- jobs ---------------------------------------------------------------------------------

    def add_jobs(self, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        self.scheduler.add_job(self._job("sync", self.sync_job), IntervalTrigger(
            seconds=self.interval, timezone=UTC), id="sync", name="sync", next_run_time=now)
        pushed = self.app.sync.pushed
        if pushed.has_inbox:
            self.scheduler.add_job(self._job("inbox", self.inbox_job),
                                   IntervalTrigger(seconds=INBOX_EVERY.total_seconds(),
                                                   timezone=UTC),
                                   id="inbox", name="inbox", next_run_time=now)
        if pushed.has_feed:
            every = getattr(self.app.lis, "feed_interval", FEED_EVERY)
            self.scheduler.add_job(self._job("feed", lambda: pushed.follow_feed(self.stop)),
                                   IntervalTrigger(seconds=every.total_seconds(),
                                                   timezone=UTC),
                                   id="feed", name="feed", next_run_time=now)
        if self.app.sync.liveness.enabled:
            self.scheduler.add_job(self._job("takeover", self.takeover_job), IntervalTrigger(
                seconds=TAKEOVER_EVERY.total_seconds(), timezone=UTC), id="takeover",
                name="takeover", next_run_time=now + TAKEOVER_EVERY)
        self.scheduler.add_job(self._job("housekeeping", self.housekeeping_job), IntervalTrigger(
            seconds=HOUSEKEEPING_EVERY.total_seconds(), timezone=UTC), id="housekeeping",
            name="housekeeping", next_run_time=now + timedelta(minutes=1))
        if self.app.mail is not None:
            mail = self.app.mail
            self.scheduler.add_job(self._job("mail", lambda: mail.send_due(stop=self.stop)),
                                   IntervalTrigger(seconds=MAIL_EVERY.total_seconds(),
                                                   timezone=UTC),
                                   id="mail", name="mail", next_run_time=now)
        if self.app.config.discovery.enabled:
            self.scheduler.add_job(
                self._job("discovery", lambda: self.app.discovery.run(stop=self.stop)),
                IntervalTrigger(seconds=self.app.config.discovery.interval, timezone=UTC),
                id="discovery", name="discovery", next_run_time=now + timedelta(minutes=1))
        watchdog = sdnotify.watchdog_seconds(self.env)
        if watchdog:
            self.scheduler.add_job(self._job("watchdog", lambda: self.watchdog_job(watchdog)),
                                   IntervalTrigger(seconds=max(watchdog / 2, 1), timezone=UTC),
                                   id="watchdog", name="watchdog", next_run_time=now)

    def inbox_job(self) -> None:
        """Drain the inbox; then, until just before the next tick, drain again as soon as a
        message arrives, when the adapter can say so (``wait_for_arrival``: HL7's MLLP
        listener). A pushed result is applied within milliseconds, not at the next tick,
        and the job still ends before its next run is due (never two at once)."""
        pushed = self.app.sync.pushed
        until = time.monotonic() + INBOX_EVERY.total_seconds() - INBOX_MARGIN
        pushed.drain_inbox(self.stop)
        wait = getattr(self.app.lis, "wait_for_arrival", None)
        while wait is not None and not self.stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                break
            if wait(left):
                pushed.drain_inbox(self.stop)

    def _job(self, name: str, work: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(job=name)
            with self._idle:
                self._active += 1
            try:
                if not self.stop.is_set():
                    work()
            except (StoreError, SQLAlchemyError) as exc:
                # The database is away (restart, network): expected now and then, no traceback.
                log.error("job.database_unavailable", error=str(exc)[:500])
            except Exception:  # the schedule goes on; the next run may well succeed
                log.exception("job.failed")
            finally:
                with self._idle:
                    self._active -= 1
                    self._idle.notify_all()
                structlog.contextvars.clear_contextvars()

        run.__name__ = f"labsync_{name}"
        return run

    def sync_job(self) -> None:
        summary = self.app.sync.run_pass(stop=self.stop)
        self.refresh_gauges()
        self.app.metrics.pass_finished(summary)

    def takeover_job(self) -> None:
        """Start the sync pass now if an instance died holding claims (and none is running)."""
        if self.app.sync.busy:
            return  # the running pass ends soon; the next check comes after it
        gone = self.app.sync.orphaned()
        new = gone - self._taken_over
        # Once per dead owner: if its orders stay claimed (the pass ended early, the LIS is
        # down) the regular schedule goes on, rather than a pass every few seconds.
        self._taken_over = gone
        if new:
            log.info("claims.takeover", owners_gone=len(new))
            self.scheduler.modify_job("sync", next_run_time=datetime.now(UTC))

    def housekeeping_job(self) -> None:
        cutoff = self.app.sync.now() - KEEP_PASSES
        pruned = run_tx(self.app.engine, lambda conn: conn.execute(
            delete(labsync_passes).where(labsync_passes.c.STARTED_AT < cutoff)).rowcount)
        swept = self.app.sync.pdfs.sweep()
        self.refresh_gauges()
        log.info("housekeeping.done", passes_pruned=pruned, temp_files_swept=swept)

    def watchdog_job(self, watchdog: float) -> None:
        sync = self.app.sync
        stalled = sync.busy and time.monotonic() - sync.progress_at > watchdog
        if stalled:
            log.error("watchdog.stalled", seconds=round(time.monotonic() - sync.progress_at))
            return
        sdnotify.notify("WATCHDOG=1", self.env)

    def refresh_gauges(self) -> None:
        if not self.app.metrics.enabled:
            return
        counts = run_tx(self.app.engine, _order_counts)
        self.app.metrics.set_orders(counts["orders"])
        if self.app.mail is not None:
            counts["mail"] = run_tx(self.app.engine, outbox.counts)["pending"]
        self.app.metrics.set_mail_queue(counts["mail"])

    def _on_job_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.warning("job.missed", job=event.job_id)
        else:
            log.error("job.error", job=event.job_id, error=str(event.exception))

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Start-up checks, READY=1, the schedule until a signal; returns the exit status."""
        self._install_signals()
        self.add_jobs()
        try:
            self.app.lis.start()  # an adapter's own listener (HL7 MLLP); stopped by close()
        except LisError as exc:
            # A port taken (another instance still stopping): systemd retries a start that
            # exits EX_TEMPFAIL, and stops retrying a config error (exit 2).
            log.error("daemon.adapter_not_started", error=str(exc))
            return START_FAILED
        self.app.metrics.start()
        sdnotify.notify(f"READY=1\nSTATUS=polling every {self.interval:g} s", self.env)
        log.info("daemon.started", interval_s=self.interval, pid=os.getpid())
        self.scheduler.start()  # blocks until shutdown
        return self._wait_for_jobs()

    def _install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            # The second signal: the operator means it. Nothing is half-written by this:
            # an uncommitted transaction is rolled back by the server when we vanish.
            os.write(2, b"labsync: second signal, exiting now\n")
            os._exit(FORCED_EXIT)
        self.stop.set()
        sdnotify.notify("STOPPING=1", self.env)
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        # Not from inside the handler: shutdown takes locks the interrupted code may hold.
        threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": False},
                         daemon=True).start()

    def _wait_for_jobs(self) -> int:
        deadline = time.monotonic() + self.app.config.sync.stop_timeout
        with self._idle:
            while self._active and time.monotonic() < deadline:
                self._idle.wait(max(deadline - time.monotonic(), 0.01))
            abandoned = self._active
        if abandoned:
            # The order in hand is abandoned, not half-done: its transaction never commits.
            log.warning("daemon.stop_timeout", jobs_abandoned=abandoned)
            logging.shutdown()
            sys.stdout.flush()
            os._exit(0)
        log.info("daemon.stopped")
        return 0


def _order_counts(conn: Any) -> dict[str, Any]:
    o, s = local_lab_orders, labsync_orders
    by_status = dict(conn.execute(select(o.c.STATUS, func.count()).where(
        o.c.STATUS.in_(PENDING)).group_by(o.c.STATUS)).all())
    stale = conn.execute(select(func.count()).select_from(s.join(o, o.c.ID == s.c.ORDER_ID))
                         .where(s.c.STALE_AT.is_not(None),
                                o.c.STATUS.in_(PENDING))).scalar_one()
    failing = conn.execute(select(func.count()).select_from(s)
                           .where(s.c.FAILURES > 0, s.c.COMPLETED_AT.is_(None))).scalar_one()
    mail = conn.execute(select(func.count()).select_from(b_event)
                        .where(b_event.c.SUCCESS_EXEC == "N")).scalar_one()
    return {"orders": {"pending": by_status.get("received", 0),
                       "processing": by_status.get("processing", 0),
                       "stale": stale, "failing": failing}, "mail": mail}
