"""Where the FHIR adapter may go: URLs under ``lis.base_url`` only, and its feed cursor.

Every URL the server hands out (a ``next`` page, a ``presentedForm.url``, an absolute
reference) is turned into a path under the base here, or refused: the Bearer token goes with
every request, so a request must never leave the base.

The cursor is ``fhir1;<instant>;<step>``: the newest ``meta.lastUpdated`` applied, with
millisecond precision and its offset, then how the next read goes on: empty when the feed
was read to its end (the next read re-reads the overlap), ``+id,id`` when there is more
(read on from that instant, passing over the reports named, read already at that instant),
or the path under the base of the server's ``next`` page (a page whose reports all share
that instant).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urljoin, urlsplit

from labsync.errors import BadLisData, PermanentLisError
from labsync.lis.http import excerpt

CURSOR_PREFIX = "fhir1"
CONTINUE = "+"  # the feed has more: read on from the newest change, without the overlap
MAX_CURSOR = 1900  # labsync_cursors.FEED_CURSOR holds 2000
MAX_SEEN = 20  # reports at one instant a cursor remembers; more: the server's next link
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Base:
    """``lis.base_url``, and the paths under it that URLs of the server stand for."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url.rstrip("/")
        parts = urlsplit(self.url)
        self._scheme = parts.scheme.lower()
        self._origin = _origin(parts.scheme, parts.hostname, parts.port)
        self._path = parts.path.rstrip("/")

    def path_of(self, url: str, what: str) -> str:
        """The path (and query) under the base that ``url`` names: an absolute URL under the
        base, or one relative to it (``Binary/12``); ``BadLisData`` for anything else."""
        absolute = urljoin(self.url + "/", url.strip())
        parts = urlsplit(absolute)
        try:
            origin = _origin(parts.scheme, parts.hostname, parts.port)
        except ValueError:  # a port that is not a number
            origin = None
        path = parts.path
        inside = path == self._path or path.startswith(self._path + "/")
        if origin != self._origin or parts.username or parts.password or not inside \
                or "/../" in f"{path}/" or parts.fragment:
            raise BadLisData(f"{what}: {excerpt(url, redact=())[:120]!r} is not under "
                             "lis.base_url; labsync follows no URL outside it")
        rest = path[len(self._path):] + (f"?{parts.query}" if parts.query else "")
        if rest and rest[0] not in "/?":  # cannot happen after the checks; never risk a host
            raise BadLisData(f"{what}: not a path under lis.base_url")
        return rest


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int | None]:
    scheme = scheme.lower()
    return scheme, (host or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


# -- the feed cursor ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where the feed stands: the newest change applied, and how the next read goes on.

    ``next_page``: "" at rest; ``CONTINUE`` to read on from ``newest``, passing over the
    reports of ``seen`` (ids of those read already at exactly that instant); or the path of
    the server's next page.

    ``mark``: while reading on through the overlap of a read at rest, the pages are older
    than the newest change ever applied; ``newest`` is where reading goes on (the newest
    change of the last page), ``mark`` the newest change ever applied, where the feed rests
    once it is read to its end. None when it is ``newest`` itself.
    """

    newest: datetime  # aware
    next_page: str = ""
    seen: tuple[str, ...] = ()
    mark: datetime | None = None

    @property
    def reading_on(self) -> bool:
        return self.next_page == CONTINUE

    @property
    def high(self) -> datetime:
        """The newest change ever applied."""
        return self.mark if self.mark is not None and self.mark > self.newest else self.newest

    def encode(self) -> str:
        step = CONTINUE + ",".join(self.seen) if self.reading_on else self.next_page
        text = f"{CURSOR_PREFIX};{instant_text(self.newest)};{step}"
        if self.mark is not None and self.mark > self.newest:
            text += f";{instant_text(self.mark)}"
        if len(text) > MAX_CURSOR:
            raise BadLisData("change feed: the server's next-page link is too long to keep "
                             f"as a cursor ({len(text)} characters)")
        return text

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """A cursor this adapter made; ``PermanentLisError`` for any other text."""
        prefix, _, rest = text.partition(";")
        moment, _, step = rest.partition(";")
        step, _, high = step.rpartition(";") if step.count(";") else (step, "", "")
        try:
            newest = datetime.fromisoformat(moment) if prefix == CURSOR_PREFIX else None
            mark = datetime.fromisoformat(high) if high else None
        except ValueError:
            newest = mark = None
        if newest is None or newest.utcoffset() is None or (step and step[0] not in "/?+") \
                or (high and (mark is None or mark.utcoffset() is None)):
            raise PermanentLisError(f"change feed: {excerpt(text)[:60]!r} is not a cursor of "
                                    "the FHIR adapter")
        if step.startswith(CONTINUE):
            return cls(newest, CONTINUE, tuple(i for i in step[1:].split(",") if i), mark)
        return cls(newest, step, mark=mark)


def can_remember(ids: list[str]) -> bool:
    """Whether these report ids fit in a cursor's ``seen`` (few, and plain FHIR ids)."""
    return len(ids) <= MAX_SEEN and all(_FHIR_ID.match(i) for i in ids)


def floor_ms(moment: datetime) -> datetime:
    """``moment`` cut to whole milliseconds (a search for "after" it then misses nothing)."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def instant_text(moment: datetime) -> str:
    """An aware time as a FHIR instant with milliseconds and its offset:
    ``2024-05-14T12:00:00.250+03:00`` (``+00:00`` for UTC)."""
    return floor_ms(moment).isoformat(timespec="milliseconds")


def search_after(moment: datetime, overlap: timedelta) -> str:
    """The ``_lastUpdated`` value of a feed read after ``moment``, re-reading ``overlap``."""
    return "gt" + instant_text(moment - overlap)
