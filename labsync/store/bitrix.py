"""What labsync reads from and appends to Bitrix's own tables: users, the mail queue, the log.

Rows are written the way Bitrix's PHP writes them (``CEvent::Send``, ``CEventLog::Add``),
so the site's own agents and admin pages treat them as their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime

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
    if row is None:
        return None
    return SiteUser(id=row.ID, active=row.ACTIVE == "Y", email=(row.EMAIL or "").strip() or None,
                    name=row.NAME, last_name=row.LAST_NAME, birthday=row.PERSONAL_BIRTHDAY)


_GET_USER = select(b_user.c.ID, b_user.c.ACTIVE, b_user.c.EMAIL, b_user.c.NAME,
                   b_user.c.LAST_NAME, b_user.c.PERSONAL_BIRTHDAY
                   ).where(b_user.c.ID == bindparam("user_id"))


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
    # Fit each value before serialising: the byte lengths inside C_FIELDS must stay true.
    fitted = {k: fitter.fit("b_event", "C_FIELDS", v)[0] or "" for k, v in fields.items()}
    result = conn.execute(_INSERT_EVENT, {
        "EVENT_NAME": event_name,
        "LID": site_id,
        "C_FIELDS": serialize_strings(fitted),
        "DATE_INSERT": now_site.replace(microsecond=0),
        "SUCCESS_EXEC": "N",
        "DUPLICATE": duplicate,
    })
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


# Built once: one is queued for every completed order (the columns come from the parameters).
_INSERT_EVENT = insert(b_event)


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
