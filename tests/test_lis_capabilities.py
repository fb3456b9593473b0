"""Capabilities: what adapters declare, what the registry says, what the config may ask;
and the model's version helpers the new sources need."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import pytest

from labsync.errors import ConfigError, PermanentLisError
from labsync.lis import registry
from labsync.lis.base import (
    Capability,
    Delivery,
    Hold,
    Inbox,
    LisClient,
    OrderLookup,
    PdfSource,
    capabilities,
)
from labsync.lis.qlab import QlabClient
from labsync.model import LisOrder, OrderStatus, PdfKind, PdfRef


class InboxOnly(Inbox):
    """An HL7-like adapter: results are pushed, nothing can be asked."""

    def probe(self) -> None:
        pass

    def take(self) -> Delivery | None:
        return None

    def done(self, delivery: Delivery) -> None:
        pass

    def failed(self, delivery: Delivery, reason: str) -> None:
        pass

    def release(self, delivery: Delivery, reason: str,
                hold: Hold = Hold.UNKNOWN_ORDER) -> None:
        pass


class PdfOnly(PdfSource):
    """Brings no results at all: a configuration mistake."""

    def probe(self) -> None:
        pass

    def fetch_pdf(self, external_id, sink, *, max_bytes, ref=PdfRef.by_order()):  # noqa: B008
        return 0


@pytest.fixture
def test_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._ADAPTERS, "hl7", f"{__name__}:InboxOnly")
    monkeypatch.setitem(registry._ADAPTERS, "pdfonly", f"{__name__}:PdfOnly")


def test_qlab_declares_lookup_pdf_patient_search_and_placement() -> None:
    expected = {Capability.ORDER_LOOKUP, Capability.PDF, Capability.PATIENT_SEARCH,
                Capability.ORDER_PLACEMENT}
    assert capabilities(QlabClient) == expected
    assert registry.adapter_capabilities("qlab") == expected


def test_capabilities_come_from_the_interfaces_inherited_not_from_method_names() -> None:
    class LooksLikeAFeed(InboxOnly):
        def changes(self, cursor, *, since=None):  # a method of that name declares nothing
            raise AssertionError

    assert capabilities(LooksLikeAFeed) == {Capability.INBOX}
    assert capabilities(LooksLikeAFeed()) == {Capability.INBOX}


def test_an_adapter_declaring_an_interface_without_its_method_cannot_be_built() -> None:
    class Forgetful(OrderLookup):
        pass

    with pytest.raises(TypeError, match="fetch_order"):
        Forgetful()  # type: ignore[abstract]


def test_a_missing_capability_answers_with_an_lis_error_naming_it() -> None:
    adapter = InboxOnly()

    with pytest.raises(PermanentLisError, match="cannot ask about one order by its id "
                                                r"\(no order lookup\)"):
        adapter.fetch_order("A-1")
    with pytest.raises(PermanentLisError, match=r"\(no PDF source\)"):
        adapter.fetch_pdf("A-1", io.BytesIO(), max_bytes=10)
    with pytest.raises(PermanentLisError, match=r"\(no patient search\)"):
        adapter.find_orders("+79990000000", datetime(2024, 1, 1).date())
    assert isinstance(adapter, LisClient)


def test_the_default_probe_belongs_to_order_lookup() -> None:
    class NoProbe(Inbox):  # every inbox method, but no way to say the LIS is reachable
        def take(self) -> Delivery | None:
            return None

        def done(self, delivery: Delivery) -> None:
            pass

        def failed(self, delivery: Delivery, reason: str) -> None:
            pass

        def release(self, delivery: Delivery, reason: str,
                    hold: Hold = Hold.UNKNOWN_ORDER) -> None:
            pass

    with pytest.raises(TypeError, match="probe"):
        NoProbe()  # type: ignore[abstract]


def test_an_unknown_adapter_name_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        registry.adapter_capabilities("nosuch")
    known = ", ".join(registry.adapter_names())
    assert caught.value.problems == [f"lis.adapter: unknown adapter 'nosuch' (known: {known})"]
    assert registry.capability_problems("nosuch", False) == caught.value.problems


def test_qlab_with_discovery_has_no_capability_problem() -> None:
    assert registry.capability_problems("qlab", discovery_enabled=True) == []


def test_discovery_with_an_adapter_without_patient_search_is_a_problem(test_adapters) -> None:
    assert registry.capability_problems("hl7", discovery_enabled=False) == []
    assert registry.capability_problems("hl7", discovery_enabled=True) == [
        'discovery.enabled: the "hl7" adapter cannot search orders by patient '
        "(no patient search)"]


def test_an_adapter_that_brings_no_results_is_a_problem(test_adapters) -> None:
    assert registry.capability_problems("pdfonly", discovery_enabled=True) == [
        'lis.adapter: the "pdfonly" adapter cannot bring results (no order lookup, change '
        "feed or inbox)",
        'discovery.enabled: the "pdfonly" adapter cannot search orders by patient '
        "(no patient search)"]


# -- the model ---------------------------------------------------------------------------------

T0 = datetime(2024, 5, 14, 12, 0, tzinfo=UTC)


def _order(changed_at: datetime | None = None, version: str | None = None) -> LisOrder:
    return LisOrder("A-1", OrderStatus.COMPLETED, changed_at=changed_at, version=version)


def test_an_answer_is_older_only_when_both_say_when_and_it_is_earlier() -> None:
    older, newer = _order(T0), _order(T0 + timedelta(seconds=1))
    same_instant = _order(T0.astimezone(timezone(timedelta(hours=3))))

    assert older.is_older_than(newer) and not newer.is_older_than(older)
    assert not older.is_older_than(same_instant) and not same_instant.is_older_than(older)
    assert not _order().is_older_than(newer) and not newer.is_older_than(_order())


def test_versions_only_say_same_or_not() -> None:
    assert _order(version="7").same_version_as(_order(version="7"))
    assert not _order(version="7").same_version_as(_order(version="8"))
    assert not _order().same_version_as(_order())  # no token: nothing is known
    # "9" after "10" is not "older": a token has no order, only changed_at has
    assert not _order(T0, "9").is_older_than(_order(T0, "10"))


def test_a_naive_change_time_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        _order(datetime(2024, 5, 14, 12, 0))


def test_pdf_handles() -> None:
    assert PdfRef.inline(b"%PDF-").kind is PdfKind.INLINE
    assert PdfRef.at("memory://x").url == "memory://x"
    assert PdfRef.by_order() is PdfRef.by_order()
    assert repr(PdfRef.inline(b"x" * 10**6)) == "PdfRef.inline(<1000000 bytes>)"
    with pytest.raises(ValueError):
        PdfRef(PdfKind.URL)
    with pytest.raises(ValueError):
        PdfRef(PdfKind.BY_ORDER, data=b"x")
