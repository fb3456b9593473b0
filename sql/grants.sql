-- The least privileges labsync needs, for a MySQL/MariaDB account of its own.
-- Replace `bitrix` with the site's database and choose the host part and password.
-- Run `labsync init-db` once as an administrator (it creates tables), or also grant
-- CREATE and INDEX on the labsync_* tables to this account.
-- tests/test_grants.py runs a full pass as an account made from exactly this file.

CREATE USER IF NOT EXISTS 'labsync'@'localhost' IDENTIFIED BY 'change-me';

-- Bitrix users: who an order's mail goes to (read only, and only these columns).
GRANT SELECT (ID, ACTIVE, EMAIL, NAME, LAST_NAME, PERSONAL_PHONE, PERSONAL_MOBILE,
              PERSONAL_BIRTHDAY) ON bitrix.b_user TO 'labsync'@'localhost';
GRANT SELECT (USER_ID, PHONE_NUMBER) ON bitrix.b_user_phone_auth TO 'labsync'@'localhost';

-- Bitrix mail queue and admin event log: append only (SELECT of three columns lets
-- `labsync status` count the mail not yet sent by the site).
GRANT INSERT ON bitrix.b_event TO 'labsync'@'localhost';
GRANT SELECT (ID, EVENT_NAME, SUCCESS_EXEC) ON bitrix.b_event TO 'labsync'@'localhost';
GRANT INSERT ON bitrix.b_event_log TO 'labsync'@'localhost';

-- The site's lab tables: orders are read and their status updated; results are owned.
GRANT SELECT, UPDATE ON bitrix.local_lab_orders TO 'labsync'@'localhost';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.local_lab_results TO 'labsync'@'localhost';

-- labsync's own bookkeeping.
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_orders TO 'labsync'@'localhost';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_passes TO 'labsync'@'localhost';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_outbox TO 'labsync'@'localhost';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_review TO 'labsync'@'localhost';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_discovery TO 'labsync'@'localhost';
