"""Wiring: from a validated config to the engine, the LIS client and the sync engine.

The CLI, the daemon and the demo all build labsync here, so they run the same code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine

from labsync.config import Config
from labsync.lis.base import LisClient
from labsync.lis.registry import make_client
from labsync.store.db import TextFitter, detect_text_fitter, make_engine
from labsync.sync import SyncEngine


@dataclass
class App:
    config: Config
    engine: Engine
    lis: LisClient
    fitter: TextFitter
    sync: SyncEngine


@contextmanager
def open_app(config: Config, *, lis: LisClient | None = None) -> Iterator[App]:
    """Build everything a pass needs; close connections on the way out."""
    engine = make_engine(config.database)
    client = lis or make_client(config.lis)
    try:
        fitter = detect_text_fitter(engine)
        yield App(config, engine, client, fitter, SyncEngine(config, engine, client, fitter))
    finally:
        client.close()
        engine.dispose()
