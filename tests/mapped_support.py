"""What the mapped adapter's tests share: the example configs pointed at a fake LIMS, and
the conformance glue that scripts the fakes in ``labsync.model`` terms.

The conformance suite runs against the example mappings in ``config/examples/`` as they
are written: only the URLs, the credential and the retry settings are changed for a test.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from labsync import config as config_mod
from labsync.config import Config, LisConfig
from labsync.lis.base import Capability, capabilities
from labsync.lis.mapped import MappedClient
from labsync.model import OrderStatus, Patient, TestResult
from labsync.testing.fake_rest_lims import MEDWORK, NESTED, FakeRestLims
from labsync.testing.lims_server import LimsServer, LisFault
from labsync.testing.soap_lims import SoapLims

EXAMPLES = Path(__file__).resolve().parent.parent / "config" / "examples"
EXAMPLE_OF_SHAPE = {"medwork": "medwork-rest", "nested": "nested-lims", "calab": "calab-soap"}
RETRY_ATTEMPTS = 3
TOKEN = "example-token-0b3d77"
CREDENTIALS = "/run/credentials/labsync.service/"
# (example, where its URL goes): each shape's fake and the text to replace in the file
EXAMPLE_URLS = {"medwork-rest": "https://medwork.example/api/v2",
                "nested-lims": "https://lims.example/lims/v3",
                "calab-soap": "https://calab.example/calab/LabService.svc?wsdl"}
FAST = {"connect_timeout": 2, "read_timeout": 5, "retry_attempts": RETRY_ATTEMPTS,
        "retry_max_seconds": 10}


def no_sleep(seconds: float) -> None:
    """Retries wait for nothing: no test sleeps."""


def example(name: str) -> dict[str, Any]:
    """An example config file, parsed."""
    return tomllib.loads((EXAMPLES / f"{name}.toml").read_text(encoding="utf-8"))


def lis_table(lims: LimsServer, *, example_name: str | None = None, **mapped: Any
              ) -> dict[str, Any]:
    """The example's ``[lis]`` table pointed at ``lims``: its URL and its credential inline
    (instead of a credential file), fast retries; ``mapped`` overrides ``[lis.mapped]`` keys
    (None removes one)."""
    name = example_name or EXAMPLE_OF_SHAPE[shape_of(lims)]
    lis = example(name)["lis"]
    lis.update(FAST)
    table = lis["mapped"]
    table.pop("auth_value_file", None)
    if isinstance(lims, SoapLims):
        table["wsdl"] = lims.wsdl_url
        table["auth_value"] = lims.token
    else:
        assert isinstance(lims, FakeRestLims)
        lis["base_url"] = lims.base_url
        table["auth_value"] = lims.auth_value
    for key, value in mapped.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return lis


def shape_of(lims: LimsServer) -> str:
    if isinstance(lims, SoapLims):
        return "calab"
    assert isinstance(lims, FakeRestLims)
    return lims.shape.name


def config_with(lis: dict[str, Any], **sections: Any) -> Config:
    raw: dict[str, Any] = {"database": {"url": "sqlite:////nonexistent/labsync-test.db"},
                           "pdf": {"dir": "/nonexistent/lab-results"}, "lis": lis}
    raw.update(sections)
    return config_mod.from_mapping(raw, env={})


def lis_config(lims: LimsServer, **mapped: Any) -> LisConfig:
    return config_with(lis_table(lims, **mapped)).lis


def client_for(lims: LimsServer, **mapped: Any) -> MappedClient:
    return MappedClient(lis_config(lims, **mapped), sleep=no_sleep)


class LimsGlue:
    """``lis_server`` of the conformance suite, over any of the fake LIMSes."""

    retry_attempts = RETRY_ATTEMPTS
    says_changed_at = True  # each example maps changed_at and version

    def __init__(self, lims: LimsServer, capabilities: frozenset[Capability]) -> None:
        self.lims = lims
        self.capabilities = capabilities

    def add_order(self, external_id: str, *, status: OrderStatus,
                  results: Sequence[TestResult], pdf: bytes | None, patient: Patient,
                  order_date: date, changed_at: datetime | None = None,
                  version: str | None = None) -> None:
        self.lims.add_order(external_id, status=status, results=results, pdf=pdf,
                            patient=patient, order_date=order_date, changed_at=changed_at,
                            version=version)

    def update_order(self, external_id: str, **changes: Any) -> None:
        self.lims.update_order(external_id, **changes)

    def set_pdf(self, external_id: str, pdf: bytes | None) -> None:
        self.lims.set_pdf(external_id, pdf)

    def fail(self, external_id: str | None, fault: str, *, on: str = "order",
             times: int | None = 1) -> None:
        kind = {"pdf_not_ready": "unknown"}.get(fault, fault)
        self.lims.inject(external_id, on, LisFault(kind), times=times)

    def requests(self, external_id: str, on: str) -> int:
        return self.lims.request_count(on, external_id)


class CapabilitiesByConfig:
    """The suite's first test, plus what the mapped adapter's class declares: what any
    mapping may give (``disabled_capabilities`` takes back what one does not)."""

    def test_the_class_declares_what_any_mapping_may_give(self, lis_client: Any) -> None:
        assert capabilities(type(lis_client)) == {Capability.ORDER_LOOKUP, Capability.PDF,
                                                  Capability.PATIENT_SEARCH}


# -- the examples as installed --------------------------------------------------------------


def fake_of(name: str) -> LimsServer:
    if name == "calab-soap":
        return SoapLims(token=TOKEN)
    return FakeRestLims(MEDWORK if name == "medwork-rest" else NESTED, token=TOKEN)


def write_example(name: str, lims: LimsServer, db_url: str, tmp_path: Path) -> Path:
    """The example file as an operator would install it, pointed at this test's world."""
    text = (EXAMPLES / f"{name}.toml").read_text(encoding="utf-8")
    if isinstance(lims, SoapLims):
        url, secret = lims.wsdl_url, lims.token
    else:
        assert isinstance(lims, FakeRestLims)
        url, secret = lims.base_url, lims.auth_value
    lines = []
    for line in text.splitlines():
        if "db_password" in line:
            continue  # the test database needs none
        if CREDENTIALS in line:
            file_name = line.split(CREDENTIALS)[1].split('"')[0]
            (tmp_path / file_name).write_text(secret + "\n")
            line = line.replace(CREDENTIALS, f"{tmp_path}/")
        lines.append(line)
    text = "\n".join(lines).replace(EXAMPLE_URLS[name], url)
    text = text.replace('url = "mysql+pymysql://labsync@127.0.0.1:3306/bitrix"',
                        f'url = "{db_url}"')
    text = text.replace('dir = "/var/lib/labsync/lab-results"',
                        f'dir = "{tmp_path / "lab-results"}"')
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path
