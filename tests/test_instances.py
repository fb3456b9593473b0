"""Several labsync instances at once: never the same order twice."""

from __future__ import annotations

import json

import pytest

from labsync.testing.fake_qlab import FakeQlab
from labsync.testing.pdfs import sample_pdf
from tests.conftest import API_KEY, add_user
from tests.helpers import RESULTS, add_orders
from tests.invariants import check_invariants
from tests.processes import labsync, write_config


@pytest.mark.mariadb
def test_two_sync_once_processes_do_every_order_exactly_once(mariadb, tmp_path):
    mariadb.clear()
    add_user(mariadb, 7)
    names = [f"M-{i:04d}" for i in range(450)]
    pdfs = {n: sample_pdf(f"Lab results {n}") for n in names}
    add_orders(mariadb, names)
    with FakeQlab(api_key=API_KEY, latency=0.005) as lis:
        for name in names:
            lis.add_order(name, results=RESULTS, pdf=pdfs[name])
        config = write_config(tmp_path / "c.toml", db_url=mariadb.url, lis_url=lis.base_url,
                              api_key=API_KEY, pdf_dir=tmp_path / "pdfs",
                              lis={"max_concurrency": 4}, sync={"page_size": 25})
        procs = [labsync(config, "sync-once", log=tmp_path / f"p{i}.log") for i in range(2)]
        codes = [p.wait(timeout=180) for p in procs]
        asked = lis.request_count("results")
    assert codes == [0, 0]
    summaries = []
    for i in range(2):
        for line in (tmp_path / f"p{i}.log").read_text().splitlines():
            if '"pass.finished"' in line:
                summaries.append(json.loads(line))
    assert len(summaries) == 2
    assert sum(s["completed"] for s in summaries) == 450
    assert all(s["completed"] > 0 for s in summaries), "one process did all the work"
    assert asked == 450  # no order was asked about by both
    counts = check_invariants(mariadb, tmp_path / "pdfs",
                              expected_results={n: 3 for n in names}, expected_pdfs=pdfs)
    assert counts == {"completed": 450, "not_completed": 0}
    assert mariadb.scalar("SELECT COUNT(*) FROM b_event") == 450


def test_a_second_process_on_one_sqlite_database_is_refused(tmp_path):
    from sqlalchemy.engine import make_url

    from labsync.config import DatabaseConfig
    from labsync.errors import LabsyncError
    from labsync.instance import InstanceLock

    database = DatabaseConfig(url=make_url(f"sqlite:///{tmp_path / 'site.db'}"))
    with InstanceLock(database):
        with pytest.raises(LabsyncError, match="already working on this SQLite database"):
            InstanceLock(database).acquire()
    InstanceLock(database).acquire().release()  # free again once the first one let go


def test_sync_once_says_clearly_that_another_instance_holds_sqlite(tmp_path):
    import subprocess
    import sys

    from sqlalchemy.engine import make_url

    from labsync.config import DatabaseConfig
    from labsync.instance import InstanceLock
    from labsync.store.db import init_db, make_engine

    db_url = f"sqlite:///{tmp_path / 'site.db'}"
    engine = make_engine(DatabaseConfig(url=make_url(db_url)))
    init_db(engine, with_bitrix=True)
    engine.dispose()
    config = write_config(tmp_path / "c.toml", db_url=db_url, lis_url="http://127.0.0.1:9/v2",
                          api_key=API_KEY, pdf_dir=tmp_path / "pdfs")
    with InstanceLock(DatabaseConfig(url=make_url(db_url))):
        done = subprocess.run([sys.executable, "-m", "labsync.cli", "--config", str(config),
                               "sync-once"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "single instance" in done.stderr and "Traceback" not in done.stderr
