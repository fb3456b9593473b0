"""What labsync reads from and appends to Bitrix's own tables: users, the mail queue, the log.

Rows are written the way Bitrix's PHP writes them (``CEvent::Send``, ``CEventLog::Add``),
so the site's own agents and admin pages treat them as their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select

from labsync.phpserial import serialize_strings
from labsync.store.db import TextFitter
from labsync.store.tables import b_event, b_event_log, b_user

AUDIT_TYPE = "LAB_SYNC"
MODULE_ID = "labsync"


@dataclass(frozen=True, slots=True)
class SiteUser:
    """The columns of ``b_user`` labsync uses."""

    id: int
    active: bool
    email: str | None
    name: str | None
    last_name: str | None
    birthday: date | None


def get_user(conn: Connection, user_id: int) -> SiteUser | None:
    row = conn.execute(_GET_USER, {"user_id": user_id}).first()
    return None if row is None else _site_user(row)


def get_users(conn: Connection, user_ids: Iterable[int]) -> dict[int, SiteUser]:
    """Several users in one query, by ID; an ID with no user is missing from the answer."""
    wanted = sorted(set(user_ids))
    users: dict[int, SiteUser] = {}
    for start in range(0, len(wanted), _IN_LIST):
        for row in conn.execute(_GET_USERS, {"user_ids": wanted[start:start + _IN_LIST]}):
            users[row.ID] = _site_user(row)
    return users


def _site_user(row: Any) -> SiteUser:
    return SiteUser(id=row.ID, active=row.ACTIVE == "Y", email=(row.EMAIL or "").strip() or None,
                    name=row.NAME, last_name=row.LAST_NAME, birthday=row.PERSONAL_BIRTHDAY)


_USER_COLUMNS = select(b_user.c.ID, b_user.c.ACTIVE, b_user.c.EMAIL, b_user.c.NAME,
                       b_user.c.LAST_NAME, b_user.c.PERSONAL_BIRTHDAY)
_GET_USER = _USER_COLUMNS.where(b_user.c.ID == bindparam("user_id"))
_GET_USERS = _USER_COLUMNS.where(b_user.c.ID.in_(bindparam("user_ids", expanding=True)))
_IN_LIST = 500  # user ids per statement


def queue_mail_event(
    conn: Connection,
    fitter: TextFitter,
    *,
    event_name: str,
    site_id: str,
    fields: Mapping[str, str],
    duplicate: str,
    now_site: datetime,
) -> int:
    """Insert one ``b_event`` row as ``CEvent::Send`` would; return its ID."""
    return _inserted_id(conn.execute(_INSERT_EVENT, _event_row(fitter, event_name, site_id,
                                                               fields, duplicate, now_site)))


def queue_mail_events(
    conn: Connection,
    fitter: TextFitter,
    *,
    event_name: str,
    site_id: str,
    fields: Sequence[Mapping[str, str]],
    duplicate: str,
    now_site: datetime,
) -> list[int]:
    """``queue_mail_event`` for several mails; their IDs, in the order of ``fields``.

    One multi-row INSERT … RETURNING where the database says which ID went to which row
    (``_one_insert_returns_ids``); one INSERT per mail elsewhere.
    """
    rows = [_event_row(fitter, event_name, site_id, f, duplicate, now_site) for f in fields]
    if not rows:
        return []
    if len(rows) == 1 or not _one_insert_returns_ids(conn.dialect):
        return [_inserted_id(conn.execute(_INSERT_EVENT, row)) for row in rows]
    ids = [int(row.ID) for row in conn.execute(_INSERT_EVENTS, rows)]
    if len(ids) != len(rows):  # cannot happen: every row inserted returns its ID
        raise RuntimeError(f"b_event: {len(rows)} mails queued, {len(ids)} IDs returned")
    return ids


def _one_insert_returns_ids(dialect: Any) -> bool:
    """Whether SQLAlchemy sends a multi-row INSERT … RETURNING as one statement and matches
    each returned ID to its parameters (``sort_by_parameter_order``, by the ascending
    auto-increment IDs): MariaDB 10.5+. MySQL has no RETURNING. On SQLite SQLAlchemy would
    send one INSERT per row anyway, and there a statement costs no round trip."""
    return bool(getattr(dialect, "is_mariadb", False)
                and dialect.insert_executemany_returning_sort_by_parameter_order)


def _inserted_id(result: Any) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _event_row(fitter: TextFitter, event_name: str, site_id: str, fields: Mapping[str, str],
               duplicate: str, now_site: datetime) -> dict[str, Any]:
    # Fit each value before serialising: the byte lengths inside C_FIELDS must stay true.
    fitted = {k: fitter.fit("b_event", "C_FIELDS", v)[0] or "" for k, v in fields.items()}
    return {
        "EVENT_NAME": event_name,
        "LID": site_id,
        "C_FIELDS": serialize_strings(fitted),
        "DATE_INSERT": now_site.replace(microsecond=0),
        "SUCCESS_EXEC": "N",
        "DUPLICATE": duplicate,
    }


# Built once: one is queued for every completed order (the columns come from the parameters).
_INSERT_EVENT = insert(b_event)
_INSERT_EVENTS = insert(b_event).returning(b_event.c.ID, sort_by_parameter_order=True)


def add_event_log(
    conn: Connection,
    fitter: TextFitter,
    *,
    item_id: str,
    description: str,
    now_site: datetime,
    site_id: str | None = None,
    severity: str = "WARNING",
) -> None:
    """Append one line to the admin event log, as ``CEventLog::Add`` would."""
    conn.execute(
        insert(b_event_log).values(
            TIMESTAMP_X=now_site.replace(microsecond=0),
            SEVERITY=severity,
            AUDIT_TYPE_ID=AUDIT_TYPE,
            MODULE_ID=MODULE_ID,
            ITEM_ID=fitter.fit("b_event_log", "ITEM_ID", item_id)[0],
            SITE_ID=site_id,
            DESCRIPTION=fitter.fit("b_event_log", "DESCRIPTION", description)[0],
        )
    )
