"""The LIS interface, by capability: small interfaces an adapter implements as far as its
LIS allows, and ``capabilities()`` for the core to ask which ones it has.

An adapter is a subclass of ``LisClient`` that also inherits each capability interface it
implements; inheriting one is declaring it (Singer taps declare ``capabilities`` the same
way), and its abstract methods make the declaration binding:

============================ ============================================== ================
interface                    what the LIS can do                            ``Capability``
============================ ============================================== ================
``OrderLookup``              answer about one order by its id               ``ORDER_LOOKUP``
``ChangeFeed``               say what changed since a cursor                ``CHANGE_FEED``
``Inbox``                    push deliveries that labsync keeps on disk     ``INBOX``
``PdfSource``                hand out an order's PDF by id or by URL        ``PDF``
``PatientSearch``            find a patient's orders by phone               ``PATIENT_SEARCH``
``OrderPlacement``           take a new order                               ``ORDER_PLACEMENT``
============================ ============================================== ================

The interfaces are ABCs, not Protocols, on purpose: a capability is something an adapter
says it has, not something it happens to look like (a ``changes`` method written for
another reason must not turn a feed on); ``issubclass`` answers ``capabilities(cls)`` from
the class alone, without building an adapter; and a class that declares an interface but
forgets a method fails when it is built, not in the middle of a pass.

Terms and rules shared by every interface:

- *external id*: the order's id in the LIS, ``local_lab_orders.EXTERNAL_ORDER_ID``.
- Every method is safe to call from several threads at once; an adapter keeps per-thread
  connections itself.
- Every method either returns validated, LIS-neutral data (``labsync.model``) or raises a
  ``LisError`` subclass (``labsync.errors``): ``TransientLisError`` after its own bounded
  retries are spent, ``PermanentLisError`` (``LisAuthError``, ``UnknownOrder``,
  ``PdfNotReady``) or ``BadLisData``. Nothing else escapes, so the engine can confine every
  failure to its order.
- PDF bytes are checked by ``labsync.pdfs`` (``%PDF-``, ``%%EOF``, the size cap), the same
  for every adapter, whether they came inline, by URL or by order id.

``docs/adapters.md`` shows how to write one, with ``labsync.testing.memory_lis`` (every
capability, in memory) as the worked example; ``tests/lis_conformance.py`` is the suite
every adapter passes.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, BinaryIO

from labsync.errors import LisError, PermanentLisError, UnknownOrder
from labsync.model import BY_ORDER, LisOrder, LisOrderRef, Patient, PdfRef


class Capability(enum.StrEnum):
    """What an adapter can do; ``capabilities()`` says which ones a given adapter has."""

    ORDER_LOOKUP = "order_lookup"
    CHANGE_FEED = "change_feed"
    INBOX = "inbox"
    PDF = "pdf"
    PATIENT_SEARCH = "patient_search"
    ORDER_PLACEMENT = "order_placement"

    @property
    def label(self) -> str:
        """A short name for messages: ``patient search``."""
        return _WORDS[self][0]

    @property
    def ability(self) -> str:
        """What it lets labsync do, to follow "cannot": ``search orders by patient``."""
        return _WORDS[self][1]


_WORDS = {
    Capability.ORDER_LOOKUP: ("order lookup", "ask about one order by its id"),
    Capability.CHANGE_FEED: ("change feed", "say what changed since the last read"),
    Capability.INBOX: ("inbox", "deliver results into labsync's inbox"),
    Capability.PDF: ("PDF source", "hand out an order's PDF by id or URL"),
    Capability.PATIENT_SEARCH: ("patient search", "search orders by patient"),
    Capability.ORDER_PLACEMENT: ("order placement", "place new orders"),
}


def _missing(adapter: object, capability: Capability) -> PermanentLisError:
    return PermanentLisError(
        f"the {type(adapter).__name__} adapter cannot {capability.ability} "
        f"(no {capability.label})"
    )


class LisClient(abc.ABC):
    """An LIS adapter: the base of every adapter, whatever it can do.

    Only ``probe`` and ``close`` are common to all. The four methods after them are today's
    engine's way in and stay here for it (the sync engine and discovery call them on a
    ``LisClient``): an adapter without the capability answers with a
    ``PermanentLisError`` naming what it cannot do, which stays with its order like any LIS
    error. New code asks ``capabilities()`` first and calls the capability's interface.
    """

    @abc.abstractmethod
    def probe(self) -> None:
        """Reach the LIS and prove the credentials work; raise a ``LisError`` if not.

        ``OrderLookup`` gives a default; an adapter without lookup says how it is reached
        (an inbox checks its folder, a feed reads one page).
        """

    def start(self) -> None:  # noqa: B027 - optional hook, most adapters need nothing
        """Start the background work this adapter owns (HL7's MLLP listener).

        Only ``labsync run`` calls it, once, before its first job; one-shot commands never do.
        ``close`` stops what it started: a listener finishes the message in hand (stored and
        acknowledged) before ``close`` returns.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most adapters need nothing
        """Release connections (and stop what ``start`` started). The client is not used
        afterwards."""

    def disabled_capabilities(self) -> frozenset[Capability]:
        """Capabilities the class declares but this configured adapter has switched off
        (FHIR with ``feed = false`` is order by order only); ``capabilities(adapter)`` leaves
        them out. Default: none."""
        return frozenset()

    # -- transitional: the engine of today calls these on any LisClient ----------------------

    def fetch_order(self, external_id: str) -> LisOrder:
        """See ``OrderLookup.fetch_order``; here: this adapter has no order lookup."""
        raise _missing(self, Capability.ORDER_LOOKUP)

    def fetch_pdf(
        self, external_id: str, sink: BinaryIO, *, max_bytes: int, ref: PdfRef = BY_ORDER
    ) -> int:
        """See ``PdfSource.fetch_pdf``; here: this adapter hands out no PDF by id or URL."""
        raise _missing(self, Capability.PDF)

    def find_orders(self, phone: str, date_from: date) -> Sequence[LisOrderRef]:
        """See ``PatientSearch.find_orders``; here: this adapter has no patient search."""
        raise _missing(self, Capability.PATIENT_SEARCH)

    def create_order(self, patient: Patient, tests: Sequence[str]) -> LisOrderRef:
        """See ``OrderPlacement.create_order``; here: this adapter places no orders."""
        raise _missing(self, Capability.ORDER_PLACEMENT)


class OrderLookup(LisClient):
    """The LIS answers about one order, asked by its external id (QLAB, FHIR, a mapped REST)."""

    @abc.abstractmethod
    def fetch_order(self, external_id: str) -> LisOrder:
        """The order's status and results so far; ``UnknownOrder`` if the LIS has no such order.

        The answer's ``external_id`` is the one asked for (an answer about another order is
        ``BadLisData``). Values are text exactly as the LIS sent them (``5.40`` stays
        ``5.40``); ``result_date`` keeps the LIS's offset (aware) or has none (naive);
        ``changed_at`` and ``version`` are set when the LIS says them; ``pdf`` is the
        order's PDF handle when it has one (QLAB: ``PdfRef.by_order()`` once completed).
        """

    def probe(self) -> None:
        """Ask for an order id no LIS will have: "unknown order" means the LIS answered and
        accepted the credentials. Adapters with a real health endpoint override this."""
        try:
            self.fetch_order("labsync-probe-0")
        except UnknownOrder:
            return


@dataclass(frozen=True, slots=True)
class FeedPage:
    """One read of a change feed.

    ``orders``: the orders that changed, oldest change first, each as the LIS has it now or
    as of that change (an order may appear more than once: apply them in this order, and
    ``LisOrder.is_older_than`` / ``same_version_as`` tell what to skip). ``cursor``: where
    the next read starts, to be stored by labsync in the same transaction that applies
    ``orders`` and never before; None only when nothing was ever read (keep the cursor you
    passed). ``more``: True when the LIS has more changes waiting; read again at once with
    ``cursor``.
    """

    orders: tuple[LisOrder, ...]
    cursor: str | None
    more: bool = False
    problems: tuple[FeedProblem, ...] = ()


@dataclass(frozen=True, slots=True)
class FeedProblem:
    """An entry of a feed page the adapter could not read (a malformed report, a result it
    could not fetch). One bad entry must not stop the feed for every order: the adapter
    leaves it out of ``orders``, still moves the cursor past it, and names it here. The
    engine records the error against the site's order with that id (so it is asked by id
    soon, where the error stays with that order) and logs the rest.
    """

    external_id: str | None  # the order it is about, when the adapter could tell
    error: LisError


class ChangeFeed(LisClient):
    """The LIS says what changed since an opaque cursor (FHIR ``_lastUpdated``).

    Two settings of the adapter's tell the engine how to use the feed (override them, as
    class or instance attributes, from the adapter's own section):

    - ``feed_interval``: how often ``labsync run`` reads the feed.
    - ``verify_every``: with a feed, each pending order is still asked once by id when
      labsync first sees it, then only this often (None: at the usual polling rhythm).
    """

    feed_interval: timedelta = timedelta(seconds=30)
    verify_every: timedelta | None = None

    @abc.abstractmethod
    def changes(self, cursor: str | None, *, since: datetime | None = None) -> FeedPage:
        """The changes after ``cursor`` (None: from the start), one page at a time.

        - The cursor is opaque text the adapter made; labsync stores it and gives it back.
          A cursor may be read from more than once (after a crash between the read and the
          commit): the same changes come again, none is skipped. Delivery is at least once:
          a page may repeat changes of the page before it (a feed that re-reads an overlap
          for clock skew), never leave one out.
        - ``since`` (aware) says where a first read (cursor None) begins; an adapter whose
          feed cannot start at a time starts at its beginning. Ignored with a cursor.
        - A cursor this adapter did not make is a ``PermanentLisError``.
        - The page size is the adapter's (a setting of its own); ``more`` says whether to go on.
        """


@dataclass(frozen=True, slots=True)
class Delivery:
    """One pushed message (or file) in labsync's inbox, already safe on labsync's disk.

    ``id`` is stable: the same delivery has the same id every time it is taken, after a
    restart too, and a sender's resend of the same message has the same id (it comes from
    the sender's key, HL7's MSH-10 with the sending application). ``orders`` are the orders
    it carries, in the sender's order. A delivery that could not be read has no orders and a
    ``problem``: the engine logs it and calls ``failed(delivery, problem)``.
    """

    id: str
    orders: tuple[LisOrder, ...]
    received_at: datetime | None = None  # aware: when labsync stored it
    problem: str | None = None


class Hold(enum.StrEnum):
    """Why a delivery is released to wait for a later drain."""

    UNKNOWN_ORDER = "unknown_order"  # the site has no such order yet: kept for a limited time
    UNAVAILABLE = "unavailable"  # labsync cannot apply anything now (its database): no limit


class Inbox(LisClient):
    """The LIS pushes results (HL7 v2 to a folder or over MLLP); labsync stores each message
    before it acknowledges it, and the engine applies what is stored.

    The contract that keeps a delivery from being lost or applied twice across a crash:

    1. *Stored, then acknowledged.* A delivery exists only once it is durable (written and
       fsynced) in the inbox; only then does the adapter acknowledge it to the sender. A
       crash before that is the sender's to resend.
    2. *Taken is not removed.* ``take()`` hands a delivery out and marks it as in hand in
       memory only; nothing on disk changes. Only ``done()`` or ``failed()`` finish it.
       ``failed()`` is durable before it returns; ``done()`` need not be, since the
       database has recorded the delivery as applied by then (4.).
    3. *After a crash, everything unfinished comes again*: every delivery taken but neither
       done nor failed is waiting again, with the same ``id``, in the same order.
    4. *Applied once, by id.* The engine writes the delivery's ``id`` in the same database
       transaction as its orders, and calls ``done()`` only after that commit. A delivery
       whose id is already written (the crash came between the commit and ``done()``, or
       the sender resent it) is marked done without being applied again. Within one order,
       ``LisOrder.is_older_than`` keeps a late, older message from overwriting a newer
       answer.

    Deliveries are handed out oldest first, in the order the sender produced them. Several
    threads may take at once; a delivery is never in two hands at the same time.
    """

    @abc.abstractmethod
    def take(self) -> Delivery | None:
        """The oldest waiting delivery that is not in hand, now in hand; None when none is
        waiting. A released delivery waits again, but is not handed out before ``take()``
        has returned None once: one drain of the inbox sees each delivery at most once."""

    @abc.abstractmethod
    def done(self, delivery: Delivery) -> None:
        """Its orders are applied and committed: do not hand it out again (a crash may bring
        it back once, and the engine then only marks it done). Finishing a finished
        delivery does nothing."""

    @abc.abstractmethod
    def failed(self, delivery: Delivery, reason: str) -> None:
        """It will not be applied: keep it apart with ``reason`` for the operator (HL7's
        ``error/`` folder) and never hand it out again, unless the operator puts it back."""

    @abc.abstractmethod
    def release(self, delivery: Delivery, reason: str,
                hold: Hold = Hold.UNKNOWN_ORDER) -> None:
        """Not now: it waits again, for a later drain.

        ``Hold.UNKNOWN_ORDER`` (an order the site does not have yet): the adapter decides how
        long it keeps a delivery released again and again (HL7's ``hold_unknown``) before it
        fails it itself; it is not handed out again before ``take()`` has returned None.
        ``Hold.UNAVAILABLE`` (the database is down, the drain is given up): it waits again at
        once, however long that lasts.
        """

    def counts(self) -> Mapping[str, int]:
        """What the inbox holds now, by state (``waiting``, ``held``, ``failed``, ``done``),
        for ``labsync status``; empty when the adapter cannot say. Read from disk: safe
        while another process (``labsync run``) uses the same inbox."""
        return {}

    def messages_for(self, external_id: str) -> Sequence[Mapping[str, Any]]:
        """The deliveries the inbox holds for one order (each a small dict: ``id``,
        ``state``, ``received_at``, ``reason``...), for ``labsync order``; empty when the
        adapter cannot say."""
        return ()


class PdfSource(LisClient):
    """The LIS hands out an order's PDF: by the order's id, or at a URL it gave in an answer."""

    @abc.abstractmethod
    def fetch_pdf(
        self, external_id: str, sink: BinaryIO, *, max_bytes: int, ref: PdfRef = BY_ORDER
    ) -> int:
        """Stream the PDF that ``ref`` points to into ``sink``; return the bytes written.

        ``ref`` is ``BY_ORDER`` (ask by ``external_id``) or a ``PdfRef.at(url)`` this adapter
        gave; ``labsync.pdfs`` writes inline bytes itself and never passes them here. A
        handle the adapter will not follow (a URL outside its LIS) is ``BadLisData``.

        ``sink`` is positioned at 0 and truncated before every attempt, so a retried download
        never appends to a partial one. The body goes into ``sink`` as the LIS sent it: more
        than ``max_bytes`` is ``BadLisData``, raised before ``sink`` holds more than
        ``max_bytes``. ``PdfNotReady`` while the LIS has no PDF. The adapter need not check
        that the bytes are a PDF (``labsync.pdfs`` does, for every adapter), but may refuse a
        body its protocol marks as something else.
        """


class PatientSearch(LisClient):
    """The LIS finds a patient's orders by phone (``[discovery]`` needs this)."""

    @abc.abstractmethod
    def find_orders(self, phone: str, date_from: date) -> Sequence[LisOrderRef]:
        """Orders of the patient with this E.164 phone, placed on or after ``date_from``."""


class OrderPlacement(LisClient):
    """The LIS takes new orders from the website."""

    @abc.abstractmethod
    def create_order(self, patient: Patient, tests: Sequence[str]) -> LisOrderRef:
        """Place an order for ``tests`` (LIS test codes). Never retried: it is not idempotent."""


INTERFACES: dict[Capability, type] = {  # type[LisClient] refuses abstract classes
    Capability.ORDER_LOOKUP: OrderLookup,
    Capability.CHANGE_FEED: ChangeFeed,
    Capability.INBOX: Inbox,
    Capability.PDF: PdfSource,
    Capability.PATIENT_SEARCH: PatientSearch,
    Capability.ORDER_PLACEMENT: OrderPlacement,
}


def capabilities(adapter: LisClient | type[LisClient]) -> frozenset[Capability]:
    """What ``adapter`` can do: for a class (nothing is built), what it declares; for a
    built adapter, that less what its configuration switched off."""
    cls = adapter if isinstance(adapter, type) else type(adapter)
    declared = frozenset(cap for cap, interface in INTERFACES.items()
                         if issubclass(cls, interface))
    if isinstance(adapter, type):
        return declared
    return declared - adapter.disabled_capabilities()
