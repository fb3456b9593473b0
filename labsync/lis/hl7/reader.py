"""One stored message → what the inbox hands out: its id, its place in the queue, and its
``Delivery`` (orders, or the problem that keeps it from being applied)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo
from hashlib import sha256
from typing import Any

from labsync.lis.base import Delivery
from labsync.lis.hl7.dates import BadDate, aware, parse_dtm
from labsync.lis.hl7.mapping import Mapped, map_oru
from labsync.lis.hl7.parse import Header, MessageProblem, parse_message, read_header
from labsync.lis.hl7.spool import Described, key_for, safe_name

CACHE_BYTES = 256 * 1024  # a message this small keeps its delivery in memory until applied


@dataclass(frozen=True)
class Read:
    """A message as read: ``key`` names its file; ``problem`` is why it cannot be applied."""

    key: str
    described: Described
    delivery: Delivery
    header: Header | None
    problem: MessageProblem | None


class Reader:
    """Reads messages the way ``[lis.hl7]`` says: the default charset, which OBR field is the
    order id, and the site's time zone for an MSH-7 without an offset."""

    def __init__(self, *, encoding: str, order_id: str, zone: tzinfo) -> None:
        self.encoding, self.order_id, self.zone = encoding, order_id, zone

    def read(self, data: bytes, *, name: str, received_at: float) -> Read:
        """``data`` (one message) read whole. ``name`` stands in for an id when the message
        has none: the file it came in (``orders.hl7#2``)."""
        header: Header | None = None
        try:
            header = read_header(data, self.encoding)
            mapped: Mapped | None = map_oru(parse_message(data, self.encoding, header=header),
                                            order_id=self.order_id, zone=self.zone)
            problem = None
        except MessageProblem as exc:
            mapped, problem = None, exc
            header = header or exc.header
        if header is not None and header.control_id:
            delivery_id = header.delivery_id
            key = key_for(delivery_id, header.control_id)
        else:
            digest = sha256(data).hexdigest()[:16]
            delivery_id = f"file:{name}:{digest}"
            key = f"{safe_name(name)}-{digest}"
        orders = mapped.orders if mapped is not None else ()
        delivery = Delivery(delivery_id, orders, _when(received_at),
                            problem=str(problem) if problem is not None else None)
        described = Described(delivery_id, self.sort_key(header, received_at),
                              delivery if len(data) <= CACHE_BYTES else None,
                              mapped.notes if mapped is not None else ())
        return Read(key, described, delivery, header, problem)

    def delivery(self, data: bytes, described: Described, *, name: str,
                 received_at: float) -> tuple[Delivery, tuple[str, ...]]:
        """The delivery of a stored message, read again if it was not kept in memory, with
        the time it was stored (its file's, so it is the same after a restart)."""
        if described.delivery is None:
            again = self.read(data, name=name, received_at=received_at)
            delivery, notes = again.delivery, again.described.notes
        else:
            delivery, notes = described.delivery, described.notes
        return replace(delivery, id=described.delivery_id, received_at=_when(received_at)), notes

    def sort_key(self, header: Header | None, received_at: float) -> tuple[Any, ...]:
        """Where a message waits: by MSH-7 (the LIS's order), then MSH-10 (numbers as
        numbers); a message without a readable MSH-7 by when it was stored."""
        moment = received_at
        control = header.control_id if header is not None else ""
        if header is not None:
            try:
                sent = parse_dtm(header.timestamp.split(header.delims.component)[0])
            except BadDate:
                sent = None
            if sent is not None:
                moment = aware(sent, self.zone).timestamp()
        version = (0, int(control), "") if control.isdigit() else (1, 0, control)
        return (moment, version)


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
