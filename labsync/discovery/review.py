"""The review list: orders found by phone that labsync would not attach to one user by itself.

``labsync_review`` holds one row per LIS order (``EXTERNAL_ORDER_ID`` is unique). The job
upserts it each time it sees the order again; a case is *open* until ``RESOLVED_AT`` is set,
which happens when the order reaches ``local_lab_orders`` (attached by discovery once the
site's data allows it, or by hand) or when an admin dismisses it. ``labsync review`` prints
the open cases; ``--json`` gives the same as a JSON array.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, exists, insert, select, update

from labsync.discovery.matching import Review
from labsync.store.db import TextFitter
from labsync.store.tables import labsync_review, local_lab_orders

REASON_TEXT = {
    "ambiguous": "several site users with this phone match the patient",
    "mismatch": "no site user with this phone matches the patient's second factor",
    "no_second_factor": "the LIS gives nothing to check besides the phone",
}
_CANDIDATES_LENGTH = 255


def record_review(conn: Connection, fitter: TextFitter, *, external_id: str, phone: str,
                  review: Review, now: datetime) -> bool:
    """Insert or refresh the order's case; True when it is new or changed (log it once).

    A dismissed case stays dismissed: the admin has looked at it. Raises ``IntegrityError``
    if another process inserted the same case meanwhile; the caller runs it again.
    """
    r = labsync_review
    candidates = _join_ids(review.candidates)
    detail = fitter.fit("labsync_review", "DETAIL", review.detail)[0]
    row = conn.execute(select(r.c.REASON, r.c.CANDIDATES, r.c.RESOLVED_AT)
                       .where(r.c.EXTERNAL_ORDER_ID == external_id)).first()
    if row is None:
        conn.execute(insert(r).values(
            EXTERNAL_ORDER_ID=external_id, PHONE=phone, REASON=review.reason,
            CANDIDATES=candidates, DETAIL=detail, FIRST_SEEN_AT=now, LAST_SEEN_AT=now))
        return True
    values: dict[str, Any] = {"LAST_SEEN_AT": now}
    changed = False
    if row.RESOLVED_AT is None:
        changed = (row.REASON, row.CANDIDATES) != (review.reason, candidates)
        values.update(PHONE=phone, REASON=review.reason, CANDIDATES=candidates, DETAIL=detail)
    conn.execute(update(r).where(r.c.EXTERNAL_ORDER_ID == external_id).values(**values))
    return changed


def resolve(conn: Connection, external_id: str, now: datetime) -> None:
    """Close the order's open case, if it has one (it was just attached)."""
    r = labsync_review
    conn.execute(update(r).where(r.c.EXTERNAL_ORDER_ID == external_id,
                                 r.c.RESOLVED_AT.is_(None)).values(RESOLVED_AT=now))


def resolve_known(conn: Connection, now: datetime) -> int:
    """Close every open case whose order is in ``local_lab_orders`` now; return how many."""
    r, o = labsync_review, local_lab_orders
    known = exists().where(o.c.EXTERNAL_ORDER_ID == r.c.EXTERNAL_ORDER_ID)
    result = conn.execute(update(r).where(r.c.RESOLVED_AT.is_(None), known)
                          .values(RESOLVED_AT=now))
    return int(result.rowcount or 0)


def dismiss_review(engine: Engine, external_id: str, now: datetime | None = None) -> bool:
    """Close an open case by hand (the order is nobody's on this site); False if none is open."""
    moment = (now or datetime.now(UTC).replace(tzinfo=None)).replace(microsecond=0)
    r = labsync_review
    with engine.begin() as conn:
        result = conn.execute(update(r).where(r.c.EXTERNAL_ORDER_ID == external_id,
                                              r.c.RESOLVED_AT.is_(None))
                              .values(RESOLVED_AT=moment))
        return bool(result.rowcount)


def collect_review(engine: Engine, *, include_resolved: bool = False) -> list[dict[str, Any]]:
    """The open cases, oldest first, as plain dicts (times are UTC, ISO 8601 with ``Z``)."""
    r, o = labsync_review, local_lab_orders
    query = select(r).order_by(r.c.FIRST_SEEN_AT, r.c.ID)
    if not include_resolved:
        known = exists().where(o.c.EXTERNAL_ORDER_ID == r.c.EXTERNAL_ORDER_ID)
        query = query.where(r.c.RESOLVED_AT.is_(None), ~known)
    with engine.connect() as conn:
        rows = list(conn.execute(query))
    return [
        {
            "order": row.EXTERNAL_ORDER_ID,
            "reason": row.REASON,
            "phone": row.PHONE,
            "candidates": _split_ids(row.CANDIDATES),
            "detail": row.DETAIL or "",
            "first_seen": _iso(row.FIRST_SEEN_AT),
            "last_seen": _iso(row.LAST_SEEN_AT),
            "resolved": _iso(row.RESOLVED_AT),
        }
        for row in rows
    ]


def render_review(rows: list[dict[str, Any]]) -> str:
    """The cases for a terminal: one block per order, what to do at the end."""
    if not rows:
        return "No orders found by phone are waiting for review."
    count = len(rows)
    lines = [f"{count} order{'s' if count != 1 else ''} found in the LIS by phone "
             f"{'were' if count != 1 else 'was'} not attached to any site user:", ""]
    for row in rows:
        users = ", ".join(map(str, row["candidates"])) or "none"
        lines.append(f"  {row['order']}  {row['reason']}  phone {row['phone']}  users {users}")
        lines.append(f"      {REASON_TEXT.get(row['reason'], row['reason'])}")
        if row["detail"]:
            lines.append(f"      {row['detail']}")
        seen = f"first seen {_short(row['first_seen'])}, last seen {_short(row['last_seen'])}"
        if row.get("resolved"):
            seen += f", resolved {_short(row['resolved'])}"
        lines.append(f"      {seen}")
    lines += ["", "To attach one, insert it into local_lab_orders with the right USER_ID; "
                  "labsync then syncs it and closes the case."]
    return "\n".join(lines)


def _join_ids(ids: tuple[int, ...]) -> str:
    """Comma-separated user IDs that fit the column; a cut list ends with ``…``."""
    text = ",".join(map(str, ids))
    if len(text) <= _CANDIDATES_LENGTH:
        return text
    cut = text[: _CANDIDATES_LENGTH - 1]
    return cut[: cut.rfind(",") + 1] + "…"


def _split_ids(text: str | None) -> list[int]:
    return [int(part) for part in (text or "").split(",") if part.strip().isdigit()]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else f"{moment:%Y-%m-%dT%H:%M:%S}Z"


def _short(iso: str | None) -> str:
    return "-" if iso is None else iso[:16].replace("T", " ") + " UTC"
