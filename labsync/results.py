"""From the LIS's results to the site's ``local_lab_results`` rows: exact text, site time, fit.

Pure functions: no I/O. What had to be changed to fit a column is returned as notes for the
caller to log, naming the order and the test; nothing is cut silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from labsync.model import TestResult
from labsync.store.db import TextFitter
from labsync.store.orders import RESULT_COLUMNS, result_key

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


@dataclass(frozen=True, slots=True)
class RowChanges:
    """What the order's ``local_lab_results`` rows need: new rows, changes by ID, IDs to go."""

    insert: tuple[dict[str, Any], ...] = ()
    update: tuple[tuple[int, dict[str, Any]], ...] = ()
    delete: tuple[int, ...] = ()

    @property
    def any(self) -> bool:
        return bool(self.insert or self.update or self.delete)


def diff_rows(stored: Sequence[Mapping[str, Any]], wanted: Sequence[Mapping[str, Any]]
              ) -> RowChanges:
    """What makes ``stored`` (rows with IDs) equal ``wanted``: new tests inserted, changed
    ones updated in place, tests the LIS no longer lists (and twins an older agent left)
    deleted. Rows are matched by code, or by name without one; a repeated test by its
    position."""
    existing = _keyed(stored)
    target = _keyed(wanted)
    insert = tuple(dict(row) for key, row in target.items() if key not in existing)
    delete = tuple(int(row["ID"]) for key, row in existing.items() if key not in target)
    update = []
    for key, row in target.items():
        old = existing.get(key)
        if old is not None:
            changed = {c: row[c] for c in RESULT_COLUMNS if old[c] != row[c]}
            if changed:
                update.append((int(old["ID"]), changed))
    return RowChanges(insert, tuple(update), delete)


def _keyed(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Rows by key; a key seen again gets ``#2``, ``#3``… so repeated tests stay distinct."""
    seen: dict[str, int] = {}
    keyed: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        base = result_key(row["TEST_CODE"], row["TEST_NAME"])
        seen[base] = seen.get(base, 0) + 1
        keyed[base if seen[base] == 1 else f"{base}#{seen[base]}"] = row
    return keyed
