"""The orders a pass works on: pending orders in pages, each page claimed for this instance.

Pages are read with keyset paging on ``ID`` (memory stays flat however many orders wait)
and claimed before they are handed out (``store.claims``). A claim lives as long as its
owner (``store.liveness``): the claims of owners found dead are free, like expired ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from datetime import datetime, timedelta
from functools import partial

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from labsync.errors import StoreError
from labsync.store import claims, liveness, orders
from labsync.store.tx import run_tx

log = structlog.get_logger("labsync.sync")


class ClaimedPages:
    """This instance's claims: who it is, whether the others live, and its pages."""

    def __init__(self, engine: Engine, *, page_size: int, lease: float, recheck_days: int,
                 now: Callable[[], datetime]) -> None:
        self.engine = engine
        self.page_size = page_size
        self.lease = timedelta(seconds=lease)
        self.recheck_days = recheck_days
        self.now = now
        self.owner = claims.new_owner()
        self.liveness = liveness.OwnerLock(engine, self.owner)
        self.progress_at = time.monotonic()  # moves on with every page

    def dead_owners(self, *, quiet: bool = False) -> set[str]:
        """Owners of live-looking claims who died (their orders are free now)."""
        self.liveness.ensure()
        now = self.now()
        dead = run_tx(self.engine, lambda conn: liveness.dead_owners(
            conn, liveness.claim_holders(conn, now, besides=self.owner)), retry=True)
        if not quiet:
            for owner in sorted(dead):
                log.info("claims.owner_gone", owner=owner)
        return dead

    def pages(self, due_only: bool, dead: Collection[str], *,
              held_by: Collection[str] = ()) -> Iterator[list[orders.PendingOrder]]:
        """Pages of pending orders, each claimed for this instance before it is yielded;
        ``held_by``: only the orders these (dead) owners hold."""
        after = 0
        while True:
            now = self.now()
            since = now - timedelta(days=self.recheck_days) if self.recheck_days else None
            page = run_tx(self.engine, partial(
                orders.pending_page, after_id=after, limit=self.page_size, now_utc=now,
                due_only=due_only, recheck_since=since, dead=dead, held_by=held_by))
            if not page:
                return
            self.liveness.ensure()  # before the claim that relies on it
            mine = run_tx(self.engine, partial(claims.claim, page=page, owner=self.owner,
                                               now=now, until=now + self.lease, dead=dead),
                          retry=True)
            self.progress_at = time.monotonic()
            yield [o for o in page if o.id in mine]
            after = page[-1].id
            if len(page) < self.page_size:
                return

    def release(self) -> None:
        """Give up every claim of this instance (the end of a pass)."""
        try:
            run_tx(self.engine, lambda conn: claims.release_all(conn, self.owner))
        except (StoreError, SQLAlchemyError) as exc:
            # The leases run out by themselves; another instance may take the orders then.
            log.warning("claims.not_released", error=str(exc))

    def close(self) -> None:
        """Let this instance's liveness lock go (a clean stop)."""
        self.liveness.close()
