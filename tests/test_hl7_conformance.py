"""The HL7 adapter (``labsync.lis.hl7``) against the shared suite: deliveries are real
ORU^R01 files dropped into its folder, and its inbox state is read from the folders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from labsync.config import LisConfig
from labsync.lis.base import Capability
from labsync.lis.hl7 import Hl7Inbox
from labsync.lis.hl7.spool import key_for
from labsync.model import LisOrder
from labsync.testing.hl7_sender import drop, oru
from tests.lis_conformance import LisClientConformance

# A crash in a listener or reader thread fails the test, not only warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

ZONE = ZoneInfo("Europe/Moscow")


def hl7_config(drop_dir: Path, **options: Any) -> LisConfig:
    return LisConfig(adapter="hl7", base_url="", options=MappingProxyType(
        {"drop_dir": drop_dir, **options}))


def make_inbox(drop_dir: Path, **kwargs: Any) -> Hl7Inbox:
    kwargs.setdefault("settle", 0.0)
    return Hl7Inbox(hl7_config(drop_dir), zone=ZONE, **kwargs)


class Hl7Server:
    """``lis_server``: the LIS writes each delivery as an ORU^R01 file into the drop folder.

    MSH-7 carries no offset (site time, Europe/Moscow here), so that a result date the suite
    gives without an offset stays without one, as HL7 says it then does.
    """

    capabilities = frozenset({Capability.INBOX})
    retry_attempts = 1
    says_changed_at = True

    def __init__(self, drop_dir: Path) -> None:
        self.drop_dir = drop_dir
        self.clients: list[Hl7Inbox] = []

    def deliver(self, delivery_id: str, orders: Sequence[LisOrder]) -> None:
        sent_at = orders[0].changed_at
        assert sent_at is not None
        data = oru(delivery_id, orders, sent_at=sent_at.astimezone(ZONE).replace(tzinfo=None))
        drop(self.drop_dir, f"{delivery_id}.hl7", data)

    @staticmethod
    def delivered_version(delivery_id: str, sent: str | None) -> str:
        """HL7 v2 has no version of an order, only the message's control id (MSH-10): that is
        every order's ``version``, whatever the order was sent with."""
        return delivery_id

    def deliver_unreadable(self, delivery_id: str) -> None:
        data = (f"MSH|^~\\&|||||20240514120000||ADT^A01|{delivery_id}|P|2.5.1\r"
                "PID|1||X\r").encode()
        drop(self.drop_dir, f"{delivery_id}.hl7", data)

    def inbox_state(self, delivery_id: str) -> str:
        key = key_for(delivery_id, delivery_id)
        name = f"{key}.hl7"
        if list((self.drop_dir / "queue").glob(f"{key}.*.hl7")):
            return "waiting"
        if (self.drop_dir / "done" / name).exists():
            return "done"
        reason = self.drop_dir / "error" / f"{name}.reason"
        if (self.drop_dir / "error" / name).exists() and reason.exists():
            return f"failed: {reason.read_text('utf-8').strip()}"
        return "absent"

    def restarted_client(self) -> Hl7Inbox:
        client = make_inbox(self.drop_dir)
        self.clients.append(client)
        return client


@pytest.fixture
def lis_server(tmp_path: Path) -> Iterator[Hl7Server]:
    server = Hl7Server(tmp_path / "hl7")
    server.drop_dir.mkdir()
    yield server
    for client in server.clients:
        client.close()


@pytest.fixture
def lis_client(lis_server: Hl7Server) -> Iterator[Hl7Inbox]:
    client = make_inbox(lis_server.drop_dir)
    yield client
    client.close()


class TestHl7Conformance(LisClientConformance):
    """The shared suite, run against the HL7 inbox."""


def test_the_hl7_adapter_declares_only_the_inbox() -> None:
    from labsync.lis.base import capabilities
    from labsync.lis.registry import adapter_capabilities

    assert capabilities(Hl7Inbox) == {Capability.INBOX}
    assert adapter_capabilities("hl7") == {Capability.INBOX}


# -- the adapter's section of the config --------------------------------------------------------


def _load(tmp_path: Path, **hl7: Any) -> Any:
    from labsync import config as config_mod

    return config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path / 'site.db'}"},
        "lis": {"adapter": "hl7", "hl7": {"drop_dir": str(tmp_path / "hl7"), **hl7}},
        "pdf": {"dir": str(tmp_path / "pdfs")}}, env={})


def _problems(tmp_path: Path, **hl7: Any) -> list[str]:
    from labsync.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, **hl7)
    return caught.value.problems


def test_an_hl7_config_needs_no_base_url_and_no_credential(tmp_path: Path) -> None:
    config = _load(tmp_path, listen="0.0.0.0:2575", allow=["127.0.0.1", "10.1.2.0/24"])

    options = config.lis.options
    assert options["drop_dir"] == tmp_path / "hl7" and options["listen"] == "0.0.0.0:2575"
    assert options["allow"] == ("127.0.0.1/32", "10.1.2.0/24")
    assert (options["order_id"], options["encoding"]) == ("placer", "utf-8")
    assert (options["hold_unknown"], options["keep_done"]) == (7 * 86400.0, 30 * 86400.0)
    inbox = Hl7Inbox(config.lis)
    assert inbox.listen == ("0.0.0.0", 2575) and len(inbox.allow) == 2


def test_the_defaults_allow_only_this_host(tmp_path: Path) -> None:
    assert _load(tmp_path).lis.options["allow"] == ("127.0.0.1/32", "::1/128")


@pytest.mark.parametrize(("key", "value", "words"), [
    ("listen", "2575", "lis.hl7.listen: '2575' is not host:port"),
    ("listen", "127.0.0.1:0", "lis.hl7.listen: port 0 is not between 1 and 65535"),
    ("listen", "127.0.0.1:99999", "lis.hl7.listen: port 99999"),
    ("allow", ["127.0.0.1", "lab.example"], "lis.hl7.allow: 'lab.example' is not an IP"),
    ("allow", [], "lis.hl7.allow: lists no address"),
    ("allow", "127.0.0.1", "lis.hl7.allow: must be an array of strings"),
    ("order_id", "accession", "lis.hl7.order_id: must be one of placer, filler"),
    ("encoding", "klingon-8", "lis.hl7.encoding: 'klingon-8' is not a character set"),
    ("drop_dir", "relative/hl7", "lis.hl7.drop_dir"),
    ("hold_unknown", "soon", "lis.hl7.hold_unknown"),
    ("frobnicate", "1", "lis.hl7.frobnicate: unknown key"),
])
def test_each_bad_hl7_key_is_one_problem_naming_it(tmp_path: Path, key: str, value: str,
                                                   words: str) -> None:
    problems = _problems(tmp_path, **{key: value})

    assert any(p.startswith(words) for p in problems), problems


def test_discovery_is_a_configuration_problem_with_hl7() -> None:
    from labsync.lis.registry import capability_problems

    assert capability_problems("hl7", discovery_enabled=False) == []
    assert capability_problems("hl7", discovery_enabled=True) == [
        'discovery.enabled: the "hl7" adapter cannot search orders by patient '
        "(no patient search)"]
