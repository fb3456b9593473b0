"""The memory adapter (``labsync.testing.memory_lis``) against the shared suite, once for each
way its lab hands out PDFs (by order id, inline bytes, a URL), plus what only it shows."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from labsync.errors import BadLisData, LisAuthError, PermanentLisError, TransientLisError
from labsync.lis.base import Capability, capabilities
from labsync.model import LisOrder, OrderStatus, Patient, PdfKind, PdfRef, TestResult
from labsync.pdfs import PdfStore
from labsync.testing.memory_lis import URL_PREFIX, MemoryLab, MemoryLis
from labsync.testing.pdfs import sample_pdf
from tests.lis_conformance import LisClientConformance

ATTEMPTS = 3


def _no_sleep(seconds: float) -> None:
    """Retries wait for nothing: no test sleeps."""


class MemoryServer:
    """``lis_server`` for the conformance suite: the lab already speaks ``labsync.model``."""

    capabilities = frozenset(Capability)
    retry_attempts = ATTEMPTS
    says_changed_at = True

    def __init__(self, lab: MemoryLab, pdf_as: PdfKind) -> None:
        self.lab, self.pdf_as = lab, pdf_as

    def add_order(self, external_id: str, *, status: OrderStatus,
                  results: Sequence[TestResult], pdf: bytes | None, patient: Patient,
                  order_date: date, changed_at: datetime | None = None,
                  version: str | None = None) -> None:
        self.lab.add_order(external_id, status=status, results=results, pdf=pdf,
                           patient=patient, order_date=order_date, changed_at=changed_at,
                           version=version, pdf_as=self.pdf_as)

    def update_order(self, external_id: str, **changes: Any) -> None:
        self.lab.update_order(external_id, **changes)

    def set_pdf(self, external_id: str, pdf: bytes | None) -> None:
        self.lab.set_pdf(external_id, pdf)

    def fail(self, external_id: str | None, fault: str, *, on: str = "order",
             times: int | None = 1) -> None:
        self.lab.fail(external_id, fault, on=on, times=times)

    def requests(self, external_id: str, on: str) -> int:
        return self.lab.requests(on, external_id)

    def deliver(self, delivery_id: str, orders: Sequence[LisOrder]) -> None:
        self.lab.deliver(delivery_id, orders)

    def deliver_unreadable(self, delivery_id: str) -> None:
        self.lab.deliver(delivery_id, (), problem="MSH segment missing")

    def inbox_state(self, delivery_id: str) -> str:
        return self.lab.inbox_state(delivery_id)

    def restarted_client(self) -> MemoryLis:
        return MemoryLis(self.lab, attempts=ATTEMPTS, sleep=_no_sleep)


@pytest.fixture
def lab() -> MemoryLab:
    return MemoryLab()


@pytest.fixture
def lis_client(lab: MemoryLab) -> Iterator[MemoryLis]:
    client = MemoryLis(lab, attempts=ATTEMPTS, sleep=_no_sleep)
    yield client
    client.close()


@pytest.fixture(params=list(PdfKind), ids=lambda kind: f"pdf-{kind}")
def lis_server(lab: MemoryLab, request: pytest.FixtureRequest) -> MemoryServer:
    return MemoryServer(lab, request.param)


class TestMemoryConformance(LisClientConformance):
    """The shared suite, run against the memory adapter."""


# -- what only the memory adapter shows --------------------------------------------------------


def test_every_capability_is_declared_on_the_class() -> None:
    assert capabilities(MemoryLis) == frozenset(Capability)


def test_handles_are_of_the_kind_the_lab_gives(lab: MemoryLab, lis_client: MemoryLis) -> None:
    pdf = sample_pdf()
    for kind in PdfKind:
        lab.add_order(f"K-{kind}", pdf=pdf, pdf_as=kind)

    handles = {kind: lis_client.fetch_order(f"K-{kind}").pdf for kind in PdfKind}

    assert handles == {PdfKind.BY_ORDER: PdfRef.by_order(), PdfKind.INLINE: PdfRef.inline(pdf),
                       PdfKind.URL: PdfRef.at(f"{URL_PREFIX}K-url")}


def test_a_url_off_the_lis_is_never_followed(lab: MemoryLab, lis_client: MemoryLis) -> None:
    lab.add_order("U-1", pdf=sample_pdf())

    with pytest.raises(BadLisData, match="not a URL of this LIS"):
        lis_client.fetch_pdf("U-1", io.BytesIO(), max_bytes=10**6,
                             ref=PdfRef.at("https://elsewhere.example/U-1.pdf"))
    assert lab.requests("pdf") == 0


def test_a_pdf_cut_off_half_way_is_retried_from_the_start(lab: MemoryLab,
                                                           lis_client: MemoryLis) -> None:
    pdf = sample_pdf("half", size=200_000)
    lab.add_order("C-1", pdf=pdf)
    lab.fail("C-1", "transient", on="pdf")
    writes: list[int] = []

    class Sink(io.BytesIO):
        def write(self, data: Any) -> int:
            writes.append(len(data))
            return super().write(data)

    sink = Sink()
    lis_client.fetch_pdf("C-1", sink, max_bytes=10**6)

    assert sink.getvalue() == pdf
    assert sum(writes) == len(pdf) + len(pdf) // 2  # half a body, rewound, then all of it


def test_create_order_is_never_retried(lab: MemoryLab, lis_client: MemoryLis) -> None:
    lab.fail(None, "transient", on="create")

    with pytest.raises(TransientLisError):
        lis_client.create_order(Patient(phone="+79990001122"), ["GLU"])
    assert lab.requests("create") == 1 and lab.created == []


def test_a_feed_read_that_fails_transiently_is_retried(lab: MemoryLab,
                                                       lis_client: MemoryLis) -> None:
    lab.add_order("F-1")
    lab.fail(None, "transient", on="feed", times=ATTEMPTS - 1)

    page = lis_client.changes(None)

    assert [o.external_id for o in page.orders] == ["F-1"]
    assert lab.requests("feed") == ATTEMPTS


def test_a_feed_read_refused_is_an_auth_error(lab: MemoryLab, lis_client: MemoryLis) -> None:
    lab.fail(None, "auth", on="feed")

    with pytest.raises(LisAuthError):
        lis_client.changes(None)


def test_a_first_read_since_a_time_starts_there(lab: MemoryLab, lis_client: MemoryLis) -> None:
    base = datetime(2024, 5, 14, 9, 0, tzinfo=UTC)
    for i in range(4):
        lab.add_order(f"S-{i}", changed_at=base + timedelta(hours=i))

    page = lis_client.changes(None, since=base + timedelta(hours=2))

    assert [o.external_id for o in page.orders] == ["S-2", "S-3"]
    assert lis_client.changes(page.cursor).orders == ()


def test_the_feed_keeps_every_update_of_an_order_in_order(lab: MemoryLab,
                                                         lis_client: MemoryLis) -> None:
    lab.add_order("O-1", status=OrderStatus.PROCESSING, version="1")
    lab.update_order("O-1", status=OrderStatus.COMPLETED, version="2")

    page = lis_client.changes(None)

    assert [(o.status, o.version) for o in page.orders] == [
        (OrderStatus.PROCESSING, "1"), (OrderStatus.COMPLETED, "2")]
    assert page.orders[1].pdf == PdfRef.by_order() and page.orders[0].pdf is None


def test_small_pages_say_more_until_the_end(lab: MemoryLab) -> None:
    client = MemoryLis(lab, page_size=2, sleep=_no_sleep)
    for i in range(5):
        lab.add_order(f"P-{i}")

    pages, cursor = [], None
    while True:
        page = client.changes(cursor)
        pages.append(([o.external_id for o in page.orders], page.more))
        cursor = page.cursor
        if not page.more:
            break

    assert pages == [(["P-0", "P-1"], True), (["P-2", "P-3"], True), (["P-4"], False)]


def test_a_resent_delivery_is_kept_once(lab: MemoryLab, lis_client: MemoryLis) -> None:
    order = LisOrder("R-1", OrderStatus.COMPLETED)
    assert lab.deliver("MSG-1", [order]) is True
    assert lab.deliver("MSG-1", [order]) is False

    assert lis_client.take() is not None and lis_client.take() is None


def test_an_inline_pdf_from_an_inbox_delivery_is_staged_without_any_request(
        lab: MemoryLab, lis_client: MemoryLis, tmp_path: Any) -> None:
    pdf = sample_pdf("inline")
    lab.deliver("MSG-P", [LisOrder("IP-1", OrderStatus.COMPLETED, pdf=PdfRef.inline(pdf))])
    (order,) = lis_client.take().orders  # type: ignore[union-attr]
    store = PdfStore(tmp_path, 10**6)

    path = store.publish(store.stage(7, "IP-1", None, order.pdf))

    assert path.read_bytes() == pdf and lab.requests() == 0


def test_a_cursor_of_another_shape_is_refused(lis_client: MemoryLis) -> None:
    with pytest.raises(PermanentLisError):
        lis_client.changes("mem:-1")
