"""SQLAlchemy Core definitions of every table labsync touches.

- ``local_lab_orders`` / ``local_lab_results``: the site's tables, exactly the brief's DDL.
  ``init-db`` creates them only when missing and never alters them.
- ``b_user``, ``b_user_phone_auth``, ``b_event``, ``b_event_log``: Bitrix's own tables,
  defined here for querying (and for the demo's SQLite file). labsync never creates them on
  a real site: ``BITRIX_TABLES`` is kept out of ``init-db``.
- ``labsync_*``: labsync's own bookkeeping. Its DATETIME columns hold UTC; the site's
  columns hold the site's naive local time (``site.timezone``), as PHP writes them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    Enum,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.mysql import CHAR, DATETIME, LONGTEXT, MEDIUMTEXT, TIMESTAMP

from labsync.model import OrderStatus

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; MySQL gets the brief's BIGINT.
_BigId = BigInteger().with_variant(Integer(), "sqlite")
_Char1 = String(1).with_variant(CHAR(1), "mysql", "mariadb")
_LongText = Text().with_variant(LONGTEXT(), "mysql", "mariadb")
_MediumText = Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")
_Moment = DateTime().with_variant(DATETIME(fsp=6), "mysql", "mariadb")  # the LIS's, to the µs

ORDER_STATUSES = tuple(status.value for status in OrderStatus)  # local_lab_orders.STATUS

# -- the site's lab tables (the brief's DDL) ---------------------------------------------

local_lab_orders = Table(
    "local_lab_orders",
    metadata,
    Column("ID", _BigId, primary_key=True, autoincrement=True),
    Column("USER_ID", Integer, nullable=False),
    Column("EXTERNAL_ORDER_ID", String(100), nullable=False, unique=True),
    Column("ORDER_DATE", Date),
    Column(
        "STATUS",
        Enum(*ORDER_STATUSES, native_enum=True, create_constraint=False),
        server_default="received",
    ),
    Column("SYNCED_AT", DateTime),
    Index("idx_user", "USER_ID"),
    Index("idx_external", "EXTERNAL_ORDER_ID"),
)

local_lab_results = Table(
    "local_lab_results",
    metadata,
    Column("ID", _BigId, primary_key=True, autoincrement=True),
    Column("ORDER_ID", BigInteger, nullable=False),
    Column("TEST_CODE", String(50)),
    Column("TEST_NAME", String(500)),
    Column("RESULT_VALUE", String(500)),
    Column("RESULT_UNIT", String(100)),
    Column("REFERENCE_MIN", String(100)),
    Column("REFERENCE_MAX", String(100)),
    Column("IS_ABNORMAL", _Char1, server_default="N"),
    Column("RESULT_DATE", DateTime),
    Column("PDF_PATH", String(500)),
    Index("idx_order", "ORDER_ID"),
)

SITE_TABLES = (local_lab_orders, local_lab_results)

# -- Bitrix core tables (read and appended to; never created on a real site) -------------

b_user = Table(
    "b_user",
    metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("LOGIN", String(50), nullable=False),
    Column("ACTIVE", _Char1, nullable=False, server_default="Y"),
    Column("BLOCKED", _Char1, nullable=False, server_default="N"),
    Column("NAME", String(50)),
    Column("LAST_NAME", String(50)),
    Column("SECOND_NAME", String(50)),
    Column("EMAIL", String(255)),
    Column("LID", String(2)),
    Column("PERSONAL_PHONE", String(255)),
    Column("PERSONAL_MOBILE", String(255)),
    Column("WORK_PHONE", String(255)),
    Column("PERSONAL_BIRTHDAY", Date),
    Column("XML_ID", String(255)),
    Column("EXTERNAL_AUTH_ID", String(255)),
    Column("LANGUAGE_ID", String(2)),
    Column("DATE_REGISTER", DateTime, nullable=False),
    Column("LAST_LOGIN", DateTime),
)

b_user_phone_auth = Table(
    "b_user_phone_auth",
    metadata,
    Column("USER_ID", Integer, primary_key=True, autoincrement=False),
    Column("PHONE_NUMBER", String(25), nullable=False, unique=True),
    Column("OTP_SECRET", Text),
    Column("ATTEMPTS", Integer, server_default="0"),
    Column("CONFIRMED", _Char1, server_default="N"),
    Column("DATE_SENT", DateTime),
)

b_event = Table(
    "b_event",
    metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("EVENT_NAME", String(255), nullable=False),
    Column("MESSAGE_ID", Integer),
    Column("LID", String(255), nullable=False),
    Column("C_FIELDS", _LongText),
    Column("DATE_INSERT", DateTime),
    Column("DATE_EXEC", DateTime),
    Column("SUCCESS_EXEC", _Char1, nullable=False, server_default="N"),
    Column("DUPLICATE", _Char1, nullable=False, server_default="Y"),
    Column("LANGUAGE_ID", String(2)),
)

b_event_log = Table(
    "b_event_log",
    metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("TIMESTAMP_X", DateTime().with_variant(TIMESTAMP(), "mysql", "mariadb")),
    Column("SEVERITY", String(50), nullable=False),
    Column("AUDIT_TYPE_ID", String(50), nullable=False),
    Column("MODULE_ID", String(50), nullable=False),
    Column("ITEM_ID", String(255), nullable=False),
    Column("REMOTE_ADDR", String(40)),
    Column("USER_AGENT", Text),
    Column("REQUEST_URI", Text),
    Column("SITE_ID", String(2)),
    Column("USER_ID", Integer),
    Column("GUEST_ID", Integer),
    Column("DESCRIPTION", _MediumText),
)

BITRIX_TABLES = (b_user, b_user_phone_auth, b_event, b_event_log)

# -- labsync's own tables -----------------------------------------------------------------

_OWN: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4",
                        "mariadb_engine": "InnoDB", "mariadb_charset": "utf8mb4"}

labsync_orders = Table(
    "labsync_orders",
    metadata,
    Column("ORDER_ID", BigInteger, primary_key=True, autoincrement=False),
    Column("EXTERNAL_ORDER_ID", String(100), nullable=False),
    Column("FIRST_SEEN_AT", DateTime, nullable=False),
    Column("LAST_POLL_AT", DateTime),
    Column("POLLS", Integer, nullable=False, server_default="0"),
    Column("FAILURES", Integer, nullable=False, server_default="0"),  # consecutive
    Column("FAILURES_TOTAL", Integer, nullable=False, server_default="0"),
    Column("LAST_ERROR_KIND", String(50)),
    Column("LAST_ERROR", String(1000)),
    Column("LAST_ERROR_AT", DateTime),
    Column("NEXT_POLL_AT", DateTime),
    Column("LIS_STATUS", String(20)),
    Column("RESULTS_HASH", String(64)),
    Column("RESULTS_COUNT", Integer),
    Column("PDF_PATH", String(500)),
    Column("PDF_SHA256", String(64)),
    Column("PDF_BYTES", BigInteger),
    Column("COMPLETED_AT", DateTime),
    Column("MAIL_STATE", String(30)),  # queued | no_email | inactive | no_user
    Column("MAIL_EVENT_ID", Integer),
    Column("NOTIFIED_AT", DateTime),
    Column("STALE_AT", DateTime),  # pending longer than sync.stale_after; logged once
    # Corrections after completion: the results' version (1 at completion, +1 for each
    # change the LIS makes while the order is re-checked) and the last version mailed.
    Column("RESULTS_VERSION", Integer),
    Column("UPDATE_NOTIFIED_VERSION", Integer),
    # A claim: the instance working on the order now, and until when (see store/claims.py).
    Column("LEASE_OWNER", String(100)),
    Column("LEASE_UNTIL", DateTime),
    Index("ix_labsync_orders_next_poll", "NEXT_POLL_AT"),
    Index("ix_labsync_orders_external", "EXTERNAL_ORDER_ID"),
    **_OWN,
)

labsync_passes = Table(
    "labsync_passes",
    metadata,
    Column("ID", _BigId, primary_key=True, autoincrement=True),
    Column("STARTED_AT", DateTime, nullable=False),
    Column("FINISHED_AT", DateTime),
    Column("HOST", String(255)),
    Column("PID", Integer),
    Column("CHECKED", Integer, nullable=False, server_default="0"),
    Column("COMPLETED", Integer, nullable=False, server_default="0"),
    Column("CANCELLED", Integer, nullable=False, server_default="0"),
    Column("PENDING", Integer, nullable=False, server_default="0"),
    Column("FAILED", Integer, nullable=False, server_default="0"),
    Column("EVENTS", Integer, nullable=False, server_default="0"),
    Column("OUTCOME", String(30)),  # ok | lis_auth | interrupted
    Column("DURATION_MS", Integer),
    Index("ix_labsync_passes_started", "STARTED_AT"),
    **_OWN,
)

# Mail sent by labsync itself (notify.backend = "smtp"): rendered in the order's own
# transaction, sent by the sender job. (ORDER_ID, KIND, VERSION) is unique: one message per
# event, however often a pass is retried; MESSAGE_ID is stable, so a re-send after a crash
# is recognisable as the same message.
labsync_outbox = Table(
    "labsync_outbox",
    metadata,
    Column("ID", _BigId, primary_key=True, autoincrement=True),
    Column("ORDER_ID", BigInteger, nullable=False),
    Column("EXTERNAL_ORDER_ID", String(100), nullable=False),
    Column("KIND", String(20), nullable=False),  # ready | updated
    Column("VERSION", Integer, nullable=False, server_default="1"),
    Column("RECIPIENT", String(255), nullable=False),
    Column("SUBJECT", String(500), nullable=False),
    Column("BODY_TEXT", _MediumText, nullable=False),
    Column("BODY_HTML", _MediumText),
    Column("MESSAGE_ID", String(255), nullable=False, unique=True),
    Column("STATE", String(20), nullable=False, server_default="pending"),  # pending|sent|failed
    Column("ATTEMPTS", Integer, nullable=False, server_default="0"),
    Column("NEXT_ATTEMPT_AT", DateTime),
    Column("LAST_ERROR", String(1000)),
    Column("CREATED_AT", DateTime, nullable=False),
    Column("SENT_AT", DateTime),
    Index("ux_labsync_outbox_event", "ORDER_ID", "KIND", "VERSION", unique=True),
    Index("ix_labsync_outbox_state", "STATE", "NEXT_ATTEMPT_AT"),
    **_OWN,
)

# Orders found in the LIS by phone that could not be attached to one site user safely.
labsync_review = Table(
    "labsync_review",
    metadata,
    Column("ID", _BigId, primary_key=True, autoincrement=True),
    Column("EXTERNAL_ORDER_ID", String(100), nullable=False, unique=True),
    Column("PHONE", String(25), nullable=False),
    Column("REASON", String(30), nullable=False),  # ambiguous | mismatch | no_second_factor
    Column("CANDIDATES", String(255)),  # site user IDs, comma-separated
    Column("DETAIL", String(1000)),
    Column("FIRST_SEEN_AT", DateTime, nullable=False),
    Column("LAST_SEEN_AT", DateTime, nullable=False),
    Column("RESOLVED_AT", DateTime),
    **_OWN,
)

# Discovery's rotation through eligible site users: who was asked about when.
labsync_discovery = Table(
    "labsync_discovery",
    metadata,
    Column("USER_ID", Integer, primary_key=True, autoincrement=False),
    Column("LAST_CHECKED_AT", DateTime),
    Column("ORDERS_FOUND", Integer, nullable=False, server_default="0"),
    Index("ix_labsync_discovery_checked", "LAST_CHECKED_AT"),
    **_OWN,
)

# What labsync last applied of each order's LIS version (sources that say when they
# changed an order: FHIR's meta.lastUpdated, HL7's MSH-7), so an older answer or message
# never replaces a newer one; and since when a completed order waits for its PDF
# (pdf.wait). Only written for orders that need it: QLAB's answers carry no version.
labsync_versions = Table(
    "labsync_versions",
    metadata,
    Column("ORDER_ID", BigInteger, primary_key=True, autoincrement=False),
    Column("CHANGED_AT", _Moment),  # UTC
    Column("VERSION", String(200)),
    Column("PDF_WAIT_SINCE", DateTime),  # UTC
    **_OWN,
)

# Change feeds (adapters that can say what changed since a cursor): the opaque cursor of
# each feed, written in the same transaction as the page of orders it follows.
labsync_cursors = Table(
    "labsync_cursors",
    metadata,
    Column("NAME", String(100), primary_key=True),
    Column("FEED_CURSOR", String(2000)),
    Column("UPDATED_AT", DateTime, nullable=False),
    **_OWN,
)

# Inbox deliveries applied: the delivery's id written in the same transaction as its
# orders, so a delivery handed out again after a crash (before it was marked done) is
# recognised and not applied twice.
labsync_deliveries = Table(
    "labsync_deliveries",
    metadata,
    Column("DELIVERY_ID", String(200), primary_key=True),
    Column("APPLIED_AT", DateTime, nullable=False),
    Column("ORDERS", Integer, nullable=False, server_default="0"),
    **_OWN,
)

OWN_TABLES = (labsync_orders, labsync_passes, labsync_outbox, labsync_review,
              labsync_discovery, labsync_versions, labsync_cursors, labsync_deliveries)
