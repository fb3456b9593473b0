"""A DiagnosticReport and its Observations as a ``LisOrder``: the FHIR R4 mapping of issue 13.

A narrow reader over plain JSON, as ``lis/qlab.py`` is: only the elements labsync uses are
read, each checked, and a report that breaks the rules is refused whole (``BadLisData``,
naming the element) rather than half-used.

- ``DiagnosticReport.status``: registered → received; partial, preliminary → processing;
  final, amended, corrected, appended → completed; cancelled, entered-in-error → cancelled.
- ``result`` Observations, in order, with ``hasMember`` panels flattened in place (a
  panel without a value of its own is no row) and ``contained`` ones found by ``#id``; an
  Observation with ``component``s and no value gives one row per component; a cancelled or
  entered-in-error Observation is no row.
- The PDF: the first ``presentedForm`` of type ``application/pdf``: its ``data`` inline, or
  its ``url`` as a handle the client resolves (and refuses off its base).
- ``changed_at`` is ``meta.lastUpdated`` (aware), ``version`` is ``meta.versionId``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from labsync.errors import BadLisData
from labsync.lis.fhir.bundle import Resources, is_relative
from labsync.lis.fhir.elements import (
    array,
    chosen_coding,
    codings,
    date_time,
    instant,
    obj,
    optional_obj,
    string,
)
from labsync.lis.fhir.values import has_value, observation_value, reference_range
from labsync.lis.http import excerpt
from labsync.model import LisOrder, OrderStatus, PdfRef, TestResult

REPORT_STATUSES = {
    "registered": OrderStatus.RECEIVED,
    "partial": OrderStatus.PROCESSING,
    "preliminary": OrderStatus.PROCESSING,
    "final": OrderStatus.COMPLETED,
    "amended": OrderStatus.COMPLETED,
    "corrected": OrderStatus.COMPLETED,
    "appended": OrderStatus.COMPLETED,
    "cancelled": OrderStatus.CANCELLED,
    "entered-in-error": OrderStatus.CANCELLED,
}
NOT_RESULTS = frozenset({"cancelled", "entered-in-error"})  # Observation statuses
ABNORMAL = frozenset({"H", "HH", "HU", "L", "LL", "LU", "A", "AA", "POS", "DET"})
MAX_DEPTH = 8  # hasMember nesting: panels of panels, never deeper in practice
_BLANKS = re.compile(rb"\s+")


@dataclass(frozen=True)
class Rules:
    """How this site's LIS is read: which coding is TEST_CODE, which identifier is the order."""

    code_systems: tuple[str, ...] = ("http://loinc.org",)
    order_system: str | None = None


def order_ids(report: dict[str, Any], where: str, rules: Rules) -> list[str]:
    """The order ids a report carries: its identifiers' values (of ``order_system`` only,
    when one is configured), each once, in order."""
    found: list[str] = []
    for i, item in enumerate(array(report.get("identifier"), f"{where}.identifier")):
        ident = obj(item, f"{where}.identifier[{i}]")
        value = string(ident.get("value"), f"{where}.identifier[{i}].value")
        system = string(ident.get("system"), f"{where}.identifier[{i}].system")
        if value and (rules.order_system is None or system == rules.order_system) \
                and value not in found:
            found.append(value)
    return found


def last_updated(report: dict[str, Any], where: str) -> datetime | None:
    """The report's ``meta.lastUpdated``: when the server last changed it (aware)."""
    meta = optional_obj(report.get("meta"), f"{where}.meta") or {}
    return instant(meta.get("lastUpdated"), f"{where}.meta.lastUpdated")


def version_id(report: dict[str, Any], where: str) -> str | None:
    """The report's ``meta.versionId``: same or not, never older or newer."""
    meta = optional_obj(report.get("meta"), f"{where}.meta") or {}
    return string(meta.get("versionId"), f"{where}.meta.versionId") or None


def missing_observations(report: dict[str, Any], resources: Resources, where: str) -> list[str]:
    """References to Observations that neither the Bundle nor the report's ``contained``
    holds, and that the LIS can be asked for (relative ones, or absolute ones under its base:
    the client decides); each once."""
    missing: list[str] = []
    for _found in _walk(report, resources, where, missing.append):
        pass
    return list(dict.fromkeys(missing))


def read_report(external_id: str, report: dict[str, Any], resources: Resources, where: str,
                rules: Rules) -> LisOrder:
    """The order ``external_id`` as this report has it (``BadLisData`` if it breaks a rule)."""
    if report.get("resourceType") != "DiagnosticReport":
        raise BadLisData(f"{where}: not a DiagnosticReport")
    raw_status = string(report.get("status"), f"{where}.status")
    status = REPORT_STATUSES.get(raw_status or "")
    if status is None:
        raise BadLisData(f"{where}.status: {excerpt(repr(raw_status))} is not a status "
                         f"labsync maps ({', '.join(REPORT_STATUSES)})")
    report_date = _effective(report, where)

    def unresolved(reference: str) -> None:
        raise BadLisData(f"{where}: Observation {excerpt(reference)} is not in the answer "
                         "and could not be read")

    results: list[TestResult] = []
    for observation, place in _walk(report, resources, where, unresolved):
        results.extend(_rows(observation, place, rules, report_date))
    return LisOrder(
        external_id=external_id,
        status=status,
        results=tuple(results),
        changed_at=last_updated(report, where),
        version=version_id(report, where),
        pdf=pdf_form(report, where),
    )


def pdf_form(report: dict[str, Any], where: str) -> PdfRef | None:
    """The report's PDF: the first ``presentedForm`` whose content type is PDF.

    Inline ``data`` that is not base64 is handed on as it came, so that ``labsync.pdfs``
    refuses it as not a PDF (a refused form counts as none: ``pdf.required`` decides).
    """
    for i, item in enumerate(array(report.get("presentedForm"), f"{where}.presentedForm")):
        place = f"{where}.presentedForm[{i}]"
        form = obj(item, place)
        content_type = string(form.get("contentType"), f"{place}.contentType") or ""
        if content_type.split(";", 1)[0].strip().lower() != "application/pdf":
            continue
        data = string(form.get("data"), f"{place}.data")
        if data:
            raw = _BLANKS.sub(b"", data.encode("ascii", errors="replace"))
            try:
                return PdfRef.inline(base64.b64decode(raw, validate=True))
            except (binascii.Error, ValueError):
                return PdfRef.inline(raw)
        url = string(form.get("url"), f"{place}.url")
        if url:
            return PdfRef.at(url)
    return None


# -- the Observations of a report ---------------------------------------------------------


def _walk(report: dict[str, Any], resources: Resources, where: str,
          missing: Callable[[str], None]) -> Iterator[tuple[dict[str, Any], str]]:
    """Every Observation of the report, depth first in ``result`` order, each once, with
    where it sits (for messages). A reference the LIS could be asked for that the Bundle
    lacks goes to ``missing`` (which may raise) and is passed over."""
    contained = {}
    for i, item in enumerate(array(report.get("contained"), f"{where}.contained")):
        resource = obj(item, f"{where}.contained[{i}]")
        if isinstance(resource.get("id"), str):
            contained[f"#{resource['id']}"] = resource
    seen: set[int] = set()

    def visit(refs: list[Any], place: str, depth: int
              ) -> Iterator[tuple[dict[str, Any], str]]:
        for i, item in enumerate(refs):
            ref_place = f"{place}[{i}]"
            reference = string(obj(item, ref_place).get("reference"), f"{ref_place}.reference")
            if not reference:
                raise BadLisData(f"{ref_place}: has no reference")
            found = contained.get(reference) if reference.startswith("#") \
                else resources.find(reference)
            if found is None:
                askable = is_relative(reference) or "://" in reference  # not "#x", "urn:…"
                if not askable:
                    raise BadLisData(f"{ref_place}: {excerpt(reference)} is not in the report")
                missing(reference)
                continue
            if id(found) in seen:
                continue
            seen.add(id(found))
            obs_place = f"Observation {excerpt(reference)}"
            if found.get("resourceType") != "Observation":
                raise BadLisData(f"{ref_place}: {excerpt(reference)} is not an Observation")
            yield found, obs_place
            members = array(found.get("hasMember"), f"{obs_place}.hasMember")
            if members:
                if depth >= MAX_DEPTH:
                    raise BadLisData(f"{obs_place}.hasMember: nested deeper than {MAX_DEPTH}")
                yield from visit(members, f"{obs_place}.hasMember", depth + 1)

    yield from visit(array(report.get("result"), f"{where}.result"), f"{where}.result", 0)


def _rows(observation: dict[str, Any], where: str, rules: Rules,
          report_date: datetime | None) -> list[TestResult]:
    """The result rows of one Observation: none for a cancelled one or a panel without a
    value of its own, one per component for a value given in components, else one."""
    status = string(observation.get("status"), f"{where}.status")
    if status in NOT_RESULTS:
        return []
    when = _effective(observation, where) or report_date
    value = has_value(observation)
    components = array(observation.get("component"), f"{where}.component")
    if not value and components:
        return [_result(obj(c, f"{where}.component[{i}]"), f"{where}.component[{i}]",
                        rules, when) for i, c in enumerate(components)]
    if not value and array(observation.get("hasMember"), f"{where}.hasMember"):
        return []  # a panel: its members are the rows
    return [_result(observation, where, rules, when)]


def _result(item: dict[str, Any], where: str, rules: Rules, when: datetime | None
            ) -> TestResult:
    """One row from an Observation or one of its components (they share these elements)."""
    concept = optional_obj(item.get("code"), f"{where}.code")
    coding = chosen_coding(concept, f"{where}.code", rules.code_systems)
    code = string(coding.get("code"), f"{where}.code.coding.code") if coding else None
    name = _name(concept, coding, f"{where}.code")
    if not code and not name:
        raise BadLisData(f"{where}: has neither a code nor a name")
    test = f"{where} ({excerpt(code or name or '')})"
    value = observation_value(item, test)
    ref_min, ref_max = reference_range(item, test)
    return TestResult(
        code=code or None,
        name=name,
        value=value[0] if value else None,
        unit=value[1] if value else None,
        ref_min=ref_min,
        ref_max=ref_max,
        abnormal=_abnormal(item, test),
        result_date=when,
    )


def _name(concept: dict[str, Any] | None, coding: dict[str, Any] | None, where: str
          ) -> str | None:
    """``code.text``, else the chosen coding's display, else the first display there is."""
    if concept is None:
        return None
    text = string(concept.get("text"), f"{where}.text")
    if text:
        return text
    if coding is not None:
        display = string(coding.get("display"), f"{where}.coding.display")
        if display:
            return display
    for i, candidate in enumerate(codings(concept, where)):
        display = string(candidate.get("display"), f"{where}.coding[{i}].display")
        if display:
            return display
    return None


def _abnormal(item: dict[str, Any], where: str) -> bool:
    """Any ``interpretation`` coding among H, HH, HU, L, LL, LU, A, AA, POS, DET."""
    raw = item.get("interpretation")
    concepts: Sequence[Any] = [raw] if isinstance(raw, dict) else array(  # STU3: one concept
        raw, f"{where}.interpretation")
    for i, concept in enumerate(concepts):
        place = f"{where}.interpretation[{i}]"
        for j, coding in enumerate(codings(obj(concept, place), place)):
            if string(coding.get("code"), f"{place}.coding[{j}].code") in ABNORMAL:
                return True
    return False


def _effective(resource: dict[str, Any], where: str) -> datetime | None:
    """``effectiveDateTime``, else ``effectivePeriod.start``, else ``effectiveInstant``,
    else ``issued``."""
    moment = date_time(resource.get("effectiveDateTime"), f"{where}.effectiveDateTime")
    if moment is None:
        period = optional_obj(resource.get("effectivePeriod"), f"{where}.effectivePeriod")
        if period is not None:
            moment = date_time(period.get("start"), f"{where}.effectivePeriod.start")
    if moment is None:
        moment = date_time(resource.get("effectiveInstant"), f"{where}.effectiveInstant")
    if moment is None:
        moment = date_time(resource.get("issued"), f"{where}.issued")
    return moment
