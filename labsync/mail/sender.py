"""The sender job: hands due outbox mails to the SMTP server, retrying what may yet succeed.

One SMTP connection per batch. Each mail is claimed in a short transaction, sent, and marked
sent in another short transaction right after the server accepted it. A crash between the
two leaves the mail pending: once its claim runs out it is sent again, with the same
Message-ID, so the second copy is recognisably a duplicate (at-least-once delivery).

``classify`` is the one place that decides what an SMTP failure means:

- retry (with backoff: 1 min doubling to 1 h, ±20 %, at most ``MAX_ATTEMPTS`` tries):
  refused, timed-out or dropped connections, 4xx replies;
- fail (never retried): a 5xx reply to the mail itself (recipient, sender or content);
- stop (the batch ends, mails stay pending untouched, sending pauses a few minutes): the
  server refused our login or TLS set-up; that is a configuration problem, not the mail's.

Recipients are patient data: logs show them masked (``a***@example.org``). The password is
never logged.
"""

from __future__ import annotations

import hashlib
import random
import re
import smtplib
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, parseaddr
from functools import partial
from typing import Any

import structlog
from sqlalchemy import Engine

from labsync.clock import utc_now
from labsync.config.smtp import SmtpConfig
from labsync.mail import outbox
from labsync.store.tx import run_tx

log = structlog.get_logger("labsync.mail")

CLAIM = timedelta(minutes=10)  # one mail's send; a sender that died lets go after this
FIRST_RETRY = timedelta(minutes=1)
MAX_RETRY = timedelta(hours=1)
MAX_ATTEMPTS = 30  # with the backoff above: about a day of trying
PAUSE_AFTER_STOP = timedelta(minutes=5)  # after a refused login: do not hammer the account
_EMAIL = re.compile(r"[^@\s<>()\[\],;:\"']+@[^@\s<>()\[\],;:\"']+")




def mask_address(address: str) -> str:
    """``anna@example.org`` → ``a***@example.org``: enough to tell mails apart in a log."""
    local, at, domain = address.strip().rpartition("@")
    if not at or not local:
        return "***"
    return f"{local[0]}***@{domain}"


def mask_text(text: str) -> str:
    """``text`` with every address in it masked (server replies often quote the recipient)."""
    return _EMAIL.sub(lambda m: mask_address(m.group(0)), text)


def retry_delay(attempts: int, *, rng: random.Random | None = None) -> timedelta:
    """How long to wait after the ``attempts``-th failed try: 1 min doubling to 1 h, ±20 %."""
    doublings = min(max(attempts - 1, 0), 10)  # 2**10 min is past the cap already
    base = min(FIRST_RETRY * 2**doublings, MAX_RETRY)
    return base * (rng or random).uniform(0.8, 1.2)


# -- what a failure means -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """``retry``, ``fail`` or ``stop``; ``reason`` is short and holds no full address."""

    action: str
    reason: str
    end_batch: bool = False  # the connection is gone or unusable: leave the rest for later
    check: str | None = None  # for ``stop``: the config keys the operator should look at
    event: str = ""  # for ``stop``: the log event that tells the operator


def classify(exc: BaseException, *, stage: str) -> Verdict:
    """What an exception raised while connecting (``stage="connect"``) or sending one mail
    (``stage="send"``) means for that mail."""
    reason = describe(exc)
    if stage == "connect":
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return Verdict("stop", reason, True, "smtp.username, smtp.password_file",
                           "mail.auth_failed")
        if isinstance(exc, smtplib.SMTPNotSupportedError):  # no STARTTLS, or no AUTH
            return Verdict("stop", reason, True, "smtp.starttls, smtp.ssl, smtp.username",
                           "mail.server_unsupported")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return Verdict("stop", reason, True, "smtp.host, smtp.ca_file", "mail.tls_failed")
        if isinstance(exc, ssl.SSLError) and not isinstance(
                exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return Verdict("stop", reason, True, "smtp.ssl, smtp.starttls, smtp.port",
                           "mail.tls_failed")
        if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPResponseException
                      | OSError):
            return Verdict("retry", reason, True)  # down, busy, or turning us away for now
        # "No suitable authentication method found": the server and labsync share none.
        return Verdict("stop", reason, True, "smtp.username", "mail.auth_failed")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        permanent = bool(codes) and all(500 <= code <= 599 for code in codes)
        return Verdict("fail" if permanent else "retry", reason)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return Verdict("retry", reason, True)
    if isinstance(exc, smtplib.SMTPResponseException):
        if 500 <= exc.smtp_code <= 599:
            return Verdict("fail", reason)
        return Verdict("retry", reason, exc.smtp_code == 421)  # 421: the server is closing
    if isinstance(exc, smtplib.SMTPNotSupportedError):  # an address needs SMTPUTF8
        return Verdict("fail", reason)
    return Verdict("retry", reason, True)  # another SMTPException or OSError: start afresh


def describe(exc: BaseException) -> str:
    """One line about a failure: the SMTP code and reply, or the error; addresses masked."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        text = "; ".join(f"{code} {_reply(msg)}" for code, msg in exc.recipients.values())
        return mask_text(f"recipient refused: {text}")[:500]
    if isinstance(exc, smtplib.SMTPResponseException):
        return mask_text(f"{exc.smtp_code} {_reply(exc.smtp_error)}")[:500]
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return mask_text(f"{type(exc).__name__}: {exc}")[:500]


def _reply(message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return " ".join(text.split())


# -- the message ----------------------------------------------------------------------------


def build_message(row: Any, config: SmtpConfig) -> Message:
    """The MIME message of an outbox row: the same bytes on every attempt (Date is when it
    was queued, Message-ID is the row's, the boundary derives from it)."""
    # The legacy (compat32) API on purpose: Python 3.11's EmailMessage folds a long
    # non-ASCII subject between two encoded words and loses the space there
    # ("по заказу" arrives as "позаказу"); ``Header`` encodes the spaces inside the words.
    text = MIMEText(row.BODY_TEXT, "plain", "utf-8")  # utf-8 bodies go out base64: 7-bit safe
    message: Message
    if row.BODY_HTML:
        # A boundary of its own rather than a random one, so that a re-sent copy is byte for
        # byte the same. "=_" never occurs in base64 text.
        digest = hashlib.sha256(row.MESSAGE_ID.encode("utf-8")).hexdigest()[:24]
        message = MIMEMultipart("alternative", boundary=f"=_labsync_{digest}", _subparts=[
            text, MIMEText(row.BODY_HTML, "html", "utf-8")])
    else:
        message = text
    name, address = parseaddr(config.sender)
    message["From"] = formataddr((name, address), charset="utf-8")
    message["To"] = _one_line(row.RECIPIENT)
    subject = _one_line(row.SUBJECT)
    encoded: Any = subject if subject.isascii() else Header(subject, "utf-8")
    message["Subject"] = encoded
    message["Date"] = format_datetime(row.CREATED_AT.replace(tzinfo=UTC))
    message["Message-ID"] = row.MESSAGE_ID
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to us
    return message


def _one_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a header value holds a line break")
    return value


# -- the job --------------------------------------------------------------------------------

SmtpFactory = Callable[[SmtpConfig, ssl.SSLContext], smtplib.SMTP]


class SmtpSender:
    """Sends due outbox mails; ``send_due`` is the daemon's ``mail`` job and part of
    ``sync-once``."""

    def __init__(self, config: SmtpConfig, engine: Engine, *,
                 now: Callable[[], datetime] = utc_now,
                 smtp_factory: SmtpFactory | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.engine = engine
        self.now = now
        self.smtp_factory = smtp_factory
        self.rng = rng
        self.context = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None)
        self._paused_until: datetime | None = None
        self._last_stop: str | None = None

    def send_due(self, limit: int = 100, *,
                 stop: threading.Event | None = None) -> dict[str, int]:
        """Send up to ``limit`` due mails over one connection; counts of what became of them.

        ``stop`` (the daemon's) ends the batch between two mails. A database failure while
        marking a mail sent propagates (the job logs it): the mail stays claimed and is sent
        again, with the same Message-ID, after ``CLAIM``.
        """
        counts = {"sent": 0, "retried": 0, "failed": 0, "skipped": 0, "stopped": 0}
        now = self.now()
        if self._paused_until is not None and now < self._paused_until:
            return counts
        rows = run_tx(self.engine, partial(outbox.due, now=now, limit=limit), retry=True)
        smtp: smtplib.SMTP | None = None
        try:
            for row in rows:
                if stop is not None and stop.is_set():
                    break
                at = self.now()  # not the batch's start: a long batch must not claim stale
                claimed = run_tx(self.engine, partial(
                    outbox.claim, row_id=row.ID, now=at, until=at + CLAIM), retry=True)
                if not claimed:  # another instance took it meanwhile
                    counts["skipped"] += 1
                    continue
                try:
                    message = build_message(row, self.config)
                except ValueError as exc:  # e.g. a line break inside the stored address
                    self._record(row, Verdict("fail", "cannot build the message: "
                                              + mask_text(str(exc))), counts)
                    continue
                stage = "connect"
                try:
                    if smtp is None:
                        smtp = self._open()
                    stage = "send"
                    smtp.send_message(message, from_addr=self.config.sender_address,
                                      to_addrs=[row.RECIPIENT])
                except (smtplib.SMTPException, OSError) as exc:
                    verdict = classify(exc, stage=stage)
                    self._record(row, verdict, counts)
                    if verdict.end_batch or (smtp is not None and smtp.sock is None):
                        break  # the connection is gone: the rest waits for the next run
                    continue
                run_tx(self.engine, partial(outbox.mark_sent, row_id=row.ID, now=self.now()),
                       retry=True)
                counts["sent"] += 1
                self._last_stop = None
                log.info("mail.sent", outbox_id=row.ID, order=row.EXTERNAL_ORDER_ID,
                         kind=row.KIND, version=row.VERSION, to=mask_address(row.RECIPIENT),
                         message_id=row.MESSAGE_ID, attempt=row.ATTEMPTS + 1)
        finally:
            if smtp is not None:
                _close(smtp)
        if any(counts.values()):
            log.info("mail.batch", **counts)
        return counts

    def check(self) -> str | None:
        """For ``labsync check``: connect, (STARTTLS,) log in and quit; the problem, if any,
        as one line starting with the config key to look at. No mail is sent."""
        try:
            _close(self._open())
        except (smtplib.SMTPException, OSError) as exc:
            verdict = classify(exc, stage="connect")
            key = (verdict.check or "smtp.host").split(",")[0]
            where = f"{self.config.host}:{self.config.port}"
            return f"{key}: SMTP server {where}: {verdict.reason}"
        return None

    # -- inside ---------------------------------------------------------------------------

    def _open(self) -> smtplib.SMTP:
        config = self.config
        if self.smtp_factory is not None:
            smtp = self.smtp_factory(config, self.context)
        elif config.ssl:
            smtp = smtplib.SMTP_SSL(config.host, config.port, timeout=config.timeout,
                                    context=self.context)
        else:
            smtp = smtplib.SMTP(config.host, config.port, timeout=config.timeout)
        try:
            smtp.ehlo()
            if config.starttls:
                smtp.starttls(context=self.context)
                smtp.ehlo()
            if config.username:
                password = config.password.reveal() if config.password else ""
                smtp.login(config.username, password)
        except BaseException:
            _close(smtp)
            raise
        return smtp

    def _record(self, row: Any, verdict: Verdict, counts: dict[str, int]) -> None:
        """Write what one failed try means into the mail's row, and say it once in the log."""
        now = self.now()
        fields: dict[str, Any] = {
            "outbox_id": row.ID, "order": row.EXTERNAL_ORDER_ID, "kind": row.KIND,
            "to": mask_address(row.RECIPIENT), "error": verdict.reason,
        }
        if verdict.action == "stop":
            # Not this mail's fault: give it back untouched and pause sending for a while.
            run_tx(self.engine, lambda conn: outbox.release(
                conn, row.ID, next_attempt_at=row.NEXT_ATTEMPT_AT), retry=True)
            counts["stopped"] += 1
            self._paused_until = now + PAUSE_AFTER_STOP
            event = verdict.event or "mail.stopped"
            if verdict.reason != self._last_stop:
                log.error(event, error=verdict.reason, check=verdict.check,
                          host=self.config.host, port=self.config.port,
                          paused_s=int(PAUSE_AFTER_STOP.total_seconds()))
            else:
                log.debug(event, error=verdict.reason)
            self._last_stop = verdict.reason
            return
        attempts = row.ATTEMPTS + 1
        if verdict.action == "retry" and attempts < MAX_ATTEMPTS:
            next_at = now + retry_delay(attempts, rng=self.rng)
            run_tx(self.engine, lambda conn: outbox.mark_retry(
                conn, row.ID, error=verdict.reason, next_attempt_at=next_at), retry=True)
            counts["retried"] += 1
            log.warning("mail.retry", attempt=attempts, next_attempt_at=next_at.isoformat(
                timespec="seconds"), **fields)
            return
        error = verdict.reason if verdict.action == "fail" else \
            f"gave up after {attempts} attempts: {verdict.reason}"
        run_tx(self.engine, lambda conn: outbox.mark_failed(conn, row.ID, error=error),
               retry=True)
        counts["failed"] += 1
        log.error("mail.rejected" if verdict.action == "fail" else "mail.gave_up",
                  attempt=attempts, **fields)


def _close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
