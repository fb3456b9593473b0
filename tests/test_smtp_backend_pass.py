"""notify.backend = "smtp" end to end: a real pass queues into the outbox, the sender delivers
to a real SMTP server on localhost; nothing goes into Bitrix's b_event."""

from __future__ import annotations

from labsync.app import open_app
from labsync.lis.qlab import QlabClient
from tests.conftest import add_order, add_user, make_config
from tests.helpers import RESULTS, events
from tests.test_smtp import Mailbox, parts, smtp_server


def _pass_and_send(config):
    with open_app(config, lis=QlabClient(config.lis, sleep=lambda _s: None)) as app:
        summary = app.sync.run_pass(due_only=False)
        assert app.mail is not None
        sent = app.mail.send_due()
    return summary, sent


def test_a_completed_and_then_corrected_order_mails_ready_then_updated(db, fake_lis, tmp_path):
    mailbox = Mailbox()
    with smtp_server(mailbox) as server:
        config = make_config(
            db, fake_lis, tmp_path / "pdfs", notify={"backend": "smtp"},
            smtp={"host": "127.0.0.1", "port": server.port, "from": "lab@example.ru",
                  "starttls": False, "language": "en",
                  "site_url": "https://lab.example.ru"})
        add_user(db, 7, email="anna@example.org", name="Anna")
        local_id = add_order(db, "S-1", 7)
        fake_lis.add_order("S-1", results=RESULTS)

        summary, sent = _pass_and_send(config)
        assert summary.completed == 1 and sent["sent"] == 1
        fake_lis.set_results("S-1", [dict(RESULTS[0], value=131), *RESULTS[1:]])
        summary, sent = _pass_and_send(config)
        assert summary.corrected == 1 and sent["sent"] == 1
        summary, sent = _pass_and_send(config)  # nothing new: nothing sent
        assert summary.rechecked == 1 and sent["sent"] == 0

    assert events(db) == []  # the Bitrix queue is not used with this backend
    ready, updated = (r.message for r in mailbox.accepted)
    assert [r.rcpt_tos for r in mailbox.accepted] == [["anna@example.org"]] * 2
    assert "S-1" in ready["Subject"] and "S-1" in updated["Subject"]
    text, html = parts(ready)
    assert "Anna" in text and f"https://lab.example.ru/personal/lab-results/{local_id}/" in text
    assert "Anna" in html
    assert ready["Message-ID"] != updated["Message-ID"]
