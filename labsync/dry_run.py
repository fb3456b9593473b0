"""``labsync try-order EXTERNAL_ORDER_ID``: ask the LIS about one order and show what labsync
would write, writing nothing. This is how an integrator checks a mapping (docs/mapped.md).

For every adapter: the LIS's status, each result row with its columns, the PDF's size and
check, the mail a pass would queue, from the same code a pass runs (the adapter,
``pdfs.PdfStore``'s checks, ``planner.plan``). The site's tables are only read (a
read-only connection; without them the order is shown as a new one would be written), and
the PDF is checked in a temporary folder that is removed afterwards.

Two optional adapter hooks (duck-typed; an adapter without them is asked ``fetch_order``):

- ``answer_as_received(external_id)`` → an answer with ``.body`` (the bytes the LIS sent,
  secrets masked) and ``order_from_answer(external_id, answer)`` → the ``LisOrder``: together
  they are ``fetch_order``, and ``--raw`` prints ``.body``, even when it does not map;
- ``field_sources()`` → ``{"status": "state.code", "results.value": "result.value", …}``:
  which expression gave each field (the mapped adapter).

Exit status: 0 the order maps, 1 problems (listed; an unknown status is one), 2 an unusable
configuration (raised as ``ConfigError``, for the CLI to report).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import SQLAlchemyError

from labsync import planner
from labsync.app import client_options
from labsync.clock import site_time, utc_now
from labsync.config import Config
from labsync.errors import LisError, PdfError, PdfNotReady
from labsync.lis.base import LisClient
from labsync.lis.registry import make_client
from labsync.logs import Redactor
from labsync.model import LisOrder, OrderStatus
from labsync.pdfs import PdfStore, StagedPdf
from labsync.store import bitrix, bookkeeping, versions
from labsync.store.db import TextFitter, describe_db_error, detect_text_fitter, make_engine
from labsync.store.orders import PendingOrder, find_order
from labsync.store.tables import local_lab_results

EXIT_OK, EXIT_PROBLEMS = 0, 1
# Result columns → the ``TestResult`` field each comes from (``field_sources`` keys).
_COLUMN_FIELDS = {"TEST_CODE": "code", "TEST_NAME": "name", "RESULT_VALUE": "value",
                  "RESULT_UNIT": "unit", "REFERENCE_MIN": "ref_min",
                  "REFERENCE_MAX": "ref_max", "IS_ABNORMAL": "abnormal",
                  "RESULT_DATE": "result_date"}
_HOW = {"inline": "it came inside the answer", "url": "fetched from the URL the answer gave",
        "by_order": "fetched by the order's id"}


@dataclass
class _Site:
    """What the site holds of the order, read without a lock or a write."""

    order: PendingOrder | None = None
    state: Any = None
    stored: list[dict[str, Any]] = field(default_factory=list)
    seen: planner.Seen | None = None
    user: bitrix.SiteUser | None = None
    fitter: TextFitter = field(default_factory=TextFitter)
    note: str | None = None  # why the site was not read


@dataclass
class _Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def say(self, line: str = "") -> None:
        self.lines.append(line)


def try_order(config: Config, external_id: str, *, raw: bool = False,
              out: TextIO | None = None, now: Callable[[], datetime] = utc_now) -> int:
    """Print what labsync would write for ``external_id``; return the exit status."""
    out = out or sys.stdout
    redactor = Redactor(config.secrets(), config.secret_headers())
    client = make_client(config.lis, **client_options(config))
    try:
        report = _try(config, client, external_id, raw=raw, now=now())
    finally:
        client.close()
    for line in report.lines:
        print(redactor.redact(line), file=out)
    if report.problems:
        print(f"problems ({len(report.problems)}):", file=out)
        for problem in report.problems:
            print(f"  {redactor.redact(problem)}", file=out)
    print("nothing was written.", file=out)
    return EXIT_PROBLEMS if report.problems else EXIT_OK


def _try(config: Config, client: LisClient, external_id: str, *, raw: bool,
         now: datetime) -> _Report:
    report = _Report()
    report.say(f"order {external_id} (lis.adapter = {config.lis.adapter!r})")
    order = _ask(client, external_id, raw, report)
    if order is None:
        return report
    sources: dict[str, str] = getattr(client, "field_sources", dict)()
    report.say(f"LIS status: {order.status.value}{_from(sources, 'status')}")
    if order.changed_at is not None or order.version is not None:
        report.say(f"LIS changed at: {order.changed_at}, version: {order.version}")
    site = _read_site(config, external_id)
    _say_site(site, report)
    pdf = _stage_pdf(config, client, order, site, report)
    _plan(config, order, pdf, site, sources, now, report)
    return report


def _ask(client: LisClient, external_id: str, raw: bool, report: _Report) -> LisOrder | None:
    """The LIS's order; with ``raw``, its answer as received first. None: a problem."""
    receive = getattr(client, "answer_as_received", None)
    convert = getattr(client, "order_from_answer", None)
    try:
        if receive is None or convert is None:
            if raw:
                report.say("(this adapter cannot show its answer as received)")
            return client.fetch_order(external_id)
        answer = receive(external_id)
        if raw:
            report.say("LIS answer as received:")
            report.lines.extend(answer.body.decode("utf-8", "replace").splitlines())
            report.say("")
        order: LisOrder = convert(external_id, answer)
        return order
    except LisError as exc:
        report.problems.append(f"{exc.kind}: {exc}")
        return None


def _from(sources: dict[str, str], name: str) -> str:
    return f"    ← {name}: {sources[name]}" if name in sources else ""


# -- the site, read only ------------------------------------------------------------------------


def _read_only_engine(config: Config) -> Engine | None:
    """An engine that cannot write: SQLite opened read-only (and only if the file exists)."""
    url = config.database.url
    if not config.database.is_sqlite:
        return make_engine(config.database)
    path = Path(url.database or "")
    if not path.is_file():
        return None
    return create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")


def _read_site(config: Config, external_id: str) -> _Site:
    try:
        engine = _read_only_engine(config)
    except SQLAlchemyError as exc:
        return _Site(note=f"the database was not read ({describe_db_error(exc)})")
    if engine is None:
        return _Site(note=f"the database {config.database.url.database} does not exist")
    try:
        fitter = detect_text_fitter(engine)
        with engine.connect() as conn:
            if not config.database.is_sqlite:
                conn.execute(text("SET SESSION TRANSACTION READ ONLY"))
            row = find_order(conn, external_id)
            if row is None:
                return _Site(fitter=fitter)
            state = bookkeeping.get_state(conn, row.ID)
            stored = [dict(r) for r in conn.execute(
                select(local_lab_results).where(local_lab_results.c.ORDER_ID == row.ID)
                .order_by(local_lab_results.c.ID)).mappings()]
            seen_row = versions.get(conn, row.ID)
            user = bitrix.get_user(conn, row.USER_ID)
            conn.rollback()
    except SQLAlchemyError as exc:
        return _Site(note=f"the database was not read ({describe_db_error(exc)})")
    finally:
        engine.dispose()
    order = PendingOrder(
        id=row.ID, external_id=row.EXTERNAL_ORDER_ID, user_id=row.USER_ID, status=row.STATUS,
        order_date=row.ORDER_DATE, recheck=row.STATUS == "completed",
        results_hash=state.RESULTS_HASH if state else None,
        first_seen_at=state.FIRST_SEEN_AT if state else None,
        stale_at=state.STALE_AT if state else None,
        results_count=state.RESULTS_COUNT if state else None,
        pdf_missing=row.STATUS == "completed" and (state is None or state.PDF_PATH is None))
    seen = (planner.Seen(seen_row.CHANGED_AT, seen_row.VERSION, seen_row.PDF_WAIT_SINCE)
            if seen_row is not None else None)
    return _Site(order, state, stored, seen, user, fitter)


def _say_site(site: _Site, report: _Report) -> None:
    if site.order is None:
        why = site.note or "it is not in local_lab_orders"
        report.say(f"site: {why}; shown as a new order of the site would be written")
        return
    order = site.order
    report.say(f"site: local_lab_orders.ID {order.id}, USER_ID {order.user_id}, STATUS "
               f"{order.status}, {len(site.stored)} result rows")


# -- the PDF, checked in a folder of its own ------------------------------------------------------


def _stage_pdf(config: Config, client: LisClient, order: LisOrder, site: _Site,
               report: _Report) -> StagedPdf | None:
    """The order's PDF fetched and checked as a pass would, in a temporary folder removed
    at once; what is returned describes it (``final_path``: where a pass would put it)."""
    if order.status is not OrderStatus.COMPLETED:
        return None
    user_id = site.order.user_id if site.order else 1
    if order.pdf is None:
        report.say("PDF: the LIS gave none with this answer")
        return None
    with tempfile.TemporaryDirectory(prefix="labsync-try-") as folder:
        try:
            staged = PdfStore(Path(folder), config.pdf.max_bytes).stage(
                user_id, order.external_id, client, order.pdf)
        except PdfNotReady as exc:
            report.say(f"PDF: not ready yet ({exc})")
            return None
        except (LisError, PdfError) as exc:
            report.problems.append(f"PDF: {exc}")
            return None
    final = PdfStore(config.pdf.dir, config.pdf.max_bytes).final_path(user_id,
                                                                      order.external_id)
    if site.order is None:  # no user to name: the folder is the order's USER_ID
        final = final.parent.parent / "<USER_ID>" / final.name
    report.say(f"PDF: {staged.size} bytes, sha256 {staged.sha256[:16]}…, checked (starts "
               f"with %PDF-, ends with %%EOF, at most pdf.max_bytes = {config.pdf.max_bytes}); "
               f"{_HOW[order.pdf.kind.value]}; a pass would put it at {final}")
    return StagedPdf(temp_path=staged.temp_path, final_path=final, size=staged.size,
                     sha256=staged.sha256)


# -- the plan ---------------------------------------------------------------------------------


def _plan(config: Config, order: LisOrder, pdf: StagedPdf | None, site: _Site,
          sources: dict[str, str], now: datetime, report: _Report) -> None:
    policy = planner.policy(
        zone=config.site.timezone, fitter=site.fitter, interval=config.sync.interval,
        stale_after=config.sync.stale_after, recheck_days=config.sync.recheck_days,
        pdf_required=config.pdf.required, pdf_wait=config.pdf.wait)
    asked = site.order or PendingOrder(id=0, external_id=order.external_id, user_id=0,
                                       status="received", order_date=None)
    owner = getattr(site.state, "LEASE_OWNER", None) or "labsync try-order"
    local = planner.Local(asked, asked, site.state, site.stored, site.seen, owner)
    plan = planner.plan(local, planner.Answer(order, pdf), now, policy)
    report.say(f"a pass would: {_outcome(plan, site)}")
    if plan.status is not None:
        report.say(f"  local_lab_orders.STATUS → {plan.status}"
                   + (", SYNCED_AT → now" if plan.synced else ""))
    rows = plan.rows
    if rows.any or plan.outcome != "skipped":
        report.say(f"  local_lab_results: {len(rows.insert)} to insert, {len(rows.update)} to "
                   f"update, {len(rows.delete)} to delete")
    for i, row in enumerate(rows.insert, start=1):
        report.say(f"  row {i} (new):")
        for column, value in row.items():
            name = _COLUMN_FIELDS.get(column)
            hint = _from(sources, f"results.{name}") if name else ""
            report.say(f"    {column:<14}{_shown(value):<24}{hint}".rstrip())
    for row_id, changed in rows.update:
        report.say(f"  row ID {row_id} (changed): " + ", ".join(
            f"{c} → {_shown(v)}" for c, v in changed.items()))
    for row_id in rows.delete:
        report.say(f"  row ID {row_id}: deleted (the LIS no longer lists it)")
    for note in plan.notes:
        report.say(f"  fitted: {note}")
    for line in plan.admin_log:
        report.say(f"  b_event_log: {line}")
    _say_mail(config, plan, site, now, report)


def _outcome(plan: planner.Plan, site: _Site) -> str:
    if plan.outcome == "skipped":
        status = site.order.status if site.order else None
        return f"nothing (the site's order is {status}: a pass does not take it now)"
    return {"completed": "complete the order", "corrected": "correct the completed order",
            "rechecked": "recheck it (nothing new to write)", "cancelled": "cancel the order",
            "pending": "keep the order pending"}.get(plan.outcome, plan.outcome)


def _shown(value: Any) -> str:
    return "NULL" if value is None else repr(value) if isinstance(value, str) else str(value)


def _say_mail(config: Config, plan: planner.Plan, site: _Site, now: datetime,
              report: _Report) -> None:
    if plan.mail is None:
        report.say("  mail: none")
        return
    notify = config.notify
    event = notify.event_name if plan.mail.kind == "ready" else notify.updated_event_name
    if site.order is None:
        report.say(f"  mail: {event} to the order's user (the site has no such order, so no "
                   "user to name)")
        return
    user = site.user
    if user is None or not user.active or not user.email:
        why = ("no such user" if user is None else "the user is not active" if not user.active
               else "the user has no e-mail")
        report.say(f"  mail: none ({why}; a pass logs the skip)")
        return
    # The fields BitrixNotifier puts in C_FIELDS (tests/test_try_order.py compares them with
    # what a pass queues).
    fields = {"EMAIL": user.email, "NAME": user.name or "", "LAST_NAME": user.last_name or "",
              "ORDER_ID": site.order.external_id, "LOCAL_ORDER_ID": str(site.order.id),
              "RESULT_URL": notify.result_url.format(order_id=site.order.id)}
    if plan.mail.kind == "updated":
        fields["VERSION"] = str(plan.mail.version)
    how = ("b_event" if notify.backend == "bitrix" else "labsync's SMTP outbox")
    report.say(f"  mail: {event} into {how}, site {notify.site_id}, at "
               f"{site_time(now, config.site.timezone):%Y-%m-%d %H:%M:%S} site time")
    for key, value in fields.items():
        report.say(f"    {key:<16}{value}")
