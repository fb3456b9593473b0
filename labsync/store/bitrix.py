"""What labsync reads from and appends to Bitrix's own tables: users, the mail queue, the log.

Rows are written the way Bitrix's PHP writes them (``CEvent::Send``, ``CEventLog::Add``),
so the site's own agents and admin pages treat them as their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, insert, select, text
from sqlalchemy.exc import DBAPIError

from labsync.errors import StoreError
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

    One multi-row INSERT … RETURNING ID where the database has it (``_one_insert_returns_ids``);
    one INSERT per mail elsewhere.
    """
    rows = [_event_row(fitter, event_name, site_id, f, duplicate, now_site) for f in fields]
    if not rows:
        return []
    if len(rows) == 1 or not _one_insert_returns_ids(conn.dialect):
        return [_inserted_id(conn.execute(_INSERT_EVENT, row)) for row in rows]
    statement, params = _insert_events_returning_ids(_event_columns(conn), rows)
    try:
        result = conn.execute(statement, params)
    except DBAPIError as exc:
        if not exc.connection_invalidated:  # b_event may have changed: read its columns again
            conn.info.pop(_COLUMNS_KEY, None)
        raise
    # A multi-row INSERT gives its rows ascending auto-increment IDs in VALUES order (the
    # rule SQLAlchemy's sort_by_parameter_order relies on too).
    ids = sorted(int(row.ID) for row in result)
    if len(ids) != len(rows):  # cannot happen: every row inserted returns its ID
        raise RuntimeError(f"b_event: {len(rows)} mails queued, {len(ids)} IDs returned")
    return ids


def _one_insert_returns_ids(dialect: Any) -> bool:
    """Whether one multi-row INSERT can return the IDs it made: MariaDB 10.5+ (RETURNING).
    MySQL has none; on SQLite a statement costs no round trip."""
    return bool(getattr(dialect, "is_mariadb", False) and dialect.insert_returning)


def _insert_events_returning_ids(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
                                 ) -> tuple[TextClause, dict[str, Any]]:
    """``INSERT INTO b_event VALUES (…), (…) RETURNING ID``, with no column list.

    MariaDB checks SELECT on every column an INSERT … RETURNING names in its column list
    (``RETURNING 1`` too), and labsync's account may not read C_FIELDS: that is every mail the
    site queues, password-reset check words among them (sql/grants.sql). Without a column list
    it checks INSERT on the table and SELECT on the returned ID only. So each row gives every
    column of the live table, in the table's own order: labsync's value, or DEFAULT.
    """
    missing = sorted(set(rows[0]) - set(columns))
    if missing:
        raise StoreError(f"b_event: no column {', '.join(missing)} in information_schema")
    params: dict[str, Any] = {}
    values = []
    for n, row in enumerate(rows):
        cells = []
        for i, column in enumerate(columns):
            if column in row:
                params[f"v{n}_{i}"] = row[column]
                cells.append(f":v{n}_{i}")
            else:
                cells.append("DEFAULT")
        values.append(f"({', '.join(cells)})")
    # Only placeholders and DEFAULT go into the text; the values travel as parameters.
    sql = f"INSERT INTO b_event VALUES {', '.join(values)} RETURNING ID"  # noqa: S608
    return text(sql), params


def _event_columns(conn: Connection) -> list[str]:
    """The visible columns of the site's ``b_event``, in table order; read once per connection."""
    columns = conn.info.get(_COLUMNS_KEY)
    if columns is None:
        columns = [str(name) for name in conn.execute(_EVENT_COLUMNS).scalars()]
        conn.info[_COLUMNS_KEY] = columns
    return list(columns)


_COLUMNS_KEY = "labsync.b_event_columns"
# information_schema lists every column of b_event to an account with INSERT on the table.
_EVENT_COLUMNS = text(
    "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
    "AND TABLE_NAME = 'b_event' AND EXTRA NOT LIKE '%INVISIBLE%' ORDER BY ORDINAL_POSITION")


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


def has_event_log(conn: Connection, fitter: TextFitter, *, item_id: str,
                  description: str) -> bool:
    """Whether labsync wrote this line for this item before (to tell a problem once)."""
    e = b_event_log.c
    return conn.execute(select(e.ID).where(
        e.MODULE_ID == MODULE_ID, e.AUDIT_TYPE_ID == AUDIT_TYPE,
        e.ITEM_ID == fitter.fit("b_event_log", "ITEM_ID", item_id)[0],
        e.DESCRIPTION == fitter.fit("b_event_log", "DESCRIPTION", description)[0],
    ).limit(1)).first() is not None


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
