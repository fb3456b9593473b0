"""``labsync_outbox``: mail labsync sends itself, queued with the results, sent by the sender job.

A row is written by ``queue`` inside the order's own transaction, so the mail exists if and
only if the results it announces were committed. ``(ORDER_ID, KIND, VERSION)`` is unique:
queueing the same event again does nothing. ``MESSAGE_ID`` is derived from that key, so a
message sent twice (a crash after the server took it and before it was marked sent) is the
same message twice, which mail clients and the server can recognise.

States: ``pending`` (``NEXT_ATTEMPT_AT`` empty or the earliest next try) → ``sent`` or
``failed``. Times are UTC, naive, whole seconds (MySQL's DATETIME keeps no fractions).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Connection, String, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from labsync.mail.templates import RenderedMail
from labsync.store.tables import labsync_outbox as t

PENDING, SENT, FAILED = "pending", "sent", "failed"
_ELLIPSIS = "…"


def message_id(order_id: int, kind: str, version: int, domain: str) -> str:
    """The Message-ID of one notification: the same on every attempt to send it."""
    return f"<labsync.{order_id}.{kind}.{version}@{domain}>"


def queue(
    conn: Connection, *, order_id: int, external_id: str, kind: str, version: int,
    recipient: str, rendered: RenderedMail, message_id_domain: str, now: datetime,
) -> int | None:
    """Add one mail in the caller's transaction; its row ID, or ``None`` if it is queued already.

    The caller holds the order's row lock, so no one else queues for this order meanwhile;
    the unique key catches anyone who does not.
    """
    if find(conn, order_id=order_id, kind=kind, version=version) is not None:
        return None
    values = {
        "ORDER_ID": order_id, "EXTERNAL_ORDER_ID": external_id, "KIND": kind,
        "VERSION": version, "RECIPIENT": recipient,
        "SUBJECT": _cut(rendered.subject, _length(t.c.SUBJECT)),
        "BODY_TEXT": rendered.text, "BODY_HTML": rendered.html,
        "MESSAGE_ID": message_id(order_id, kind, version, message_id_domain),
        "STATE": PENDING, "ATTEMPTS": 0, "NEXT_ATTEMPT_AT": None,
        "CREATED_AT": _whole(now),
    }
    try:
        result = conn.execute(insert(t).values(**values))
    except IntegrityError:
        # MySQL and SQLite undo only the failed statement: the transaction goes on.
        if find(conn, order_id=order_id, kind=kind, version=version) is not None:
            return None
        raise
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def find(conn: Connection, *, order_id: int, kind: str, version: int) -> int | None:
    """The row ID of a queued mail, if there is one."""
    return conn.execute(
        select(t.c.ID).where(t.c.ORDER_ID == order_id, t.c.KIND == kind, t.c.VERSION == version)
    ).scalar()


def due(conn: Connection, now: datetime, limit: int) -> Sequence[Any]:
    """Pending mails whose time has come, oldest first."""
    return conn.execute(
        select(t).where(t.c.STATE == PENDING, _is_due(now)).order_by(t.c.ID).limit(limit)
    ).all()


def claim(conn: Connection, row_id: int, *, now: datetime, until: datetime) -> bool:
    """Take one due mail for sending until ``until``; ``False`` if another sender has it.

    The conditional UPDATE locks the row: a second sender waiting on it re-reads it, finds
    it no longer due, and changes nothing. A sender that dies holding a claim leaves the
    mail due again at ``until``.
    """
    result = conn.execute(
        update(t).where(t.c.ID == row_id, t.c.STATE == PENDING, _is_due(now))
        .values(NEXT_ATTEMPT_AT=_whole(until))
    )
    return result.rowcount == 1


def release(conn: Connection, row_id: int, *, next_attempt_at: datetime | None) -> None:
    """Give a claimed mail back untouched (the sender stopped before trying it)."""
    conn.execute(update(t).where(t.c.ID == row_id, t.c.STATE == PENDING)
                 .values(NEXT_ATTEMPT_AT=next_attempt_at))


def mark_sent(conn: Connection, row_id: int, *, now: datetime) -> None:
    """The server accepted the mail."""
    conn.execute(update(t).where(t.c.ID == row_id, t.c.STATE == PENDING).values(
        STATE=SENT, SENT_AT=_whole(now), ATTEMPTS=t.c.ATTEMPTS + 1, NEXT_ATTEMPT_AT=None))


def mark_retry(conn: Connection, row_id: int, *, error: str, next_attempt_at: datetime) -> None:
    """This attempt failed, but a later one may succeed."""
    conn.execute(update(t).where(t.c.ID == row_id, t.c.STATE == PENDING).values(
        ATTEMPTS=t.c.ATTEMPTS + 1, LAST_ERROR=_cut(error, _length(t.c.LAST_ERROR)),
        NEXT_ATTEMPT_AT=_whole(next_attempt_at)))


def mark_failed(conn: Connection, row_id: int, *, error: str) -> None:
    """The mail will never be sent: the server refused it for good, or attempts ran out."""
    conn.execute(update(t).where(t.c.ID == row_id, t.c.STATE == PENDING).values(
        STATE=FAILED, ATTEMPTS=t.c.ATTEMPTS + 1,
        LAST_ERROR=_cut(error, _length(t.c.LAST_ERROR)), NEXT_ATTEMPT_AT=None))


def requeue_failed(conn: Connection, row_ids: Sequence[int] | None = None) -> int:
    """Send failed mails again from scratch (after fixing the cause); how many were requeued."""
    query = update(t).where(t.c.STATE == FAILED)
    if row_ids is not None:
        query = query.where(t.c.ID.in_(list(row_ids)))
    return conn.execute(query.values(STATE=PENDING, ATTEMPTS=0, NEXT_ATTEMPT_AT=None)).rowcount


def counts(conn: Connection) -> dict[str, int]:
    """Rows by state, for ``status`` and the metrics gauge."""
    rows = conn.execute(select(t.c.STATE, func.count()).group_by(t.c.STATE)).all()
    found = {state: 0 for state in (PENDING, SENT, FAILED)}
    found.update({str(state): int(n) for state, n in rows})
    return found


def _is_due(now: datetime) -> Any:
    return or_(t.c.NEXT_ATTEMPT_AT.is_(None), t.c.NEXT_ATTEMPT_AT <= _whole(now))


def _whole(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def _length(column: Column[Any]) -> int | None:
    return column.type.length if isinstance(column.type, String) else None


def _cut(text: str, length: int | None) -> str:
    if length is None or len(text) <= length:
        return text
    return text[: length - 1] + _ELLIPSIS
