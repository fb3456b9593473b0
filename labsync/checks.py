"""``labsync check``: every problem an operator can fix before the daemon runs, as a list.

Each line of the report is one finding with one of four verdicts:

- ``ok``: checked, and fine;
- ``warning``: checked, works, but deserves a look (it does not make the check fail);
- ``skipped``: not checked, and why (it does not make the check fail either);
- ``problem``: checked, and labsync will not work right until it is fixed.

Only problems change the exit status (1); warnings and skipped checks leave it 0.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError

from labsync import logs
from labsync.app import built_problems, client_options
from labsync.config import Config
from labsync.errors import ConfigError, LisAuthError, LisError
from labsync.lis.base import capabilities
from labsync.lis.registry import make_client
from labsync.store.db import describe_db_error, detect_text_fitter, make_engine
from labsync.store.tables import BITRIX_TABLES, OWN_TABLES, SITE_TABLES

OK, WARNING, SKIPPED, PROBLEM = "ok", "warning", "skipped", "problem"
VERDICTS = (OK, WARNING, SKIPPED, PROBLEM)


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: a verdict (one of ``VERDICTS``) and what it is about."""

    verdict: str
    text: str


@dataclass
class CheckReport:
    """The findings, in the order they were checked."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, verdict: str, text: str) -> None:
        assert verdict in VERDICTS, verdict
        self.findings.append(Finding(verdict, text))

    def of(self, verdict: str) -> list[str]:
        return [f.text for f in self.findings if f.verdict == verdict]

    @property
    def problems(self) -> list[str]:
        return self.of(PROBLEM)

    @property
    def notes(self) -> list[str]:
        """Everything that is not a problem: ok, warnings, skipped checks."""
        return [f.text for f in self.findings if f.verdict != PROBLEM]


def check_all(config: Config) -> CheckReport:
    """Every check, each finding with its verdict. No problem: labsync can run with this."""
    report = CheckReport()
    report.add(OK, f"config {config.source} is valid")
    _check_database(config, report)
    _check_mail_templates(config, report)
    _check_lis(config, report)
    _check_smtp(config, report)
    _check_pdf_dir(config, report)
    return report


def run_checks(config: Config) -> tuple[list[str], list[str]]:
    """(problems, notes): ``check_all`` without the verdicts of what is not a problem."""
    report = check_all(config)
    return report.problems, report.notes


def _check_database(config: Config, report: CheckReport) -> None:
    engine = make_engine(config.database)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        tables = set(inspect(engine).get_table_names())
        fitter = detect_text_fitter(engine)
    except SQLAlchemyError as exc:
        report.add(PROBLEM, f"database.url: cannot use the database: {describe_db_error(exc)}")
        return
    finally:
        engine.dispose()
    report.add(OK, f"database reachable ({config.database.url.get_backend_name()})")
    for table in (*SITE_TABLES, *OWN_TABLES):
        if table.name not in tables:
            report.add(PROBLEM, f"database: table {table.name} is missing: run "
                                "`labsync init-db`")
    for table in BITRIX_TABLES:
        if table.name not in tables:
            report.add(PROBLEM, f"database: Bitrix table {table.name} is missing: is "
                                "database.url the site's database?")
    charset = fitter.charsets.get(("local_lab_results", "RESULT_VALUE"))
    if charset in ("utf8", "utf8mb3"):
        report.add(WARNING, "local_lab_results is utf8 (3-byte): emoji in results will be "
                            "stored as U+FFFD; converting the table to utf8mb4 keeps them")


_TEMPLATES = text(
    "SELECT COUNT(*) FROM b_event_message m WHERE m.EVENT_NAME = :event AND m.ACTIVE = 'Y' "
    "AND (m.LID = :site OR EXISTS (SELECT 1 FROM b_event_message_site s "
    "WHERE s.EVENT_MESSAGE_ID = m.ID AND s.SITE_ID = :site))"
)


def _check_mail_templates(config: Config, report: CheckReport) -> None:
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
                    report.add(OK, f"mail template for {event} on site "
                                   f"{config.notify.site_id} is active")
                else:
                    report.add(PROBLEM,
                               f"notify.{key}: no active mail template for {event} on site "
                               f"{config.notify.site_id}: the site will not send these mails "
                               "(docs/bitrix-setup.md)")
    except SQLAlchemyError:
        report.add(SKIPPED, "mail templates not checked: b_event_message is not readable "
                            "(grant SELECT on b_event_message and b_event_message_site to "
                            "check)")
    finally:
        engine.dispose()


def _check_lis(config: Config, report: CheckReport) -> None:
    client = make_client(config.lis, **client_options(config))
    can = sorted(c.label for c in capabilities(client))
    report.add(OK, f'adapter "{config.lis.adapter}" can: {", ".join(can)}')
    for problem in built_problems(config, client):
        report.add(PROBLEM, problem)
    own_checks = getattr(client, "check_lines", None)
    if own_checks is not None:
        # An adapter that reaches no remote LIS (HL7's folders and port) says what it
        # checked, one (verdict, text) line each, instead of the probe below.
        try:
            for verdict, text in own_checks():
                report.add(verdict, text)
        finally:
            client.close()
        return
    # An adapter with keys of its own says which one holds its credential (``credential``:
    # lis.fhir.token, lis.mapped.auth_value) and where it reaches its LIS (``location``: a
    # SOAP endpoint from the WSDL, an HL7 drop folder), as (key, text); else the [lis] keys.
    key, what = getattr(client, "credential", None) or config.lis.credential
    where_key, where = getattr(client, "location", None) or ("lis.base_url", config.lis.base_url)
    started = time.monotonic()
    try:
        # The probe's retry lines would land in the middle of the report: held back here,
        # and told in the probe's own line instead.
        with logs.held("labsync.lis") as held:
            client.probe()
    except LisAuthError:
        report.add(PROBLEM, f"{key}: the LIS refused the {what}")
    except LisError as exc:
        report.add(PROBLEM, f"{where_key}: cannot use the LIS at {where}: {exc}"
                            f"{_tries(held, time.monotonic() - started)}")
    else:
        retries = _retries(held)
        if retries:
            report.add(WARNING, f"LIS reachable at {where}, {what} accepted, but only after "
                                f"{len(retries)} failed {_plural(len(retries), 'try', 'tries')}"
                                f" ({'; '.join(dict.fromkeys(retries))})")
        else:
            report.add(OK, f"LIS reachable at {where}, {what} accepted")
    finally:
        client.close()


def _retries(held: list[dict[str, object]]) -> list[str]:
    """What each failed try that was retried said (``lis.retry`` lines)."""
    return [str(e.get("detail") or e.get("error") or "failed")
            for e in held if e.get("event") == "lis.retry"]


def _tries(held: list[dict[str, object]], seconds: float) -> str:
    retries = len(_retries(held))
    return f" ({retries + 1} tries in {seconds:.1f} s)" if retries else ""


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _check_smtp(config: Config, report: CheckReport) -> None:
    if config.notify.backend != "smtp" or config.smtp is None:
        return
    from labsync.config.smtp import DEFAULT_LANGUAGE, is_loopback
    from labsync.mail.sender import SmtpSender
    from labsync.mail.templates import MailTemplates

    smtp = config.smtp
    # The set the daemon will render from (the config checks only that its folder exists;
    # the notifier refuses to start on a template that does not render): the line says
    # which one it is.
    if smtp.uses_builtin_templates:
        which = (f"the built-in templates (smtp.language = "
                 f"\"{smtp.language or DEFAULT_LANGUAGE}\") in {smtp.templates}")
    else:
        which = f"the templates in {smtp.templates} (smtp.templates)"
    try:
        MailTemplates(smtp.templates).validate()
    except ConfigError as exc:
        for template_problem in exc.problems:
            report.add(PROBLEM, template_problem)
    else:
        report.add(OK, f"mail: {which} render with sample values")
    if not smtp.uses_builtin_templates and smtp.language is not None:
        report.add(WARNING, f"smtp.language = \"{smtp.language}\" has no effect: smtp.templates "
                            "is set, and its folder's templates are sent as they are")

    engine = make_engine(config.database)
    try:
        problem = SmtpSender(smtp, engine).check()
    finally:
        engine.dispose()
    where = f"{smtp.host}:{smtp.port}"
    tls = "TLS" if smtp.ssl else "STARTTLS" if smtp.starttls else "no TLS"
    if problem:
        report.add(PROBLEM, problem)
    elif smtp.username:
        report.add(OK, f"SMTP server {where} ({tls}) accepted the login as {smtp.username}")
    else:
        report.add(OK, f"SMTP server {where} answered ({tls}; no login, smtp.username is "
                       "not set; no mail was sent)")
    if not problem and not (smtp.ssl or smtp.starttls) and not is_loopback(smtp.host):
        report.add(WARNING, f"smtp.starttls: the mail to {where} crosses the network "
                            "unencrypted; set smtp.starttls = true or smtp.ssl = true if the "
                            "server offers it")


def _check_pdf_dir(config: Config, report: CheckReport) -> None:
    folder = config.pdf.dir
    root = config.site.document_root
    found = len(report.problems)
    # Checked first: a folder labsync has yet to create inside the web root is as exposed.
    if root is not None and _inside(folder, root):
        report.add(PROBLEM, f"pdf.dir: {folder} is inside the web root {root}: the web server "
                            "could serve the PDFs without the access check; move it outside")
    if not folder.exists():
        parent = _existing_parent(folder)
        if os.access(parent, os.W_OK):
            report.add(OK, f"pdf.dir {folder} does not exist yet; labsync will create it "
                           "(0750)")
        else:
            report.add(PROBLEM, f"pdf.dir: {folder} does not exist and {parent} is not "
                                "writable")
        return
    if not folder.is_dir():
        report.add(PROBLEM, f"pdf.dir: {folder} is not a folder")
        return
    if not os.access(folder, os.W_OK | os.X_OK):
        report.add(PROBLEM, f"pdf.dir: {folder} is not writable by this user")
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & stat.S_IRWXO:
        report.add(PROBLEM, f"pdf.dir: {folder} is accessible to other users (mode "
                            f"{mode:04o}); patients' results need 0750")
    if len(report.problems) == found:
        report.add(OK, f"pdf.dir {folder} is writable and private")


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
