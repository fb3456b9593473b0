"""Wiring: from a validated config to the engine, the LIS client and the sync engine.

The CLI, the daemon and the demo all build labsync here, so they run the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import Engine

from labsync import planner
from labsync.clock import interruptible_sleep, utc_now
from labsync.config import Config, NotifyConfig, SmtpConfig
from labsync.discovery.job import DiscoveryJob
from labsync.errors import ConfigError
from labsync.instance import InstanceLock
from labsync.lis.base import Capability, LisClient, capabilities
from labsync.lis.registry import capability_problems, make_client
from labsync.mail.sender import SmtpSender
from labsync.metrics import Metrics
from labsync.notify import BitrixNotifier, Notifier
from labsync.pdfs import PdfStore
from labsync.store.db import TextFitter, detect_text_fitter, make_engine, verify_tables
from labsync.sync import PassSettings, SyncEngine


@dataclass
class App:
    config: Config
    engine: Engine
    lis: LisClient
    fitter: TextFitter
    sync: SyncEngine
    metrics: Metrics
    discovery: DiscoveryJob
    mail: SmtpSender | None = None  # notify.backend = "smtp": sends labsync's own outbox


def build_sync(config: Config, engine: Engine, lis: LisClient, fitter: TextFitter, *,
               now: Callable[[], datetime] = utc_now, metrics: Metrics | None = None
               ) -> SyncEngine:
    """The sync engine, each of its parts handed its own section of the config."""
    policy = planner.policy(
        zone=config.site.timezone, fitter=fitter, interval=config.sync.interval,
        stale_after=config.sync.stale_after, recheck_days=config.sync.recheck_days,
        pdf_required=config.pdf.required, pdf_wait=config.pdf.wait,
        verify_every=_verify_every(lis))
    settings = PassSettings(page_size=config.sync.page_size, lease=config.sync.lease,
                            recheck_days=config.sync.recheck_days,
                            max_concurrency=config.lis.max_concurrency)
    notifier = make_notifier(config.notify, config.smtp, fitter, zone=config.site.timezone)
    return SyncEngine(settings, engine, lis, policy=policy,
                      pdfs=PdfStore(config.pdf.dir, config.pdf.max_bytes), notifier=notifier,
                      site_id=config.notify.site_id, now=now, metrics=metrics)


def _verify_every(lis: LisClient) -> timedelta | None:
    """With a change feed, how often a pending order is still asked by id (the adapter's
    setting); None without one."""
    if Capability.CHANGE_FEED not in capabilities(lis):
        return None
    every: timedelta | None = getattr(lis, "verify_every", None)
    return every


def make_notifier(notify: NotifyConfig, smtp: SmtpConfig | None, fitter: TextFitter, *,
                  zone: tzinfo) -> Notifier:
    """The configured backend: ``notify.backend`` is ``bitrix`` or ``smtp`` (with ``smtp``,
    the ``[smtp]`` section)."""
    if notify.backend == "smtp" and smtp is not None:
        from labsync.mail import SmtpNotifier  # jinja2 only for the smtp backend

        return SmtpNotifier(notify, smtp, zone=zone)
    return BitrixNotifier(notify, fitter)


def check_wiring(config: Config) -> None:
    """Raise ``ConfigError`` if the configured adapter cannot do what the config asks of it
    (``[discovery]`` without patient search, an adapter that brings no results)."""
    problems = capability_problems(config.lis.adapter, config.discovery.enabled)
    if problems:
        raise ConfigError(problems)


def client_options(config: Config, stop: threading.Event | None = None) -> dict[str, Any]:
    """What the wiring offers the adapter beside its ``[lis]`` section (``make_client``
    hands each on only to an adapter that takes it)."""
    options: dict[str, Any] = {"zone": config.site.timezone,
                               "pdf_max_bytes": config.pdf.max_bytes}
    if stop is not None:
        options["sleep"] = interruptible_sleep(stop)
    return options


def built_problems(config: Config, lis: LisClient) -> list[str]:
    """What the configured adapter, as its own section set it up, cannot do of what the
    config asks: ``check_wiring`` reads the class, this the built adapter (a mapped LIS
    without ``find_url`` has no patient search)."""
    if config.discovery.enabled and Capability.PATIENT_SEARCH not in capabilities(lis):
        return [f'discovery.enabled: the "{config.lis.adapter}" adapter, as configured, '
                f"cannot {Capability.PATIENT_SEARCH.ability} (no "
                f"{Capability.PATIENT_SEARCH.label})"]
    return []


@contextmanager
def open_app(config: Config, *, lis: LisClient | None = None,
             stop: threading.Event | None = None) -> Iterator[App]:
    """Build everything a pass needs, after checking the database; close it all on the way out.

    A SQLite database is locked for this process (one instance only). ``stop``, when given,
    cuts the LIS client's retry waits short once set.
    """
    check_wiring(config)
    lock = InstanceLock(config.database).acquire()
    engine = make_engine(config.database)
    client: LisClient | None = lis
    metrics: Metrics | None = None
    sync: SyncEngine | None = None
    try:
        verify_tables(engine)
        fitter = detect_text_fitter(engine)
        if client is None:
            client = make_client(config.lis, **client_options(config, stop))
            problems = built_problems(config, client)
            if problems:
                raise ConfigError(problems)
        metrics = Metrics(config.metrics)
        sync = build_sync(config, engine, client, fitter, metrics=metrics)
        discovery = DiscoveryJob(config.discovery, engine, client, fitter,
                                 zone=config.site.timezone, site_id=config.notify.site_id,
                                 now=sync.now)
        mail = (SmtpSender(config.smtp, engine, now=sync.now)
                if config.notify.backend == "smtp" and config.smtp is not None else None)
        yield App(config, engine, client, fitter, sync, metrics, discovery, mail)
    finally:
        if sync is not None:
            sync.close()
        if metrics is not None:
            metrics.close()
        if client is not None:
            client.close()
        engine.dispose()
        lock.release()
