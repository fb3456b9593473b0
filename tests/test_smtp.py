"""notify.backend = "smtp": templates, the outbox, and delivery to a real SMTP server.

The server is aiosmtpd on localhost (scripted to defer, refuse or accept), a raw socket that
drops every connection, or a port nobody listens on. The clock is controlled; nothing sleeps.
"""

from __future__ import annotations

import email
import ipaddress
import random
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy import create_engine, select, update

from labsync import config as config_mod
from labsync.app import open_app
from labsync.checks import check_all
from labsync.config import NotifyConfig, Secret
from labsync.config.smtp import BUILTIN_TEMPLATES, SmtpConfig, smtp_config_from
from labsync.errors import ConfigError
from labsync.mail import SmtpNotifier, outbox
from labsync.mail.sender import (
    CLAIM,
    MAX_ATTEMPTS,
    PAUSE_AFTER_STOP,
    SmtpSender,
    classify,
    mask_address,
    mask_text,
    retry_delay,
)
from labsync.mail.templates import SAMPLE, MailTemplates
from labsync.store.tables import labsync_outbox
from tests.conftest import Db, add_order, add_user, make_config

ROOT = Path(__file__).resolve().parent.parent
RU = BUILTIN_TEMPLATES / "ru"  # the templates labsync ships, as an installed labsync has them
EN = BUILTIN_TEMPLATES / "en"
MOSCOW = ZoneInfo("Europe/Moscow")
NOW_SITE = datetime(2026, 11, 20, 12, 0, 0)  # Moscow; 09:00 UTC
START = datetime(2026, 11, 20, 9, 0, 5)  # UTC, naive, as labsync's own tables hold it
PASSWORD = "correct-horse-battery-9"


# -- a real SMTP server, scripted ----------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    @property
    def message(self) -> EmailMessage:
        message = email.message_from_bytes(self.content, policy=default_policy)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class Mailbox:
    """An aiosmtpd handler: accepts mail and keeps it, after any scripted refusals."""

    data_replies: list[str] = field(default_factory=list)  # answers to DATA before accepting
    refuse: dict[str, str] = field(default_factory=dict)  # recipient → answer to RCPT
    accepted: list[Received] = field(default_factory=list)
    rcpt_calls: list[str] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        self.rcpt_calls.append(address)
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        self.accepted.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.content))
        return "250 Message accepted for delivery"


class Authenticator:
    """Accepts one login/password pair (or none while ``accept`` is false); counts tries."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.tries: list[tuple[str, str]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.tries.append((login, password))
        ok = self.accept and (login, password) == ("lab", PASSWORD)
        return AuthResult(success=ok, handled=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def smtp_server(handler: Mailbox, **kwargs: Any) -> Iterator[Controller]:
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


class DroppingServer:
    """Accepts TCP connections and closes them at once, before any greeting."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.close()
            self.dropped += 1

    def __enter__(self) -> DroppingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class Clock:
    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


# -- labsync's side ------------------------------------------------------------------------


def smtp_config(port: int, **changes: Any) -> SmtpConfig:
    config = SmtpConfig(host="127.0.0.1", port=port, sender="Лаборатория <lab@example.ru>",
                        site_url="https://lab.example.ru", starttls=False, templates=RU,
                        timeout=5)
    return replace(config, **changes)


def notifier(config: SmtpConfig | None = None, templates: Path = RU) -> SmtpNotifier:
    config = replace(config or smtp_config(25), templates=templates)
    return SmtpNotifier(NotifyConfig(), config, zone=MOSCOW)


def sender(db: Db, config: SmtpConfig, clock: Clock) -> SmtpSender:
    return SmtpSender(config, db.engine, now=clock, rng=random.Random(7))


def queue_ready(db: Db, note: SmtpNotifier, external_id: str, user_id: int) -> Any:
    order_id = add_order(db, external_id, user_id, status="completed")
    with db.engine.begin() as conn:
        return note.order_ready(conn, order_id=order_id, external_id=external_id,
                                user_id=user_id, now_site=NOW_SITE)


def outbox_rows(db: Db) -> list[Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(select(labsync_outbox).order_by(labsync_outbox.c.ID)))


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def logged_text(logs: Sequence[Mapping[str, Any]]) -> str:
    return repr(logs)


# -- delivery ------------------------------------------------------------------------------


def test_ready_mail_arrives_with_recipient_subject_and_bodies(db: Db) -> None:
    add_user(db, 7, email="anna.ivanova@example.org", name="Анна", last_name="Иванова")
    decision = queue_ready(db, notifier(), "QL-1001", 7)
    row = outbox_rows(db)[0]
    assert decision.state == "queued" and decision.event_id == row.ID
    box, clock = Mailbox(), Clock()
    with smtp_server(box) as server:
        counts = sender(db, smtp_config(server.port), clock).send_due()

    assert counts["sent"] == 1
    [mail] = box.accepted
    assert mail.mail_from == "lab@example.ru"
    assert mail.rcpt_tos == ["anna.ivanova@example.org"]
    message = mail.message
    assert message["To"] == "anna.ivanova@example.org"
    assert message["From"].addresses[0].display_name == "Лаборатория"
    assert message["Subject"] == "Результаты анализов по заказу QL-1001 готовы"
    assert b"\xd0" not in mail.content.split(b"\r\n\r\n", 1)[0]  # headers are 7-bit encoded
    assert message["Message-ID"] == f"<labsync.{row.ORDER_ID}.ready.1@example.ru>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "multipart/alternative"
    text, html = parts(message)
    assert "Здравствуйте, Анна!" in text
    assert f"https://lab.example.ru/personal/lab-results/{row.ORDER_ID}/" in text
    assert f'href="https://lab.example.ru/personal/lab-results/{row.ORDER_ID}/"' in html
    plain = message.get_body(("plain",))
    assert plain is not None and plain.get_content_charset() == "utf-8"
    sent = outbox_rows(db)[0]
    assert (sent.STATE, sent.ATTEMPTS, sent.SENT_AT) == ("sent", 1, START)


def test_html_body_escapes_the_name_and_the_text_body_keeps_it(db: Db) -> None:
    add_user(db, 8, name="<script>alert(1)</script>", last_name="O'Neil & Co")
    queue_ready(db, notifier(), "QL-1002", 8)
    box = Mailbox()
    with smtp_server(box) as server:
        sender(db, smtp_config(server.port), Clock()).send_due()
    text, html = parts(box.accepted[0].message)
    assert "Здравствуйте, <script>alert(1)</script>!" in text
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_updated_mail_names_the_version(db: Db) -> None:
    add_user(db, 9)
    order_id = add_order(db, "QL-1003", 9, status="completed")
    note = notifier()
    with db.engine.begin() as conn:
        decision = note.order_updated(conn, order_id=order_id, external_id="QL-1003",
                                      user_id=9, version=3, now_site=NOW_SITE)
    assert decision.state == "queued"
    box = Mailbox()
    with smtp_server(box) as server:
        sender(db, smtp_config(server.port), Clock()).send_due()
    message = box.accepted[0].message
    assert message["Subject"] == "Результаты анализов по заказу QL-1003 обновлены"
    assert message["Message-ID"] == f"<labsync.{order_id}.updated.3@example.ru>"
    assert "(редакция 3)" in parts(message)[0]


def test_english_templates_send_an_english_mail(db: Db) -> None:
    add_user(db, 10, name="Anna")
    queue_ready(db, notifier(templates=EN), "QL-1004", 10)
    box = Mailbox()
    with smtp_server(box) as server:
        sender(db, smtp_config(server.port), Clock()).send_due()
    message = box.accepted[0].message
    assert message["Subject"] == "Your lab results for order QL-1004 are ready"
    assert "Dear Anna," in parts(message)[0]


# -- queueing ------------------------------------------------------------------------------


def test_queueing_is_idempotent_per_order_kind_and_version(db: Db) -> None:
    add_user(db, 11)
    order_id = add_order(db, "QL-1101", 11, status="completed")
    note = notifier()
    decisions = []
    for kind, version in (("ready", 1), ("ready", 1), ("updated", 2), ("updated", 2),
                          ("updated", 3)):
        with db.engine.begin() as conn:
            if kind == "ready":
                decisions.append(note.order_ready(conn, order_id=order_id,
                                                  external_id="QL-1101", user_id=11,
                                                  now_site=NOW_SITE))
            else:
                decisions.append(note.order_updated(conn, order_id=order_id,
                                                    external_id="QL-1101", user_id=11,
                                                    version=version, now_site=NOW_SITE))
    rows = outbox_rows(db)
    assert [(r.KIND, r.VERSION) for r in rows] == [("ready", 1), ("updated", 2), ("updated", 3)]
    assert [d.state for d in decisions] == [
        "queued", "already_queued", "queued", "already_queued", "queued"]
    assert decisions[1].event_id == decisions[0].event_id == rows[0].ID
    assert len({r.MESSAGE_ID for r in rows}) == 3
    assert rows[0].CREATED_AT == datetime(2026, 11, 20, 9, 0, 0)  # site time back to UTC


def test_the_mail_is_rolled_back_with_the_callers_transaction(db: Db) -> None:
    add_user(db, 12)
    order_id = add_order(db, "QL-1201", 12, status="completed")
    with db.engine.connect() as conn:
        transaction = conn.begin()
        decision = notifier().order_ready(conn, order_id=order_id, external_id="QL-1201",
                                          user_id=12, now_site=NOW_SITE)
        assert decision.event_id is not None
        transaction.rollback()
    assert outbox_rows(db) == []


@pytest.mark.parametrize(("user", "state"), [
    ({"email": None}, "no_email"), ({"email": "  "}, "no_email"),
    ({"active": "N"}, "inactive"), (None, "no_user"),
])
def test_a_user_who_cannot_receive_mail_gets_none_queued(db: Db, user: Any, state: str) -> None:
    if user is not None:
        add_user(db, 13, **user)
    decision = queue_ready(db, notifier(), "QL-1301", 13)
    assert (decision.state, decision.event_id) == (state, None)
    assert outbox_rows(db) == []


# -- failures and retries ------------------------------------------------------------------


def test_a_deferral_is_retried_with_backoff_and_then_delivered(db: Db) -> None:
    add_user(db, 20)
    queue_ready(db, notifier(), "QL-2001", 20)
    box, clock = Mailbox(data_replies=["451 4.3.0 try again later"]), Clock()
    with smtp_server(box) as server:
        job = sender(db, smtp_config(server.port), clock)
        assert job.send_due()["retried"] == 1
        row = outbox_rows(db)[0]
        assert (row.STATE, row.ATTEMPTS) == ("pending", 1)
        assert row.LAST_ERROR == "451 4.3.0 try again later"
        wait = row.NEXT_ATTEMPT_AT - START
        assert timedelta(seconds=47) <= wait <= timedelta(seconds=72)  # 1 min ± 20 %

        clock.advance(timedelta(seconds=30))
        assert job.send_due()["sent"] == 0  # not yet due: nothing is even tried
        clock.advance(timedelta(minutes=2))
        assert job.send_due()["sent"] == 1
    assert len(box.accepted) == 1
    row = outbox_rows(db)[0]
    assert (row.STATE, row.ATTEMPTS) == ("sent", 2)


def test_a_refused_connection_is_retried(db: Db) -> None:
    add_user(db, 21)
    queue_ready(db, notifier(), "QL-2101", 21)
    clock = Clock()
    counts = sender(db, smtp_config(free_port()), clock).send_due()
    assert counts["retried"] == 1
    row = outbox_rows(db)[0]
    assert (row.STATE, row.ATTEMPTS) == ("pending", 1)
    assert "ConnectionRefusedError" in row.LAST_ERROR
    assert row.NEXT_ATTEMPT_AT > START


def test_a_dropped_connection_is_retried_and_delivered_later(db: Db) -> None:
    add_user(db, 22)
    queue_ready(db, notifier(), "QL-2201", 22)
    queue_ready(db, notifier(), "QL-2202", 22)
    clock = Clock()
    with DroppingServer() as dropping:
        counts = sender(db, smtp_config(dropping.port), clock).send_due()
    # The connection is gone: one mail is charged with the failure, the other waits untried.
    assert (counts["retried"], counts["sent"]) == (1, 0)
    first, second = outbox_rows(db)
    assert "SMTPServerDisconnected" in first.LAST_ERROR and first.ATTEMPTS == 1
    assert (second.ATTEMPTS, second.NEXT_ATTEMPT_AT) == (0, None)

    box = Mailbox()
    clock.advance(timedelta(minutes=5))
    with smtp_server(box) as server:
        assert sender(db, smtp_config(server.port), clock).send_due()["sent"] == 2
    assert sorted(m.message["Subject"].split()[4] for m in box.accepted) == ["QL-2201",
                                                                              "QL-2202"]


def test_a_permanent_rejection_fails_once_and_is_never_retried(db: Db) -> None:
    add_user(db, 23, email="nobody@example.org")
    add_user(db, 24, email="somebody@example.org")
    queue_ready(db, notifier(), "QL-2301", 23)
    queue_ready(db, notifier(), "QL-2302", 24)
    box, clock = Mailbox(refuse={"nobody@example.org": "550 5.1.1 <nobody@example.org>: "
                                                        "no such user"}), Clock()
    with smtp_server(box) as server, structlog.testing.capture_logs() as logs:
        job = sender(db, smtp_config(server.port), clock)
        counts = job.send_due()
        clock.advance(timedelta(days=2))
        later = job.send_due()
    assert (counts["failed"], counts["sent"]) == (1, 1)  # the batch went on after the refusal
    assert later == {"sent": 0, "retried": 0, "failed": 0, "skipped": 0, "stopped": 0}
    assert box.rcpt_calls.count("nobody@example.org") == 1
    rejected, delivered = outbox_rows(db)
    assert (rejected.STATE, rejected.ATTEMPTS) == ("failed", 1)
    assert rejected.LAST_ERROR.startswith("recipient refused: 550 5.1.1")
    assert delivered.STATE == "sent"
    assert [e["event"] for e in logs].count("mail.rejected") == 1
    assert "nobody@example.org" not in logged_text(logs)  # patient data, masked
    assert "n***@example.org" in logged_text(logs)


def test_a_mail_is_failed_when_its_attempts_run_out(db: Db) -> None:
    add_user(db, 25)
    queue_ready(db, notifier(), "QL-2501", 25)
    with db.engine.begin() as conn:
        conn.execute(update(labsync_outbox).values(ATTEMPTS=MAX_ATTEMPTS - 1))
    box = Mailbox(data_replies=["452 4.2.2 mailbox full"])
    with smtp_server(box) as server:
        assert sender(db, smtp_config(server.port), Clock()).send_due()["failed"] == 1
    row = outbox_rows(db)[0]
    assert row.STATE == "failed"
    assert row.LAST_ERROR == f"gave up after {MAX_ATTEMPTS} attempts: 452 4.2.2 mailbox full"


class Crash(Exception):
    """The process dying between the server's 250 and the database's commit."""


def test_a_crash_before_marking_sent_resends_the_same_message(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    add_user(db, 26)
    queue_ready(db, notifier(), "QL-2601", 26)
    box, clock = Mailbox(), Clock()

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise Crash

    with smtp_server(box) as server:
        config = smtp_config(server.port)
        monkeypatch.setattr(outbox, "mark_sent", crash)
        with pytest.raises(Crash):
            sender(db, config, clock).send_due()
        monkeypatch.undo()
        assert len(box.accepted) == 1
        row = outbox_rows(db)[0]
        assert (row.STATE, row.ATTEMPTS) == ("pending", 0)

        restarted = sender(db, config, clock)  # a new process: nothing remembered
        assert restarted.send_due()["sent"] == 0  # the claim still holds
        clock.advance(CLAIM + timedelta(seconds=1))
        assert restarted.send_due()["sent"] == 1
    first, second = box.accepted
    assert first.message["Message-ID"] == second.message["Message-ID"] == row.MESSAGE_ID
    assert first.content == second.content  # the same message, byte for byte: a duplicate
    assert outbox_rows(db)[0].STATE == "sent"


def test_a_mail_claimed_by_another_sender_is_not_sent_twice(db: Db) -> None:
    add_user(db, 27)
    queue_ready(db, notifier(), "QL-2701", 27)
    row_id = outbox_rows(db)[0].ID
    with db.engine.begin() as conn:
        assert outbox.claim(conn, row_id, now=START, until=START + CLAIM)
    with db.engine.begin() as conn:
        assert not outbox.claim(conn, row_id, now=START, until=START + CLAIM)
    box = Mailbox()
    with smtp_server(box) as server:
        assert sender(db, smtp_config(server.port), Clock()).send_due()["sent"] == 0
    assert box.accepted == []


def test_a_refused_login_stops_the_batch_and_leaves_mail_pending(db: Db) -> None:
    add_user(db, 28)
    add_user(db, 29, email="second@example.org")
    queue_ready(db, notifier(), "QL-2801", 28)
    queue_ready(db, notifier(), "QL-2802", 29)
    box, auth, clock = Mailbox(), Authenticator(accept=False), Clock()
    with smtp_server(box, authenticator=auth, auth_require_tls=False) as server, \
            structlog.testing.capture_logs() as logs:
        config = smtp_config(server.port, username="lab", password=Secret(PASSWORD))
        job = sender(db, config, clock)
        counts = job.send_due()
        tries = len(auth.tries)  # smtplib tries each mechanism both ends know: PLAIN, LOGIN
        assert job.send_due()["stopped"] == 0  # paused: the account is not hammered
        assert len(auth.tries) == tries

        auth.accept = True  # the operator fixed the password
        clock.advance(PAUSE_AFTER_STOP + timedelta(seconds=1))
        assert job.send_due()["sent"] == 2
    assert counts == {"sent": 0, "retried": 0, "failed": 0, "skipped": 0, "stopped": 1}
    failures = [e for e in logs if e["event"] == "mail.auth_failed"]
    assert len(failures) == 1
    assert "smtp.username" in failures[0]["check"]
    assert "smtp.password_file" in failures[0]["check"]
    assert PASSWORD not in logged_text(logs)
    assert [r.ATTEMPTS for r in outbox_rows(db)] == [1, 1]  # the refusal cost them nothing


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    return cert, key


def tls_server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def test_starttls_and_login_deliver_the_mail(db: Db, certificate: tuple[Path, Path]) -> None:
    add_user(db, 30)
    queue_ready(db, notifier(), "QL-3001", 30)
    box, auth = Mailbox(), Authenticator()
    with smtp_server(box, tls_context=tls_server_context(certificate), require_starttls=True,
                     authenticator=auth) as server:
        config = smtp_config(server.port, starttls=True, ca_file=certificate[0],
                             username="lab", password=Secret(PASSWORD))
        assert sender(db, config, Clock()).send_due()["sent"] == 1
    assert auth.tries == [("lab", PASSWORD)]
    assert len(box.accepted) == 1


def test_an_untrusted_certificate_stops_sending(db: Db, certificate: tuple[Path, Path]) -> None:
    add_user(db, 31)
    queue_ready(db, notifier(), "QL-3101", 31)
    box = Mailbox()
    with smtp_server(box, tls_context=tls_server_context(certificate),
                     require_starttls=True) as server, \
            structlog.testing.capture_logs() as logs:
        counts = sender(db, smtp_config(server.port, starttls=True), Clock()).send_due()
    assert counts["stopped"] == 1
    assert [e["check"] for e in logs if e["event"] == "mail.tls_failed"] == [
        "smtp.host, smtp.ca_file"]
    row = outbox_rows(db)[0]
    assert (row.STATE, row.ATTEMPTS, row.NEXT_ATTEMPT_AT) == ("pending", 0, None)


def test_check_reaches_the_server_and_names_the_key_to_fix() -> None:
    engine = create_engine("sqlite://")  # check() never touches the database
    auth = Authenticator()
    with smtp_server(Mailbox(), authenticator=auth, auth_require_tls=False) as server:
        good = smtp_config(server.port, username="lab", password=Secret(PASSWORD))
        assert SmtpSender(good, engine).check() is None
        wrong = replace(good, password=Secret("wrong-password"))
        problem = SmtpSender(wrong, engine).check()
        assert problem is not None and problem.startswith("smtp.username: SMTP server")
        assert "535" in problem and "wrong-password" not in problem
    problem = SmtpSender(smtp_config(free_port()), engine).check()
    assert problem is not None and problem.startswith("smtp.host: SMTP server 127.0.0.1:")


def test_a_stopping_daemon_ends_the_batch_between_mails(db: Db) -> None:
    add_user(db, 32)
    queue_ready(db, notifier(), "QL-3201", 32)
    stop = threading.Event()
    stop.set()
    with smtp_server(Mailbox()) as server:
        counts = sender(db, smtp_config(server.port), Clock()).send_due(stop=stop)
    assert counts["sent"] == 0
    assert outbox_rows(db)[0].NEXT_ATTEMPT_AT is None  # not even claimed


@pytest.mark.parametrize(("exc", "stage", "action", "end_batch"), [
    (smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"no such user")}), "send", "fail", False),
    (smtplib.SMTPRecipientsRefused({"a@b.c": (450, b"greylisted")}), "send", "retry", False),
    (smtplib.SMTPSenderRefused(553, b"not your address", "lab@example.ru"), "send", "fail",
     False),
    (smtplib.SMTPDataError(554, b"spam"), "send", "fail", False),
    (smtplib.SMTPDataError(451, b"later"), "send", "retry", False),
    (smtplib.SMTPResponseException(421, b"closing"), "send", "retry", True),
    (smtplib.SMTPServerDisconnected("gone"), "send", "retry", True),
    (TimeoutError("timed out"), "send", "retry", True),
    (ConnectionRefusedError(111, "Connection refused"), "connect", "retry", True),
    (smtplib.SMTPConnectError(554, b"go away"), "connect", "retry", True),
    (smtplib.SMTPAuthenticationError(535, b"bad credentials"), "connect", "stop", True),
    (smtplib.SMTPNotSupportedError("STARTTLS extension not supported"), "connect", "stop",
     True),
])
def test_classify_says_what_an_smtp_failure_means(exc: BaseException, stage: str, action: str,
                                                  end_batch: bool) -> None:
    verdict = classify(exc, stage=stage)
    assert (verdict.action, verdict.end_batch) == (action, end_batch)
    assert "a@b.c" not in verdict.reason


def test_backoff_doubles_from_a_minute_to_an_hour() -> None:
    rng = random.Random(3)
    for attempts, base in ((1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (29, 3600)):
        delay = retry_delay(attempts, rng=rng).total_seconds()
        assert base * 0.8 <= delay <= base * 1.2


def test_addresses_are_masked() -> None:
    assert mask_address("anna.ivanova@example.org") == "a***@example.org"
    assert mask_address("not an address") == "***"
    assert mask_text("550 <anna@example.org>: no such user") == (
        "550 <a***@example.org>: no such user")


# -- templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(("folder", "ready", "updated"), [
    (RU, "Результаты анализов по заказу QL-1 готовы",
     "Результаты анализов по заказу QL-1 обновлены"),
    (EN, "Your lab results for order QL-1 are ready",
     "Your lab results for order QL-1 have been updated"),
])
def test_both_sample_sets_validate_and_render(folder: Path, ready: str, updated: str) -> None:
    templates = MailTemplates(folder)
    templates.validate()
    context = dict(SAMPLE, ORDER_ID="QL-1", VERSION=4)
    for kind, subject in (("ready", ready), ("updated", updated)):
        mail = templates.render(kind, context)
        assert mail.subject == subject
        for body in (mail.text, mail.html):
            assert "QL-1" in body and context["RESULT_URL"] in body
            assert "{{" not in body and "{%" not in body
    assert "4" in templates.render("updated", context).text
    nameless = templates.render("ready", dict(context, NAME="")).text
    assert ", !" not in nameless and ",!" not in nameless


def copy_templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    shutil.copytree(RU, folder)
    return folder


def test_an_undefined_variable_is_a_startup_error_naming_file_and_variable(
        tmp_path: Path) -> None:
    folder = copy_templates(tmp_path)
    # Used only in a branch a sample might never take: found all the same.
    (folder / "ready.txt.j2").write_text(
        "Hello\n{% if VERSION > 99 %}{{ PATIENT_NAME }}{% endif %}\n", encoding="utf-8")
    (folder / "updated.subject.j2").write_text("{% if %}\n", encoding="utf-8")
    (folder / "updated.html.j2").unlink()
    with pytest.raises(ConfigError) as caught:
        MailTemplates(folder).validate()
    problems = caught.value.problems
    assert len(problems) == 3
    assert all(p.startswith("smtp.templates: ") for p in problems)
    assert f"{folder / 'ready.txt.j2'}:2: 'PATIENT_NAME' is undefined" in problems[0]
    assert f"{folder / 'updated.subject.j2'}:1:" in problems[1]
    assert problems[2] == f"smtp.templates: {folder / 'updated.html.j2'}: missing"


def test_a_notifier_refuses_to_start_with_a_broken_template(tmp_path: Path) -> None:
    folder = copy_templates(tmp_path)
    (folder / "updated.html.j2").write_text("<p>{{ NAME.first }}</p>\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"updated\.html\.j2:1: .*has no attribute 'first'"):
        notifier(templates=folder)


def test_the_subject_is_always_one_line() -> None:
    mail = MailTemplates(RU).render("ready", dict(SAMPLE, ORDER_ID="QL-1\r\nBcc: x@evil.test"))
    assert "\n" not in mail.subject and "\r" not in mail.subject


def test_html_is_autoescaped_and_text_is_not() -> None:
    mail = MailTemplates(RU).render("ready", dict(SAMPLE, NAME='<b>"Анна"</b>'))
    assert '<b>"Анна"</b>' in mail.text
    assert "&lt;b&gt;&#34;Анна&#34;&lt;/b&gt;" in mail.html


# -- [smtp] configuration ------------------------------------------------------------------


def test_a_full_smtp_section_is_validated_and_frozen(tmp_path: Path) -> None:
    password_file = tmp_path / "smtp_password"
    password_file.write_text(f"  {PASSWORD}\n", encoding="utf-8")
    config, problems = smtp_config_from({
        "host": "${SMTP_HOST}", "port": 587, "from": "Лаборатория <lab@example.ru>",
        "starttls": True, "username": "lab", "password_file": str(password_file),
        "templates": str(EN), "site_url": "https://lab.example.ru/", "timeout": 10,
    }, {"SMTP_HOST": "smtp.example.ru"})
    assert problems == []
    assert config is not None
    assert (config.host, config.port, config.starttls, config.ssl) == (
        "smtp.example.ru", 587, True, False)
    assert config.password is not None and config.password.reveal() == PASSWORD
    assert PASSWORD not in repr(config)
    assert (config.sender_address, config.message_id_domain) == ("lab@example.ru", "example.ru")
    assert config.site_url == "https://lab.example.ru"
    assert config.templates == EN
    with pytest.raises(AttributeError):
        config.host = "other"  # type: ignore[misc]


def test_ssl_defaults_to_port_465_without_starttls() -> None:
    config, problems = smtp_config_from({"host": "smtp.example.ru", "from": "lab@example.ru",
                                         "ssl": True, "site_url": "https://lab.example.ru",
                                         "templates": str(RU)}, {})
    assert problems == []
    assert config is not None and (config.port, config.starttls, config.ssl) == (465, False, True)


def test_every_smtp_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    config, problems = smtp_config_from({
        "host": "", "from": "Laboratory", "port": 70000, "starttls": True, "ssl": True,
        "username": "lab", "password_file": str(tmp_path / "missing"),
        "templates": str(tmp_path / "nowhere"), "site_url": "lab.example.ru", "timeout": 0,
        "colour": "blue",
    }, {})
    assert config is None
    keys = sorted(p.split(":", 1)[0] for p in problems)
    assert keys == sorted([
        "smtp.colour", "smtp.host", "smtp.from", "smtp.port", "smtp.starttls",
        "smtp.password_file", "smtp.templates", "smtp.site_url", "smtp.timeout",
    ])
    assert any("cannot read" in p for p in problems if p.startswith("smtp.password_file"))


def test_a_template_that_does_not_render_stops_labsync_at_start_up_and_fails_check(
        db: Db, fake_lis: Any, tmp_path: Path) -> None:
    folder = copy_templates(tmp_path)
    (folder / "ready.subject.j2").write_text("{{ ORDER }}\n", encoding="utf-8")
    smtp = {"host": "127.0.0.1", "port": 1, "from": "lab@example.ru", "starttls": False,
            "site_url": "https://lab.example.ru", "templates": str(folder)}
    # The config layer checks only that the folder exists: rendering is the mail package's.
    _, problems = smtp_config_from(smtp, {})
    assert problems == []
    config = make_config(db, fake_lis, tmp_path / "p", notify={"backend": "smtp"}, smtp=smtp)
    # Building labsync (every command that syncs) refuses it as a config error.
    with pytest.raises(ConfigError) as caught, open_app(config):
        pass
    problems = caught.value.problems
    assert len(problems) == 1 and "ready.subject.j2:1: 'ORDER' is undefined" in problems[0]
    # And `labsync check` says the same.
    assert [f.text for f in check_all(config).findings if f.verdict == "problem"
            and f.text.startswith("smtp.templates: ")] == problems


def test_a_password_is_not_sent_unencrypted_to_another_host(tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD, encoding="utf-8")
    base = {"from": "lab@example.ru", "site_url": "https://lab.example.ru",
            "templates": str(RU), "starttls": False, "username": "lab",
            "password_file": str(password_file)}
    _, problems = smtp_config_from({**base, "host": "smtp.example.ru"}, {})
    assert [p.split(":", 1)[0] for p in problems] == ["smtp.username"]
    config, problems = smtp_config_from({**base, "host": "127.0.0.1"}, {})
    assert problems == [] and config is not None


def test_an_absent_smtp_section_is_a_problem_only_when_smtp_is_the_backend() -> None:
    assert smtp_config_from({}, {}) == (None, [])
    _, problems = smtp_config_from({}, {}, required=True)
    assert problems and problems[0].startswith("smtp.host: required")
    _, problems = smtp_config_from({"host": "${NOPE}", "from": "lab@example.ru",
                                    "site_url": "https://x.ru", "templates": str(RU)}, {})
    assert problems == ["smtp.host: environment variable NOPE is not set"]


# -- the templates an installed labsync ships ---------------------------------------------

MINIMAL = {"host": "smtp.example.ru", "from": "lab@example.ru",
           "site_url": "https://lab.example.ru"}


def test_without_smtp_templates_the_built_in_russian_templates_are_used() -> None:
    config, problems = smtp_config_from(MINIMAL, {})
    assert problems == []
    assert config is not None
    assert (config.templates, config.language, config.uses_builtin_templates) == (RU, None, True)
    assert MailTemplates(config.templates).render("ready", SAMPLE).subject.startswith(
        "Результаты анализов")


def test_smtp_language_en_chooses_the_built_in_english_templates() -> None:
    config, problems = smtp_config_from({**MINIMAL, "language": "en"}, {})
    assert problems == []
    assert config is not None and (config.templates, config.language) == (EN, "en")
    assert MailTemplates(config.templates).render("ready", SAMPLE).subject.startswith(
        "Your lab results")


@pytest.mark.parametrize("language", ["de", "RU", 5, ""])
def test_an_unknown_smtp_language_is_a_problem_naming_the_key(language: Any) -> None:
    config, problems = smtp_config_from({**MINIMAL, "language": language}, {})
    assert config is None
    assert problems == [f"smtp.language: must be 'ru' or 'en' (the language of the built-in "
                        f"templates), not {language!r}"]


def test_smtp_templates_still_overrides_the_built_in_set(tmp_path: Path) -> None:
    folder = copy_templates(tmp_path)
    (folder / "ready.subject.j2").write_text("Анализы {{ ORDER_ID }}\n", encoding="utf-8")
    config, problems = smtp_config_from({**MINIMAL, "templates": str(folder)}, {})
    assert problems == []
    assert config is not None
    assert (config.templates, config.uses_builtin_templates) == (folder, False)
    assert MailTemplates(config.templates).render("ready", SAMPLE).subject == (
        "Анализы QL-2026-000123")


def test_a_missing_smtp_templates_folder_says_how_to_use_the_built_in_ones(
        tmp_path: Path) -> None:
    _, problems = smtp_config_from({**MINIMAL, "templates": str(tmp_path / "nowhere")}, {})
    [problem] = problems
    assert problem.startswith(f"smtp.templates: {tmp_path / 'nowhere'} is not a directory")
    assert "leave smtp.templates out for the built-in templates" in problem
    assert str(BUILTIN_TEMPLATES) in problem


def test_an_smtp_backend_config_without_smtp_templates_loads(tmp_path: Path) -> None:
    # What an installed labsync met: no /etc/labsync/templates, and none needed.
    config = config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path / 'site.db'}"},
        "site": {"timezone": "Europe/Moscow"},
        "lis": {"adapter": "qlab", "base_url": "https://api.qlab.ru/v2", "api_key": "k" * 16},
        "pdf": {"dir": str(tmp_path / "pdfs")},
        "notify": {"backend": "smtp"},
        "smtp": MINIMAL,
    }, env={})
    assert config.smtp is not None and config.smtp.templates == RU


def test_the_built_in_templates_are_package_data_of_the_wheel() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["labsync"]
    shipped = {path for pattern in patterns for path in (ROOT / "labsync").glob(pattern)}
    templates = sorted(BUILTIN_TEMPLATES.rglob("*"))
    files = [path for path in templates if path.is_file()]
    assert {path.parent.name for path in files} == {"ru", "en"}
    assert len(files) == 12  # three parts of two kinds of mail, in two languages
    assert set(files) <= shipped


def test_check_says_which_templates_it_checked(db: Db, fake_lis: Any, tmp_path: Path) -> None:
    smtp = {"host": "127.0.0.1", "port": free_port(), "from": "lab@example.ru",
            "starttls": False, "site_url": "https://lab.example.ru"}
    folder = copy_templates(tmp_path)
    lines: dict[str, list[tuple[str, str]]] = {}
    for name, extra in (("ru", {}), ("en", {"language": "en"}),
                        ("own", {"templates": str(folder)}),
                        ("both", {"templates": str(folder), "language": "en"})):
        report = check_all(make_config(db, fake_lis, tmp_path / "p", notify={"backend": "smtp"},
                                       smtp={**smtp, **extra}))
        lines[name] = [(f.verdict, f.text) for f in report.findings
                       if f.text.startswith(("mail: ", "smtp.language"))]
    assert lines["ru"] == [("ok", f'mail: the built-in templates (smtp.language = "ru") in {RU} '
                                  "render with sample values")]
    assert lines["en"] == [("ok", f'mail: the built-in templates (smtp.language = "en") in {EN} '
                                  "render with sample values")]
    assert lines["own"] == [("ok", f"mail: the templates in {folder} (smtp.templates) render "
                                   "with sample values")]
    assert lines["both"] == lines["own"] + [
        ("warning", 'smtp.language = "en" has no effect: smtp.templates is set, and its '
                    "folder's templates are sent as they are")]


def test_check_says_login_only_when_it_logged_in(db: Db, fake_lis: Any, tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD, encoding="utf-8")
    auth = Authenticator()
    with smtp_server(Mailbox(), authenticator=auth, auth_require_tls=False) as server:
        where = f"127.0.0.1:{server.port}"
        base = {"host": "127.0.0.1", "port": server.port, "from": "lab@example.ru",
                "starttls": False, "site_url": "https://lab.example.ru"}

        def smtp_lines(**extra: Any) -> list[tuple[str, str]]:
            config = make_config(db, fake_lis, tmp_path / "p", notify={"backend": "smtp"},
                                 smtp={**base, **extra})
            return [(f.verdict, f.text) for f in check_all(config).findings
                    if "SMTP server" in f.text or f.text.startswith("smtp.")]

        anonymous = smtp_lines()
        assert auth.tries == []
        logged_in = smtp_lines(username="lab", password_file=str(password_file))
        assert auth.tries == [("lab", PASSWORD)]
    assert anonymous == [("ok", f"SMTP server {where} answered (no TLS; no login, smtp.username "
                                "is not set; no mail was sent)")]
    assert logged_in == [("ok", f"SMTP server {where} (no TLS) accepted the login as lab")]


def _non_loopback_address() -> str | None:
    """An address of this machine that is not a loopback one, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: picks the outgoing address, sends nothing
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


def test_check_warns_of_mail_crossing_the_network_unencrypted(db: Db, fake_lis: Any,
                                                             tmp_path: Path) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback ones")

    def smtp_findings(host: str, port: int) -> list[tuple[str, str]]:
        smtp = {"host": host, "port": port, "from": "lab@example.ru", "starttls": False,
                "site_url": "https://lab.example.ru", "timeout": 2}
        config = make_config(db, fake_lis, tmp_path / "p", notify={"backend": "smtp"},
                             smtp=smtp)
        return [(f.verdict, f.text) for f in check_all(config).findings
                if f.text.startswith(("smtp.", "SMTP server"))]

    controller = Controller(Mailbox(), hostname=address, port=free_port())
    controller.start()
    try:
        remote = smtp_findings(address, controller.port)
        local = smtp_findings("127.0.0.1", controller.port)  # nothing listens there
    finally:
        controller.stop()
    assert [verdict for verdict, _ in remote] == ["ok", "warning"]
    assert remote[1][1] == (f"smtp.starttls: the mail to {address}:{controller.port} crosses the "
                            "network unencrypted; set smtp.starttls = true or smtp.ssl = true if "
                            "the server offers it")
    # Unreachable: that is the problem; no warning on top of it (and none for loopback).
    assert [verdict for verdict, _ in local] == ["problem"]


def test_labsync_config_can_import_the_smtp_section_without_a_cycle() -> None:
    # labsync.config.smtp reads [smtp] and labsync.mail builds on it: either may be imported
    # first, and the config's section does not load the mail package.
    code = ("import sys, labsync.config.smtp; "
            "assert not [m for m in sys.modules if m.startswith('labsync.mail')], "
            "sorted(sys.modules); import labsync.mail")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-c", "import labsync.mail, labsync.config"], check=True,
                   cwd=ROOT)
