"""``labsync check``: every problem an operator can fix before the daemon runs, as a list."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError

from labsync.config import Config
from labsync.errors import LisAuthError, LisError
from labsync.lis.registry import make_client
from labsync.store.db import describe_db_error, detect_text_fitter, make_engine
from labsync.store.tables import BITRIX_TABLES, OWN_TABLES, SITE_TABLES


def run_checks(config: Config) -> tuple[list[str], list[str]]:
    """(problems, notes). An empty problem list means labsync can run with this config."""
    problems: list[str] = []
    notes: list[str] = [f"config {config.source} is valid"]
    _check_database(config, problems, notes)
    _check_mail_templates(config, problems, notes)
    _check_lis(config, problems, notes)
    _check_smtp(config, problems, notes)
    _check_pdf_dir(config, problems, notes)
    return problems, notes


def _check_database(config: Config, problems: list[str], notes: list[str]) -> None:
    engine = make_engine(config.database)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        tables = set(inspect(engine).get_table_names())
        fitter = detect_text_fitter(engine)
    except SQLAlchemyError as exc:
        problems.append(f"database.url: cannot use the database: {describe_db_error(exc)}")
        return
    finally:
        engine.dispose()
    notes.append(f"database reachable ({config.database.url.get_backend_name()})")
    for table in (*SITE_TABLES, *OWN_TABLES):
        if table.name not in tables:
            problems.append(f"database: table {table.name} is missing: run `labsync init-db`")
    for table in BITRIX_TABLES:
        if table.name not in tables:
            problems.append(f"database: Bitrix table {table.name} is missing: is database.url "
                            "the site's database?")
    charset = fitter.charsets.get(("local_lab_results", "RESULT_VALUE"))
    if charset in ("utf8", "utf8mb3"):
        notes.append("local_lab_results is utf8 (3-byte): emoji in results will be stored as "
                     "U+FFFD; converting the table to utf8mb4 keeps them")


_TEMPLATES = text(
    "SELECT COUNT(*) FROM b_event_message m WHERE m.EVENT_NAME = :event AND m.ACTIVE = 'Y' "
    "AND (m.LID = :site OR EXISTS (SELECT 1 FROM b_event_message_site s "
    "WHERE s.EVENT_MESSAGE_ID = m.ID AND s.SITE_ID = :site))"
)


def _check_mail_templates(config: Config, problems: list[str], notes: list[str]) -> None:
    """The site sends a queued b_event only if an active template exists for it and the site."""
    if config.notify.backend != "bitrix":
        return
    engine = make_engine(config.database)
    try:
        with engine.connect() as conn:
            for key in ("event_name", "updated_event_name"):
                event = getattr(config.notify, key)
                count = conn.execute(_TEMPLATES, {"event": event,
                                                  "site": config.notify.site_id}).scalar()
                if count:
                    notes.append(f"mail template for {event} on site "
                                 f"{config.notify.site_id} is active")
                else:
                    problems.append(
                        f"notify.{key}: no active mail template for {event} on site "
                        f"{config.notify.site_id}: the site will not send these mails "
                        "(docs/bitrix-setup.md)")
    except SQLAlchemyError:
        notes.append("mail templates not checked: b_event_message is not readable "
                     "(grant SELECT on b_event_message and b_event_message_site to check)")
    finally:
        engine.dispose()


def _check_lis(config: Config, problems: list[str], notes: list[str]) -> None:
    client = make_client(config.lis)
    try:
        client.probe()
        notes.append(f"LIS reachable at {config.lis.base_url}, API key accepted")
    except LisAuthError:
        problems.append("lis.api_key: the LIS refused the API key")
    except LisError as exc:
        problems.append(f"lis.base_url: cannot use the LIS: {exc}")
    finally:
        client.close()


def _check_smtp(config: Config, problems: list[str], notes: list[str]) -> None:
    if config.notify.backend != "smtp" or config.smtp is None:
        return
    from labsync.mail.sender import SmtpSender

    engine = make_engine(config.database)
    try:
        problem = SmtpSender(config.smtp, engine).check()
    finally:
        engine.dispose()
    if problem:
        problems.append(problem)
    else:
        notes.append(f"SMTP server {config.smtp.host}:{config.smtp.port} accepted the login")


def _check_pdf_dir(config: Config, problems: list[str], notes: list[str]) -> None:
    folder = config.pdf.dir
    root = config.site.document_root
    # Checked first: a folder labsync has yet to create inside the web root is as exposed.
    if root is not None and _inside(folder, root):
        problems.append(f"pdf.dir: {folder} is inside the web root {root}: the web server "
                        "could serve the PDFs without the access check; move it outside")
    if not folder.exists():
        parent = _existing_parent(folder)
        if os.access(parent, os.W_OK):
            notes.append(f"pdf.dir {folder} does not exist yet; labsync will create it (0750)")
        else:
            problems.append(f"pdf.dir: {folder} does not exist and {parent} is not writable")
        return
    if not folder.is_dir():
        problems.append(f"pdf.dir: {folder} is not a folder")
        return
    if not os.access(folder, os.W_OK | os.X_OK):
        problems.append(f"pdf.dir: {folder} is not writable by this user")
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & stat.S_IRWXO:
        problems.append(f"pdf.dir: {folder} is accessible to other users (mode {mode:04o}); "
                        "patients' results need 0750")
    if not problems or all(not p.startswith("pdf.dir") for p in problems):
        notes.append(f"pdf.dir {folder} is writable and private")


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
