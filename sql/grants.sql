-- The least privileges labsync needs, for a MySQL/MariaDB account of its own.
--
-- Run it after `labsync init-db` (docs/operations.md, install step 5): the GRANTs below name
-- labsync's own tables and the two lab tables, and the server refuses a GRANT on a table that
-- does not exist yet. This account cannot create tables: init-db runs as an administrator.
-- After an upgrade that adds a labsync_* table, run init-db and then this file again: a GRANT
-- can be repeated, and CREATE USER IF NOT EXISTS leaves an existing account and its password
-- as they are.
--
-- Edit before running: `bitrix` is the site's database, 'change-me' the password (the one in
-- /etc/labsync/credentials/db_password), and the host part is how labsync connects:
--   url = "mysql+pymysql://labsync@127.0.0.1:3306/bitrix"       TCP, as the example config:
--         'labsync'@'127.0.0.1', as below
--   url = "mysql+pymysql://labsync@localhost/bitrix?unix_socket=/run/mysqld/mysqld.sock"
--         the unix socket: 'labsync'@'localhost'
-- PyMySQL's `localhost` without `unix_socket=` is TCP: a server with skip_name_resolve sees
-- 127.0.0.1 and refuses 'labsync'@'localhost' ("Access denied").
--
-- tests/test_grants.py runs docs/operations.md's database steps, then a full pass of batched
-- completions and `labsync status`, as an account made from exactly this file.

CREATE USER IF NOT EXISTS 'labsync'@'127.0.0.1' IDENTIFIED BY 'change-me';

-- Bitrix users: who an order's mail goes to (read only, and only these columns).
GRANT SELECT (ID, ACTIVE, EMAIL, NAME, LAST_NAME, PERSONAL_PHONE, PERSONAL_MOBILE,
              PERSONAL_BIRTHDAY) ON bitrix.b_user TO 'labsync'@'127.0.0.1';
GRANT SELECT (USER_ID, PHONE_NUMBER) ON bitrix.b_user_phone_auth TO 'labsync'@'127.0.0.1';

-- Bitrix mail queue and admin event log: append only. SELECT of three columns: ID, which
-- a batch's one `INSERT ... RETURNING ID` reads back (MariaDB 10.5+), and EVENT_NAME and
-- SUCCESS_EXEC, by which `labsync status` counts the mail the site has not sent yet.
-- Deliberately not C_FIELDS: it holds every mail the site queues, password-reset check
-- words among them. MariaDB wants SELECT on each column an INSERT ... RETURNING names in
-- its column list (even with `RETURNING 1`), so that INSERT names none: it gives every
-- column, in the table's own order (labsync/store/bitrix.py). No SELECT on LID, C_FIELDS,
-- DATE_INSERT or DUPLICATE is needed for it.
GRANT INSERT ON bitrix.b_event TO 'labsync'@'127.0.0.1';
GRANT SELECT (ID, EVENT_NAME, SUCCESS_EXEC) ON bitrix.b_event TO 'labsync'@'127.0.0.1';
GRANT INSERT ON bitrix.b_event_log TO 'labsync'@'127.0.0.1';

-- The site's lab tables: orders are read and their status updated; results are owned.
GRANT SELECT, UPDATE ON bitrix.local_lab_orders TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.local_lab_results TO 'labsync'@'127.0.0.1';

-- labsync's own bookkeeping.
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_orders TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_passes TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_outbox TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_review TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_discovery TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_versions TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_cursors TO 'labsync'@'127.0.0.1';
GRANT SELECT, INSERT, UPDATE, DELETE ON bitrix.labsync_deliveries TO 'labsync'@'127.0.0.1';
