"""The patient's "results are ready" notification, queued in the same transaction as the results.

One interface, ``Notifier``, for every backend, chosen once by the wiring
(``labsync.app.make_notifier``):

- ``bitrix``: one ``b_event`` row, as ``CEvent::Send`` writes it; the site's own mail agent
  sends it with the site's ``LAB_RESULTS_READY`` template (``BitrixNotifier``, here);
- ``smtp``: labsync's own outbox, rendered from its templates and sent by its sender job
  (``labsync.mail.SmtpNotifier``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from labsync.config import NotifyConfig
from labsync.store import bitrix
from labsync.store.db import TextFitter


@dataclass(frozen=True, slots=True)
class MailDecision:
    """What became of an order's notification: ``queued`` (with its event id) or why not."""

    state: str  # queued | no_user | inactive | no_email
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class ReadyOrder:
    """An order whose "results are ready" mail ``orders_ready`` queues."""

    order_id: int
    external_id: str
    user_id: int


class Recipients:
    """Site users as mail recipients, each looked up once per pass (a patient often has
    several orders ready at once). Shared by every notification backend."""

    def __init__(self) -> None:
        self._users: dict[int, bitrix.SiteUser | None] = {}

    def clear(self) -> None:
        """Forget the users of the last pass: an address changed since is read afresh."""
        self._users.clear()

    def prefetch(self, conn: Connection, user_ids: Iterable[int]) -> None:
        """Read the users not read yet this pass, in one query (a batch of orders' users)."""
        missing = {u for u in user_ids if u not in self._users}
        if missing:
            found = bitrix.get_users(conn, missing)
            for user_id in missing:
                self._users[user_id] = found.get(user_id)

    def lookup(self, conn: Connection, user_id: int) -> tuple[bitrix.SiteUser | None,
                                                              MailDecision | None]:
        """(the user, None) when they can get mail; (None, the decision why not) otherwise."""
        if user_id not in self._users:
            self._users[user_id] = bitrix.get_user(conn, user_id)
        user = self._users[user_id]
        if user is None:
            return None, MailDecision("no_user")
        if not user.active:
            return None, MailDecision("inactive")
        if not user.email:
            return None, MailDecision("no_email")
        return user, None


class Notifier(abc.ABC):
    """Queues an order's notification in the caller's transaction; says what became of it."""

    @abc.abstractmethod
    def new_pass(self) -> None:
        """A pass begins: forget what was read of the site's users in the last one."""

    @abc.abstractmethod
    def order_ready(self, conn: Connection, *, order_id: int, external_id: str, user_id: int,
                    now_site: datetime) -> MailDecision:
        """The "results are ready" mail of a completed order, unless its user cannot get it."""

    @abc.abstractmethod
    def orders_ready(self, conn: Connection, ready: Sequence[ReadyOrder], now_site: datetime
                     ) -> list[MailDecision]:
        """``order_ready`` for several orders in one transaction, in their order."""

    @abc.abstractmethod
    def order_updated(self, conn: Connection, *, order_id: int, external_id: str,
                      user_id: int, version: int, now_site: datetime) -> MailDecision:
        """The "results were corrected" mail for ``version`` (2, 3, …) of an order's results."""


class BitrixNotifier(Notifier):
    """Queues notifications into Bitrix's ``b_event`` mail queue."""

    def __init__(self, config: NotifyConfig, fitter: TextFitter) -> None:
        self.config = config
        self.fitter = fitter
        self.recipients = Recipients()

    def new_pass(self) -> None:
        self.recipients.clear()

    def order_ready(
        self, conn: Connection, *, order_id: int, external_id: str, user_id: int,
        now_site: datetime,
    ) -> MailDecision:
        """Queue the ready mail for a completed order, unless its user cannot receive it."""
        return self._queue(conn, self.config.event_name, order_id, external_id, user_id,
                           now_site, {})

    def orders_ready(self, conn: Connection, ready: Sequence[ReadyOrder], now_site: datetime
                     ) -> list[MailDecision]:
        """``order_ready`` for several orders in one transaction: their users read in one
        query and their mails queued in one INSERT where the database allows."""
        self.recipients.prefetch(conn, (r.user_id for r in ready))
        decisions: list[MailDecision | None] = []
        fields: list[dict[str, str]] = []
        for r in ready:
            user, refused = self.recipients.lookup(conn, r.user_id)
            decisions.append(refused)
            if user is not None:
                fields.append(self._fields(user, r.order_id, r.external_id, {}))
        ids = iter(bitrix.queue_mail_events(
            conn, self.fitter, event_name=self.config.event_name, site_id=self.config.site_id,
            fields=fields, duplicate=self.config.duplicate, now_site=now_site))
        return [d if d is not None else MailDecision("queued", next(ids)) for d in decisions]

    def order_updated(
        self, conn: Connection, *, order_id: int, external_id: str, user_id: int,
        version: int, now_site: datetime,
    ) -> MailDecision:
        """Queue the "results corrected" mail for version ``version`` of an order's results."""
        return self._queue(conn, self.config.updated_event_name, order_id, external_id,
                           user_id, now_site, {"VERSION": str(version)})

    def _queue(self, conn: Connection, event_name: str, order_id: int, external_id: str,
               user_id: int, now_site: datetime, extra: dict[str, str]) -> MailDecision:
        user, refused = self.recipients.lookup(conn, user_id)
        if user is None:
            assert refused is not None
            return refused
        event_id = bitrix.queue_mail_event(
            conn, self.fitter, event_name=event_name, site_id=self.config.site_id,
            fields=self._fields(user, order_id, external_id, extra),
            duplicate=self.config.duplicate, now_site=now_site,
        )
        return MailDecision("queued", event_id)

    def _fields(self, user: bitrix.SiteUser, order_id: int, external_id: str,
                extra: dict[str, str]) -> dict[str, str]:
        """The mail's C_FIELDS, which the site's template fills in."""
        assert user.email is not None  # lookup() returns only users with an address
        return {
            "EMAIL": user.email,
            "NAME": user.name or "",
            "LAST_NAME": user.last_name or "",
            "ORDER_ID": external_id,
            "LOCAL_ORDER_ID": str(order_id),
            "RESULT_URL": self.config.result_url.format(order_id=order_id),
            **extra,
        }
