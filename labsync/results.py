"""From the LIS's results to the site's ``local_lab_results`` rows: exact text, site time, fit.

Pure functions: no I/O. What had to be changed to fit a column is returned as notes for the
caller to log, naming the order and the test; nothing is cut silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from labsync.model import TestResult
from labsync.store.db import TextFitter

_TEXT_FIELDS = (
    ("TEST_CODE", "code"), ("TEST_NAME", "name"), ("RESULT_VALUE", "value"),
    ("RESULT_UNIT", "unit"), ("REFERENCE_MIN", "ref_min"), ("REFERENCE_MAX", "ref_max"),
)


@dataclass(frozen=True, slots=True)
class FitNote:
    """One value that could not be stored exactly, and what was done to it."""

    test: str
    column: str
    change: str


def to_site_time(moment: datetime | None, zone: ZoneInfo) -> datetime | None:
    """An aware time converted to the site's zone, naive; a naive one is already site time.

    Seconds precision: the site's DATETIME columns hold no fractions.
    """
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(zone).replace(tzinfo=None)
    return moment.replace(microsecond=0)


def to_rows(
    results: Sequence[TestResult], *, zone: ZoneInfo, fitter: TextFitter, pdf_path: str | None
) -> tuple[list[dict[str, Any]], list[FitNote]]:
    """Rows for ``local_lab_results`` (without ORDER_ID), and the notes on what was fitted."""
    rows: list[dict[str, Any]] = []
    notes: list[FitNote] = []
    for result in results:
        row: dict[str, Any] = {}
        label = result.code or result.name or "?"
        for column, attr in _TEXT_FIELDS:
            value, changes = fitter.fit("local_lab_results", column, getattr(result, attr))
            row[column] = value
            notes.extend(FitNote(test=label, column=column, change=c) for c in changes)
        row["IS_ABNORMAL"] = "Y" if result.abnormal is True else "N"
        row["RESULT_DATE"] = to_site_time(result.result_date, zone)
        row["PDF_PATH"] = pdf_path
        rows.append(row)
    return rows, notes


def results_hash(rows: Sequence[dict[str, Any]]) -> str:
    """A fingerprint of the results' content (not their PDF path), to notice a correction."""
    canonical = [
        [row[c] if not isinstance(row[c], datetime) else row[c].isoformat()
         for c in ("TEST_CODE", "TEST_NAME", "RESULT_VALUE", "RESULT_UNIT", "REFERENCE_MIN",
                   "REFERENCE_MAX", "IS_ABNORMAL", "RESULT_DATE")]
        for row in rows
    ]
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()
