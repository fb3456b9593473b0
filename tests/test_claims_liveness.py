"""A claim lives as long as its owner: a dead instance's orders are free at once."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from labsync.store import claims, liveness, orders
from labsync.store.tx import run_tx
from tests.conftest import add_user
from tests.helpers import add_orders

NOW = datetime(2026, 12, 1, 9, 0)
LEASE = timedelta(minutes=15)


def _page(db, *, dead=()):
    return run_tx(db.engine, lambda conn: orders.pending_page(
        conn, after_id=0, limit=100, now_utc=NOW, due_only=False, dead=dead))


def _claim(db, owner, *, dead=()):
    page = _page(db, dead=dead)
    return run_tx(db.engine, lambda conn: claims.claim(
        conn, page, owner=owner, now=NOW, until=NOW + LEASE, dead=dead))


def _dead(db, besides):
    return run_tx(db.engine, lambda conn: liveness.dead_owners(
        conn, liveness.claim_holders(conn, NOW, besides=besides)))


@pytest.mark.mariadb
def test_a_live_owners_claims_stay_and_a_dead_owners_are_taken_at_once(mariadb):
    mariadb.clear()
    add_user(mariadb, 7)
    add_orders(mariadb, ["L-1", "L-2", "L-3"])
    a = liveness.OwnerLock(mariadb.engine, "host-a:101:aaaaaaaaaaaa")
    b = liveness.OwnerLock(mariadb.engine, "host-b:202:bbbbbbbbbbbb")
    try:
        assert a.ensure() and b.ensure()
        assert len(_claim(mariadb, a.owner)) == 3
        # A lives: its claims are in B's way, within their 15-minute lease.
        assert _dead(mariadb, b.owner) == set()
        assert _page(mariadb) == []
        assert _claim(mariadb, b.owner) == set()
        a.close()  # A's connection ends, as it does when the process is killed
        dead = _dead(mariadb, b.owner)
        assert dead == {a.owner}
        assert len(_claim(mariadb, b.owner, dead=dead)) == 3
        assert mariadb.scalar("SELECT COUNT(*) FROM labsync_orders WHERE LEASE_OWNER = :o",
                              o=b.owner) == 3
    finally:
        a.close()
        b.close()


@pytest.mark.mariadb
def test_an_owner_whose_connection_was_killed_takes_its_lock_again(mariadb):
    mariadb.clear()
    lock = liveness.OwnerLock(mariadb.engine, "host-a:101:cccccccccccc")
    try:
        assert lock.ensure()
        held_by = mariadb.scalar("SELECT IS_USED_LOCK(:n)", n=lock.name)
        assert held_by is not None
        with mariadb.engine.connect() as admin:
            admin.execute(text(f"KILL CONNECTION {int(held_by)}"))
        with mariadb.engine.connect() as conn:
            assert liveness.dead_owners(conn, [lock.owner]) == {lock.owner}
        assert lock.ensure()  # a new connection, the lock taken again
        again = mariadb.scalar("SELECT IS_USED_LOCK(:n)", n=lock.name)
        assert again is not None and again != held_by
        with mariadb.engine.connect() as conn:
            assert liveness.dead_owners(conn, [lock.owner]) == set()
    finally:
        lock.close()
    assert mariadb.scalar("SELECT IS_USED_LOCK(:n)", n=lock.name) is None


def test_on_sqlite_every_other_owner_is_dead_because_one_instance_runs(tmp_path):
    from sqlalchemy.engine import make_url

    from labsync.config import DatabaseConfig
    from labsync.store.db import init_db, make_engine
    from tests.conftest import Db

    url = f"sqlite:///{tmp_path / 'site.db'}"
    engine = make_engine(DatabaseConfig(url=make_url(url)))
    init_db(engine, with_bitrix=True)
    db = Db("sqlite", url, engine)
    add_user(db, 7)
    add_orders(db, ["L-1", "L-2"])
    lock = liveness.OwnerLock(engine, "me:1:dddddddddddd")
    assert not lock.enabled and lock.ensure()
    assert len(_claim(db, "before-a-crash:9:eeeeeeeeeeee")) == 2
    dead = _dead(db, "me:1:dddddddddddd")
    assert dead == {"before-a-crash:9:eeeeeeeeeeee"}
    assert len(_claim(db, "me:1:dddddddddddd", dead=dead)) == 2
    engine.dispose()


def test_lock_names_fit_mysqls_limit_and_differ_by_owner():
    owner = claims.new_owner()
    assert len(liveness.lock_name(owner)) <= 64
    assert liveness.lock_name(owner) != liveness.lock_name(claims.new_owner())
