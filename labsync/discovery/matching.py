"""Whose order is it? The policy for orders found by phone, as one pure function.

A phone is not an identity: a family shares one, a parent books a child's tests with their
own. Attaching an order to the wrong account shows one patient another's results, so
``decide`` attaches only when exactly one site user with the patient's phone also matches
on a second factor, and sends every other case to a person (docs/discovery.md).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from labsync.config.discovery import MATCH_MODES
from labsync.model import Patient

BIRTH_DATE, LAST_NAME = "birth date", "last name"
_MODE_FACTORS = {
    "birth_date": (BIRTH_DATE,),
    "last_name": (LAST_NAME,),
    "both": (BIRTH_DATE, LAST_NAME),
}
# Runs of white space and of dash-like characters: "Петрова-Водкина" = "Петрова Водкина".
_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015\u2212]+")


@dataclass(frozen=True, slots=True)
class Candidate:
    """An active site user who has the patient's phone, with what the second factor needs."""

    user_id: int
    last_name: str | None = None
    birth_date: date | None = None


@dataclass(frozen=True, slots=True)
class Attach:
    """The order is this user's: insert it into ``local_lab_orders`` with this ``USER_ID``."""

    user_id: int


@dataclass(frozen=True, slots=True)
class Review:
    """Attach nothing; a person decides. ``reason``: ambiguous | mismatch | no_second_factor.

    ``candidates``: every active user with the patient's phone; ``detail`` says, per user,
    which factor matched, in words (no names or dates: they are in the site and the LIS).
    """

    reason: str
    candidates: tuple[int, ...]
    detail: str


def normalise_name(text: str | None) -> str:
    """A last name for comparison: NFKC, case-folded, ё→е, separators collapsed, trimmed."""
    if not text:
        return ""
    folded = unicodedata.normalize("NFKC", text).casefold().replace("ё", "е")
    return _SEPARATORS.sub(" ", folded).strip()


def required_factors(patient: Patient, mode: str) -> tuple[tuple[str, ...], str | None]:
    """The factors a candidate must match, and why that cannot be checked (None: it can).

    ``auto``: both where the LIS gives both, else the one it gives. A fixed mode requires
    its factors; an LIS order without one of them cannot be attached.
    """
    given = {BIRTH_DATE: patient.birth_date is not None,
             LAST_NAME: bool(normalise_name(patient.last_name))}
    if mode == "auto":
        wanted = tuple(factor for factor, present in given.items() if present)
        return wanted, None if wanted else "the LIS gives neither a birth date nor a last name"
    if mode not in _MODE_FACTORS:
        raise ValueError(f"unknown match mode {mode!r}; one of {', '.join(MATCH_MODES)}")
    wanted = _MODE_FACTORS[mode]
    missing = [factor for factor in wanted if not given[factor]]
    if missing:
        return wanted, f"discovery.match is {mode} and the LIS gives no {' and no '.join(missing)}"
    return wanted, None


def decide(patient: Patient, candidates: Sequence[Candidate],
           mode: str = "auto") -> Attach | Review | None:
    """Attach, Review, or None when no site user has the phone (the order is someone else's)."""
    by_user = {c.user_id: c for c in candidates}  # a user found through two phones counts once
    if not by_user:
        return None
    ids = tuple(sorted(by_user))
    wanted, unusable = required_factors(patient, mode)
    if unusable is not None:
        return Review("no_second_factor", ids, unusable)
    verdicts = {uid: _compare(patient, by_user[uid], wanted) for uid in ids}
    passing = [uid for uid, verdict in verdicts.items()
               if all(outcome == "matches" for outcome in verdict.values())]
    if len(passing) == 1:
        return Attach(passing[0])
    detail = "; ".join(
        f"user {uid}: " + ", ".join(f"{factor} {outcome}" for factor, outcome in verdict.items())
        for uid, verdict in verdicts.items()
    )
    if not passing:
        return Review("mismatch", ids, detail)
    return Review("ambiguous", ids,
                  f"users {', '.join(map(str, passing))} all match ({detail})")


def _compare(patient: Patient, user: Candidate, wanted: tuple[str, ...]) -> dict[str, str]:
    """Per factor: ``matches``, ``differs``, or ``missing on the site`` (never a match)."""
    verdict: dict[str, str] = {}
    for factor in wanted:
        theirs: object
        ours: object
        if factor == BIRTH_DATE:
            theirs, ours = patient.birth_date, user.birth_date
        else:
            theirs, ours = normalise_name(patient.last_name), normalise_name(user.last_name)
        if not ours:
            verdict[factor] = "missing on the site"
        else:
            verdict[factor] = "matches" if ours == theirs else "differs"
    return verdict
