"""``notify.backend = "smtp"``: labsync renders the patient's mail and sends it itself.

``SmtpNotifier`` is a ``labsync.notify.Notifier``, like ``BitrixNotifier``: called in the
order's transaction, it renders the templates (``templates.py``) and queues the mail in
``labsync_outbox`` (``outbox.py``), so the mail commits with the results or not at all.
The sender job (``sender.py``) then delivers it. See docs/smtp.md.

The ``[smtp]`` section itself (``SmtpConfig``) is read by ``labsync.config.smtp``.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from labsync.config.smtp import SmtpConfig
from labsync.mail import outbox
from labsync.mail.templates import MailTemplates, RenderedMail
from labsync.notify import MailDecision, Notifier, ReadyOrder, Recipients

if TYPE_CHECKING:
    from collections.abc import Sequence

    from labsync.config import NotifyConfig

__all__ = [
    "MailTemplates", "RenderedMail", "SmtpConfig", "SmtpNotifier",
]


class SmtpNotifier(Notifier):
    """Queues notifications into labsync's own outbox, rendered from the templates."""

    def __init__(self, notify: NotifyConfig, smtp: SmtpConfig, *, zone: tzinfo,
                 templates: MailTemplates | None = None) -> None:
        """``zone`` is ``site.timezone``: ``now_site`` is turned back into UTC with it.

        The templates are checked here (``ConfigError`` on a problem), so a notifier that
        exists can render every mail.
        """
        self.notify = notify
        self.smtp = smtp
        self.zone = zone
        self.templates = templates or MailTemplates(smtp.templates)
        self.templates.validate()
        self.recipients = Recipients()

    def new_pass(self) -> None:
        self.recipients.clear()

    def order_ready(
        self, conn: Connection, *, order_id: int, external_id: str, user_id: int,
        now_site: datetime,
    ) -> MailDecision:
        """Queue the "results are ready" mail, unless the user cannot receive it."""
        return self._queue(conn, "ready", 1, order_id=order_id, external_id=external_id,
                           user_id=user_id, now_site=now_site)

    def orders_ready(self, conn: Connection, ready: Sequence[ReadyOrder], now_site: datetime
                     ) -> list[MailDecision]:
        """``order_ready`` for several orders in one transaction, their users read at once.
        Each mail is rendered and queued on its own (its outbox row checks for a twin)."""
        self.recipients.prefetch(conn, (r.user_id for r in ready))
        return [self.order_ready(conn, order_id=r.order_id, external_id=r.external_id,
                                 user_id=r.user_id, now_site=now_site) for r in ready]

    def order_updated(
        self, conn: Connection, *, order_id: int, external_id: str, user_id: int,
        version: int, now_site: datetime,
    ) -> MailDecision:
        """Queue the "results were corrected" mail for ``version`` (2, 3, …) of the results."""
        return self._queue(conn, "updated", version, order_id=order_id,
                           external_id=external_id, user_id=user_id, now_site=now_site)

    def result_url(self, order_id: int) -> str:
        """The absolute link to the order's results on the site."""
        path = self.notify.result_url.format(order_id=order_id)
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.smtp.site_url}/{path.lstrip('/')}"

    def _queue(self, conn: Connection, kind: str, version: int, *, order_id: int,
               external_id: str, user_id: int, now_site: datetime) -> MailDecision:
        user, refused = self.recipients.lookup(conn, user_id)
        if user is None:
            assert refused is not None
            return refused
        assert user.email is not None  # lookup() returns only users with an address
        context: dict[str, Any] = {
            "NAME": user.name or "", "LAST_NAME": user.last_name or "", "EMAIL": user.email,
            "ORDER_ID": external_id, "LOCAL_ORDER_ID": str(order_id),
            "RESULT_URL": self.result_url(order_id), "SITE_URL": self.smtp.site_url,
            "VERSION": version,
        }
        rendered = self.templates.render(kind, context)
        row_id = outbox.queue(
            conn, order_id=order_id, external_id=external_id, kind=kind, version=version,
            recipient=user.email, rendered=rendered,
            message_id_domain=self.smtp.message_id_domain, now=self._utc(now_site),
        )
        if row_id is None:  # queued by an earlier transaction: the same mail, not a second
            return MailDecision("already_queued",
                                outbox.find(conn, order_id=order_id, kind=kind, version=version))
        return MailDecision("queued", row_id)

    def _utc(self, now_site: datetime) -> datetime:
        return now_site.replace(tzinfo=self.zone).astimezone(UTC).replace(tzinfo=None)
