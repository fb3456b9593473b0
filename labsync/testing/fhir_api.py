"""What the fake FHIR server answers: its resources, and the few FHIR R4 interactions
labsync uses over them.

- ``GET /DiagnosticReport?identifier=…`` (``search``) and ``?_lastUpdated=…&_sort=
  _lastUpdated&_count=…`` (``feed``), with ``_include=DiagnosticReport:result`` and
  ``_include:iterate=Observation:has-member``; a search larger than its ``_count`` is kept,
  and paged like HAPI FHIR does (``?_getpages=<id>&_getpagesoffset=<n>``, ``page``);
- ``GET /Observation/{id}`` (``observation``), ``GET /Binary/{id}`` (``binary``: the raw
  bytes to ``Accept: application/pdf``, else a JSON ``Binary``; ``binary_as_json`` always
  JSON), ``GET /metadata``.

JSON numbers are kept as their literal text (``Num``) both ways, so a test can serve ``5.40``
byte for byte, which a real server (Medplum's in-memory one) normalises to ``5.4``.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from labsync.testing._faultserver import Response

FHIR_JSON = "application/fhir+json; charset=utf-8"
LOINC = "http://loinc.org"


class Num(str):
    """A JSON number as its literal text: ``Num("5.40")`` is written ``5.40``."""

    __slots__ = ()


def loads(text: str | bytes) -> Any:
    """JSON with every number as a ``Num``."""
    return json.loads(text, parse_float=Num, parse_int=Num)


def dumps(value: Any) -> str:
    """JSON with ``Num`` written as the literal it holds."""
    if isinstance(value, Num):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def fhir_response(status: int, payload: Any) -> Response:
    return Response(status, dumps(payload).encode(), FHIR_JSON)


def outcome(status: int, text: str) -> Response:
    """An ``OperationOutcome``, as FHIR servers answer errors."""
    return fhir_response(status, {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": text}]})


def instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def unescape(value: str) -> str:
    """A search value with FHIR's ``\\|``, ``\\,``, ``\\$`` and ``\\\\`` escapes undone."""
    out, chars = [], iter(value)
    for char in chars:
        out.append(next(chars, "") if char == "\\" else char)
    return "".join(out)


class FhirApi:
    """The resources of a fake FHIR server and its answers. Thread-safe.

    ``time`` is the ``meta.lastUpdated`` the next write gets (then 1 ms later), unless the
    write names its own. ``include = False`` leaves ``_include`` unanswered (the client then
    reads each Observation); ``next_base`` replaces the base of ``next`` links (a link to
    another host); ``binary_as_json`` answers every Binary read as JSON. ``paging =
    "offset"`` pages as Medplum does instead: each ``next`` link runs the search again, live,
    from an ``_offset`` (a report changed meanwhile moves, and shifts the offsets).
    """

    def __init__(self, base_path: str = "/fhir") -> None:
        self.base_path = base_path.rstrip("/")
        self.base_url = ""  # set by the server once it is bound
        self.time = datetime(2026, 12, 1, tzinfo=UTC)
        self.include = True
        self.next_base: str | None = None
        self.binary_as_json = False
        self.paging = "stored"  # or "offset"
        self._lock = threading.RLock()
        self._resources: dict[str, dict[str, Any]] = {}  # "Type/id" → resource
        self._versions: dict[str, int] = {}
        self._binaries: dict[str, tuple[bytes, str]] = {}
        self._pages: dict[str, tuple[list[dict[str, Any]], int]] = {}
        self._page_ids = itertools.count(1)

    # -- resources --------------------------------------------------------------------------

    def put(self, resource: dict[str, Any], *, last_updated: datetime | None = None,
            version: str | None = None) -> dict[str, Any]:
        """Store (or replace) ``resource``, a copy, with a new ``meta``; returns the copy."""
        stored = copy.deepcopy(resource)
        key = f"{stored['resourceType']}/{stored['id']}"
        with self._lock:
            if last_updated is None:
                last_updated, self.time = self.time, self.time + timedelta(milliseconds=1)
            self._versions[key] = self._versions.get(key, 0) + 1
            stored["meta"] = {"versionId": version or str(self._versions[key]),
                              "lastUpdated": instant(last_updated)}
            self._resources[key] = stored
        return copy.deepcopy(stored)

    def put_json(self, text: str | bytes, **meta: Any) -> dict[str, Any]:
        """``put`` of a resource given as JSON text, its numbers kept literally."""
        return self.put(loads(text), **meta)

    def get(self, kind: str, rid: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._resources.get(f"{kind}/{rid}")
            return copy.deepcopy(found) if found is not None else None

    def delete(self, kind: str, rid: str) -> None:
        with self._lock:
            self._resources.pop(f"{kind}/{rid}", None)

    def put_binary(self, rid: str, data: bytes | None, content_type: str = "application/pdf"
                   ) -> None:
        """The bytes ``GET /Binary/{rid}`` serves; None: none (404)."""
        with self._lock:
            if data is None:
                self._binaries.pop(rid, None)
            else:
                self._binaries[rid] = (bytes(data), content_type)

    # -- answers ----------------------------------------------------------------------------

    def route(self, target: str) -> tuple[str, str | None, dict[str, list[str]], str]:
        """(endpoint, the key faults and counters use, the query, the path under the base)."""
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True)
        path = unquote(parts.path)
        if not (path == self.base_path or path.startswith(self.base_path + "/")):
            return "unknown", None, query, path
        rest = path[len(self.base_path):].strip("/")
        segments = rest.split("/") if rest else []
        if not segments and "_getpages" in query:
            return "page", query["_getpages"][0], query, rest
        if segments == ["DiagnosticReport"]:
            if "_offset" in query:
                return "page", None, query, rest
            if "identifier" in query:
                return "search", unescape(query["identifier"][0].split("|")[-1]), query, rest
            return "feed", None, query, rest
        if len(segments) == 2 and segments[0] in ("Observation", "Binary"):
            return segments[0].lower(), segments[1], query, rest
        if segments == ["metadata"]:
            return "metadata", None, query, rest
        return "unknown", None, query, rest

    def answer(self, endpoint: str, key: str | None, query: dict[str, list[str]],
               accept: str) -> Response:
        if endpoint in ("search", "feed") or (endpoint == "page" and "_offset" in query):
            return self._search(query)
        if endpoint == "page":
            return self._page(key or "", int(query.get("_getpagesoffset", ["0"])[0]),
                              int(query.get("_count", ["20"])[0]))
        if endpoint == "observation":
            found = self.get("Observation", key or "")
            return fhir_response(200, found) if found else outcome(404, "no such Observation")
        if endpoint == "binary":
            return self._binary(key or "", accept)
        if endpoint == "metadata":
            return fhir_response(200, {"resourceType": "CapabilityStatement", "status": "active",
                                       "fhirVersion": "4.0.1", "kind": "instance"})
        return outcome(404, "unknown resource type or operation")

    def _binary(self, rid: str, accept: str) -> Response:
        with self._lock:
            found = self._binaries.get(rid)
        if found is None:
            return outcome(404, "no such Binary")
        data, content_type = found
        if "application/pdf" in accept and not self.binary_as_json:
            return Response(200, data, content_type)
        return fhir_response(200, {"resourceType": "Binary", "id": rid,
                                   "contentType": content_type,
                                   "data": base64.b64encode(data).decode("ascii")})

    def _search(self, query: dict[str, list[str]]) -> Response:
        with self._lock:
            reports = [copy.deepcopy(r) for k, r in self._resources.items()
                       if k.startswith("DiagnosticReport/") and _matches(r, query)]
        if query.get("_sort", [""])[0] in ("_lastUpdated", "-_lastUpdated"):
            reports.sort(key=lambda r: datetime.fromisoformat(r["meta"]["lastUpdated"]),
                         reverse=query["_sort"][0].startswith("-"))
        entries = [{"fullUrl": self._full_url(r), "resource": r, "search": {"mode": "match"}}
                   for r in reports]
        count = int(query["_count"][0]) if "_count" in query else len(entries) or 1
        includes = self.include and "DiagnosticReport:result" in query.get("_include", [])
        members = self.include and "Observation:has-member" in query.get("_include:iterate", [])
        flags = (1 if includes else 0) | (2 if members else 0)
        if self.paging == "offset":
            return self._offset_page(entries, flags, query, count)
        with self._lock:
            page_id = str(next(self._page_ids))
            self._pages[page_id] = (entries, flags)
        return self._page(page_id, 0, count)

    def _page(self, page_id: str, offset: int, count: int) -> Response:
        with self._lock:
            stored = self._pages.get(page_id)
        if stored is None:
            return outcome(410, "the search has expired")
        entries, flags = stored
        chosen = entries[offset:offset + count]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                  "total": Num(str(len(entries))),
                                  "link": [{"relation": "self", "url": self.base_url}],
                                  "entry": chosen + self._included(chosen, flags)}
        if offset + count < len(entries):
            base = self.next_base or self.base_url
            bundle["link"].append({"relation": "next", "url": f"{base}?_getpages={page_id}"
                                   f"&_getpagesoffset={offset + count}&_count={count}"})
        return fhir_response(200, bundle)

    def _offset_page(self, entries: list[dict[str, Any]], flags: int,
                     query: dict[str, list[str]], count: int) -> Response:
        offset = int(query.get("_offset", ["0"])[0])
        chosen = entries[offset:offset + count]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                  "entry": chosen + self._included(chosen, flags)}
        if offset + count < len(entries):
            rest = {k: v for k, v in query.items() if k != "_offset"}
            link = (f"{self.next_base or self.base_url}/DiagnosticReport?"
                    f"{urlencode(rest, doseq=True)}&_offset={offset + count}")
            bundle["link"] = [{"relation": "next", "url": link}]
        return fhir_response(200, bundle)

    def _included(self, matches: list[dict[str, Any]], flags: int) -> list[dict[str, Any]]:
        if not flags & 1:
            return []
        seen: dict[str, dict[str, Any]] = {}
        todo = [ref["reference"] for e in matches for ref in e["resource"].get("result", [])]
        while todo:
            reference = todo.pop(0)
            if reference in seen or reference.startswith("#"):
                continue
            kind, _, rid = reference.rpartition("/")
            found = self.get(kind.rsplit("/", 1)[-1], rid)
            if found is None:
                continue
            seen[reference] = found
            if flags & 2:
                todo += [m["reference"] for m in found.get("hasMember", [])]
        return [{"fullUrl": self._full_url(r), "resource": r, "search": {"mode": "include"}}
                for r in seen.values()]

    def _full_url(self, resource: dict[str, Any]) -> str:
        return f"{self.base_url}/{resource['resourceType']}/{resource['id']}"

    def forget_searches(self) -> None:
        """Drop every stored search: their next links now answer 410, as expired ones do."""
        with self._lock:
            self._pages.clear()


def _matches(report: dict[str, Any], query: dict[str, list[str]]) -> bool:
    for wanted in query.get("identifier", []):
        system, bar, value = wanted.rpartition("|") if "|" in wanted else ("", "", wanted)
        value = unescape(value)
        if not any(i.get("value") == value and (not bar or not system
                                                or i.get("system") == system)
                   for i in report.get("identifier", [])):
            return False
    updated = datetime.fromisoformat(report["meta"]["lastUpdated"])
    for condition in query.get("_lastUpdated", []):
        prefix, moment = condition[:2], datetime.fromisoformat(condition[2:])
        if not {"gt": updated > moment, "ge": updated >= moment, "lt": updated < moment,
                "le": updated <= moment}.get(prefix, False):
            return False
    return True


def report(rid: str, order_id: str, *, status: str = "final", system: str | None = None,
           results: Iterable[str] = (), **more: Any) -> dict[str, Any]:
    """A DiagnosticReport for ``order_id`` whose ``result`` names ``Observation/<id>``s."""
    identifier: dict[str, Any] = {"value": order_id}
    if system:
        identifier["system"] = system
    return {"resourceType": "DiagnosticReport", "id": rid, "identifier": [identifier],
            "status": status, "code": {"coding": [{"system": LOINC, "code": "11502-2"}]},
            "result": [{"reference": f"Observation/{o}"} for o in results], **more}


def observation(rid: str, code: str, value: Any, *, unit: str | None = None,
                name: str | None = None, **more: Any) -> dict[str, Any]:
    """An Observation: a ``Num`` value becomes a ``valueQuantity``, text a ``valueString``."""
    item: dict[str, Any] = {"resourceType": "Observation", "id": rid, "status": "final",
                            "code": {"coding": [{"system": LOINC, "code": code}]}}
    if name:
        item["code"]["text"] = name
    if isinstance(value, Num):
        item["valueQuantity"] = {"value": value, **({"unit": unit} if unit else {})}
    elif value is not None:
        item["valueString"] = value
    return {**item, **more}
