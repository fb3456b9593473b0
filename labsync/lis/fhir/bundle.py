"""A FHIR search answer: the Bundle's entries, what they refer to, and where its next page is.

``Resources`` finds a resource by the reference another one uses (``Observation/17``, an
absolute URL, ``Observation/17/_history/2``); ``searchset`` splits a Bundle into the
DiagnosticReports that matched and the resources included with them. Only the shape of the
Bundle is checked here; what a report says is ``reader.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from labsync.errors import BadLisData
from labsync.lis.fhir.elements import array, obj, optional_obj, string
from labsync.lis.http import excerpt


def reference_key(reference: str) -> str | None:
    """``Type/id`` of a literal reference (relative, absolute, or to a version); None for
    one that names no resource that way (``#contained``, a URN)."""
    path = reference.split("?", 1)[0].split("#", 1)[0]
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2][:1].isupper():
        return None
    return f"{parts[-2]}/{parts[-1]}"


def is_relative(reference: str) -> bool:
    """``Observation/17`` (to be read at the LIS's base), not ``https://…`` nor ``urn:…``."""
    return ":" not in reference.split("/", 1)[0] and not reference.startswith(("/", "#"))


@dataclass
class Resources:
    """Resources found by how others refer to them: ``fullUrl`` or ``Type/id``."""

    _by_url: dict[str, dict[str, Any]] = field(default_factory=dict)
    _by_key: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, resource: dict[str, Any], full_url: str | None = None) -> None:
        kind, rid = resource.get("resourceType"), resource.get("id")
        if isinstance(kind, str) and isinstance(rid, str) and rid:
            self._by_key[f"{kind}/{rid}"] = resource
        if full_url:
            self._by_url[full_url] = resource

    def find(self, reference: str) -> dict[str, Any] | None:
        """The resource ``reference`` points to, if this Bundle carries it."""
        found = self._by_url.get(reference)
        if found is not None:
            return found
        key = reference_key(reference)
        if key is None:
            return None
        # An absolute reference counts only as the same resource a relative one would name
        # when its own full URL is not in the Bundle (servers write either form).
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)


@dataclass
class SearchPage:
    """One Bundle of a search: the matching reports, what came with them, the next page."""

    matches: list[tuple[dict[str, Any], str]]  # (DiagnosticReport, where it sits)
    resources: Resources
    next_link: str | None


def searchset(data: Any, what: str) -> SearchPage:
    """A search answer (or a ``collection`` Bundle, as the FHIR examples are) as a page.

    Matches are the DiagnosticReport entries that are not marked ``include``; every
    resource goes into ``resources`` (a match may refer to another match's Observations).
    """
    bundle = obj(data, what)
    if bundle.get("resourceType") != "Bundle":
        raise BadLisData(f"{what}: expected a FHIR Bundle, got resourceType "
                         f"{excerpt(repr(bundle.get('resourceType')))}")
    resources = Resources()
    matches: list[tuple[dict[str, Any], str]] = []
    for i, item in enumerate(array(bundle.get("entry"), f"{what}: entry")):
        where = f"{what}: entry[{i}]"
        entry = obj(item, where)
        resource = optional_obj(entry.get("resource"), f"{where}.resource")
        if resource is None:
            continue
        resources.add(resource, string(entry.get("fullUrl"), f"{where}.fullUrl"))
        search = optional_obj(entry.get("search"), f"{where}.search") or {}
        mode = string(search.get("mode"), f"{where}.search.mode")
        if resource.get("resourceType") == "DiagnosticReport" and mode in (None, "match"):
            matches.append((resource, where))
    return SearchPage(matches, resources, _next_link(bundle, what))


def _next_link(bundle: dict[str, Any], what: str) -> str | None:
    for i, item in enumerate(array(bundle.get("link"), f"{what}: link")):
        link = obj(item, f"{what}: link[{i}]")
        if string(link.get("relation"), f"{what}: link[{i}].relation") == "next":
            url = string(link.get("url"), f"{what}: link[{i}].url")
            if not url:
                raise BadLisData(f"{what}: link[{i}] (next) has no url")
            return url
    return None
