"""The FHIR R4 adapter: DiagnosticReports asked by order, followed as a change feed, and their
PDFs (issue 13).

- One order: ``GET [base]/DiagnosticReport?identifier=[system|]{id}&_include=…``; an
  Observation the Bundle lacks is read with ``GET [base]/Observation/{id}``.
- The feed: ``GET [base]/DiagnosticReport?_lastUpdated=gt{cursor − overlap}&_sort=_lastUpdated
  &_include=…&_count={page_size}``; while there is more, on from the newest change read
  (``_lastUpdated=ge…``), and by the server's ``next`` link, as given, only through a page
  of reports that all share one instant (``changes`` says why).
- The PDF: a ``presentedForm``'s inline ``data``, or its ``url`` fetched with
  ``Accept: application/pdf`` (the raw bytes, or a JSON ``Binary``).

Every request goes through ``HttpTransport`` (retries, the one classifier, redaction) and
only ever to a path under ``lis.base_url``: a URL outside it is ``BadLisData`` and is never
fetched, so the Bearer token never leaves the base. What the server sends is read by
``reader.py`` (the mapping) from JSON whose numbers keep their literal text.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, BinaryIO, NamedTuple, TypeVar, cast
from urllib.parse import urlencode

from labsync.config import LisConfig
from labsync.config.fhir import fhir_settings
from labsync.errors import (
    BadLisData,
    LisAuthError,
    PdfNotReady,
    PermanentLisError,
    UnknownOrder,
)
from labsync.lis.base import (
    Capability,
    ChangeFeed,
    FeedPage,
    FeedProblem,
    OrderLookup,
    PdfSource,
)
from labsync.lis.body import JSON_MAX_BYTES, decode_json
from labsync.lis.fhir.binary import BinarySink, json_allowance
from labsync.lis.fhir.bundle import Resources, searchset
from labsync.lis.fhir.elements import obj
from labsync.lis.fhir.links import (
    CONTINUE,
    Base,
    Cursor,
    can_remember,
    floor_ms,
    instant_text,
    search_after,
)
from labsync.lis.fhir.reader import (
    Rules,
    last_updated,
    missing_observations,
    order_ids,
    read_report,
    version_id,
)
from labsync.lis.fhir.recent import RecentReports
from labsync.lis.http import HttpTransport, excerpt, quote_id
from labsync.model import BY_ORDER, LisOrder, PdfKind, PdfRef

_T = TypeVar("_T")
INCLUDES = {"_include": "DiagnosticReport:result",
            "_include:iterate": "Observation:has-member"}
# Observations a report may name beyond what its Bundle carries, read one by one: a bound
# against a report that would otherwise cost thousands of requests.
MAX_MISSING = 200
EXPIRED_PAGE = (404, 410)  # a server's stored search (HAPI's paging) may be gone


class RawAnswer(NamedTuple):
    """A search Bundle as received, the token masked (``labsync try-order --raw``)."""

    body: bytes


class FhirClient(OrderLookup, ChangeFeed, PdfSource):
    """A FHIR R4 server at ``config.base_url``; ``[lis.fhir]`` in ``config.options``.

    The ``token`` of ``[lis.fhir]`` goes as ``Authorization: Bearer``; without one, the
    ``[lis]`` credential (``lis.auth``) is used, if any. ``feed = false`` switches the change
    feed off (order by order only). ``feed_interval`` and ``verify_every`` tell the engine
    how to use the feed (``ChangeFeed``).
    """

    def __init__(self, config: LisConfig, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        settings = fhir_settings(config.options)
        self.settings = settings
        # (the key to fix, what it holds) when the server refuses the token, for `check`
        self.credential: tuple[str, str] | None = None
        if settings.token:
            config = dataclasses.replace(config, auth="bearer", token=settings.token)
            self.credential = ("lis.fhir.token", "Bearer token")
        self._http = HttpTransport(config, sleep=sleep, clock=clock)
        self._base = Base(config.base_url)
        self._rules = Rules(code_systems=settings.code_systems,
                            order_system=settings.order_system)
        self.feed_interval = settings.feed_interval
        self.verify_every = settings.verify_every
        self._recent = RecentReports(settings.overlap + timedelta(minutes=1))

    def disabled_capabilities(self) -> frozenset[Capability]:
        return frozenset() if self.settings.feed else frozenset({Capability.CHANGE_FEED})

    def close(self) -> None:
        self._http.close()

    # -- OrderLookup ------------------------------------------------------------------------

    def fetch_order(self, external_id: str) -> LisOrder:
        """The order's DiagnosticReport, found by its identifier; ``UnknownOrder`` if none."""
        what = f"reports of order {excerpt(external_id)}"
        quote_id(external_id)  # refuses an id no URL can carry, before anything is sent
        data = self._http.get_json("/DiagnosticReport", what=what, params={
            "identifier": self._identifier(external_id), **INCLUDES})
        return self._guarded(self._order_of, external_id, data, what)

    def answer_as_received(self, external_id: str) -> RawAnswer:
        """The order's search Bundle as the server sent it, the token masked, not yet read
        (``labsync try-order --raw``); with ``order_from_answer`` it is ``fetch_order``."""
        what = f"reports of order {excerpt(external_id)}"
        quote_id(external_id)
        query = urlencode({"identifier": self._identifier(external_id), **INCLUDES})
        sink = io.BytesIO()
        self._http.stream_to(f"/DiagnosticReport?{query}", sink, what=what,
                             max_bytes=JSON_MAX_BYTES, accept="application/fhir+json")
        text = sink.getvalue().decode("utf-8", "surrogateescape")
        return RawAnswer(self._http.redact(text).encode("utf-8", "surrogateescape"))

    def order_from_answer(self, external_id: str, answer: RawAnswer) -> LisOrder:
        """The order of an ``answer_as_received``, read as ``fetch_order`` reads it."""
        what = f"reports of order {excerpt(external_id)}"
        return self._guarded(self._order_of, external_id, decode_json(answer.body, what=what),
                             what)

    def _order_of(self, external_id: str, data: Any, what: str) -> LisOrder:
        page = searchset(data, what)
        mine = [(report, where) for report, where in page.matches
                if external_id in order_ids(obj(report, where), where, self._rules)]
        if not mine:
            raise UnknownOrder(f"{what}: the order is unknown to the LIS (no DiagnosticReport)")
        if len(mine) > 1:  # a replaced report may stay, marked entered-in-error
            live = [m for m in mine if m[0].get("status") != "entered-in-error"]
            mine = live or mine[-1:]
        if len(mine) > 1:
            raise BadLisData(f"{what}: {len(mine)} DiagnosticReports carry this order; labsync "
                             "takes one report per order")
        report, where = mine[0]
        self._complete(report, page.resources, where)
        return read_report(external_id, report, page.resources, where, self._rules)

    def _identifier(self, external_id: str) -> str:
        """The ``identifier`` search value: ``system|value``, FHIR's special characters
        escaped, so ``a,b`` is one value and not two."""
        value = external_id
        for char in ("\\", "|", ",", "$"):
            value = value.replace(char, "\\" + char)
        system = self._rules.order_system
        return f"{system}|{value}" if system else value

    def _complete(self, report: dict[str, Any], resources: Resources, where: str) -> None:
        """Read the Observations the report names that its Bundle does not carry, until none
        is missing (members of members too)."""
        read = 0
        while missing := missing_observations(report, resources, where):
            for reference in missing:
                read += 1
                if read > MAX_MISSING:
                    raise BadLisData(f"{where}: names more than {MAX_MISSING} Observations its "
                                     "search answer does not carry")
                path = self._base.path_of(reference, f"{where}: Observation")
                found = self._http.get_json(path, what=f"{where}: Observation "
                                                       f"{excerpt(reference)}")
                resource = obj(found, f"{where}: Observation {excerpt(reference)}")
                if resource.get("resourceType") != "Observation":
                    raise BadLisData(f"{where}: {excerpt(reference)} is not an Observation")
                resources.add(resource, reference)

    # -- ChangeFeed -------------------------------------------------------------------------

    def changes(self, cursor: str | None, *, since: datetime | None = None) -> FeedPage:
        """The reports changed after the cursor (or from ``since`` on a first read), one page
        of ``page_size``, oldest first; ``more`` while the server has more.

        A read from a cursor at rest re-reads its ``overlap`` (clock skew, late commits).
        While there is more, the next read starts at the newest change read so far
        (``_lastUpdated=ge…``), not at the server's offset-paged ``next`` link: a report that
        changes meanwhile moves to the end and would shift every offset by one, and the
        report at the page boundary would never come. The ``next`` link is followed only
        when a whole page shares one ``lastUpdated`` (a batch written at once), where
        starting at that instant again would read the same page for ever.

        A report that cannot be read is left out and named in ``problems``; the cursor
        still moves past it. A report the overlap finds again at the version this process
        handed out (and the engine applied) is left out too (``recent.py``).
        """
        if not self.settings.feed:
            raise PermanentLisError("change feed: switched off (lis.fhir.feed = false)")
        where = Cursor.decode(cursor) if cursor is not None else None
        self._recent.reading_from(cursor)
        what = "change feed"
        data: Any = None
        if where is not None and where.next_page and not where.reading_on:
            try:
                data = self._http.get_json(where.next_page, what=f"{what}: next page")
            except PermanentLisError as exc:
                if exc.status not in EXPIRED_PAGE:
                    raise
                data = None  # the server's stored search expired: search at that instant
        if data is None:
            params = {"_sort": "_lastUpdated", "_count": str(self.settings.page_size),
                      **INCLUDES}
            if where is not None and where.next_page:  # reading on
                params["_lastUpdated"] = "ge" + instant_text(where.newest)
            elif where is not None:
                params["_lastUpdated"] = search_after(where.newest, self.settings.overlap)
            elif since is not None:
                params["_lastUpdated"] = "ge" + instant_text(since)
            data = self._http.get_json("/DiagnosticReport", what=what, params=params)
        return self._guarded(self._page, data, where, what)

    def _page(self, data: Any, where: Cursor | None, what: str) -> FeedPage:
        page = searchset(data, what)
        orders: list[LisOrder] = []
        problems: list[FeedProblem] = []
        dated: list[tuple[datetime, str | None]] = []  # (lastUpdated to the ms, report id)
        handed: list[tuple[str, str | None, datetime]] = []
        passed = set(where.seen) if where is not None and where.reading_on else set()
        for report, place in page.matches:
            try:
                changed = last_updated(report, place)
                version = version_id(report, place)
            except BadLisData:
                changed = version = None  # reading it below says why
            rid = report.get("id") if isinstance(report.get("id"), str) else None
            if changed is not None:
                at = floor_ms(changed)
                dated.append((at, rid))
                if where is not None and rid in passed and at == where.newest:
                    continue  # read on the page before, at the instant this read starts
                if rid is not None and self._recent.applied(rid, version, at):
                    continue  # re-read by the overlap, as it was applied
            listed, problem = self._listed(report, page.resources, place)
            orders += listed
            problems += problem
            if rid is not None and changed is not None and not problem:
                handed.append((rid, version, floor_ms(changed)))
        # The newest change ever applied (where the feed rests at its end), and where the
        # next read goes on from: this page's newest, which is older than the mark while
        # the overlap of a read at rest is paged through (every page of it is read).
        newest = max([t for t, _ in dated] + ([where.high] if where else []), default=None)
        if newest is None:  # nothing dated was ever read: no cursor yet
            if page.next_link is not None:
                raise BadLisData(f"{what}: reports without meta.lastUpdated cannot be followed")
            return FeedPage(tuple(orders), None, problems=tuple(problems))
        more = page.next_link is not None
        cursor = Cursor(newest)
        if page.next_link is not None:
            on_from = max((t for t, _ in dated), default=where.newest if where else newest)
            at_on_from = [rid or "" for t, rid in dated if t == on_from]
            if where is not None and where.reading_on and on_from == where.newest:
                at_on_from = list(dict.fromkeys([*where.seen, *at_on_from]))
            if len({t for t, _ in dated}) > 1 and can_remember(at_on_from):
                cursor = Cursor(on_from, CONTINUE, tuple(at_on_from), mark=newest)
            else:  # one instant fills the page: only the server's own next page goes on
                cursor = Cursor(on_from, self._next_page(page.next_link, what), mark=newest)
        text = cursor.encode()
        self._recent.handed_out(text, handed, newest)
        return FeedPage(tuple(orders), text, more=more, problems=tuple(problems))

    def _next_page(self, link: str, what: str) -> str:
        """The server's next page as a path under the base, to be kept in the cursor (the
        transport masked the credential in the body already: no cursor can hold it)."""
        return self._base.path_of(link, f"{what}: next link") or "/"

    def _listed(self, report: dict[str, Any], resources: Resources, where: str
                ) -> tuple[list[LisOrder], list[FeedProblem]]:
        """The orders one report of a feed page names, each as the report has it; or, for a
        report that cannot be read, the problem, once per order it names."""
        ids: list[str] = []
        try:
            ids = order_ids(report, where, self._rules)
            if not ids:
                return [], []
            self._complete(report, resources, where)
            order = read_report(ids[0], report, resources, where, self._rules)
        except LisAuthError:
            raise
        except (BadLisData, PermanentLisError) as exc:
            error = type(exc)(self._http.redact(str(exc)), status=exc.status)
            named: list[str | None] = list(ids) or [None]  # None: it named no order readably
            return [], [FeedProblem(external_id, error) for external_id in named]
        return [order if i == ids[0] else dataclasses.replace(order, external_id=i)
                for i in ids], []

    # -- PdfSource --------------------------------------------------------------------------

    def fetch_pdf(self, external_id: str, sink: BinaryIO, *, max_bytes: int,
                  ref: PdfRef = BY_ORDER) -> int:
        """The PDF ``ref`` points to: a ``presentedForm`` URL under the base (relative, like
        ``Binary/12``, or absolute), or, by order, the form of the order's report."""
        what = f"PDF of order {excerpt(external_id)}"
        if ref.kind is PdfKind.BY_ORDER:
            form = self.fetch_order(external_id).pdf
            if form is None:
                raise PdfNotReady(f"{what}: the report has no PDF form yet")
            ref = form
        if ref.kind is PdfKind.INLINE:
            data = ref.data or b""
            if len(data) > max_bytes:
                raise BadLisData(f"{what}: the body is larger than {max_bytes} bytes")
            sink.seek(0)
            sink.truncate()
            sink.write(data)
            sink.flush()
            return len(data)
        path = self._guarded(self._base.path_of, ref.url or "", what)
        binary = BinarySink(sink, max_bytes, what)
        self._http.stream_to(path, cast(BinaryIO, binary), what=what, not_found=PdfNotReady,
                             max_bytes=json_allowance(max_bytes), accept="application/pdf")
        return self._guarded(binary.finish)

    # -- shared -----------------------------------------------------------------------------

    def _guarded(self, parse: Callable[..., _T], *args: Any) -> _T:
        """``parse(*args)``; its messages quote what the server sent, which might echo the
        token."""
        try:
            return parse(*args)
        except BadLisData as exc:
            raise BadLisData(self._http.redact(str(exc)), status=exc.status) from None
