"""``MappedClient``: any REST or SOAP LIS, by configuration (``[lis.mapped]``, issue 15).

What it can do depends on its section, so the class declares every capability such an LIS
may have and ``disabled_capabilities`` takes back what the section does not give: a PDF
source needs ``pdf_url`` (REST) or ``pdf_operation`` (SOAP), and patient search needs
``find_url``. A PDF inside the order's answer (``pdf_base64`` without a source) comes as
``PdfRef.inline``, which needs no PDF source at all.

For the dry run (``labsync try-order``) the adapter also hands out the answer as received,
before it is mapped: ``answer_as_received`` then ``order_from_answer`` is exactly
``fetch_order``, and ``field_sources`` says which expression gives each field.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from datetime import date
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from labsync.config import LisConfig
from labsync.errors import BadLisData, ConfigError, PdfNotReady, PermanentLisError, UnknownOrder
from labsync.lis.base import Capability, OrderLookup, PatientSearch, PdfSource
from labsync.lis.classify import excerpt
from labsync.lis.mapped import mapper
from labsync.lis.mapped.mapper import Answer
from labsync.lis.mapped.rest import PROBE_ID, RestLims
from labsync.lis.mapped.spec import Expression, spec_from
from labsync.model import BY_ORDER, LisOrder, LisOrderRef, PdfKind, PdfRef

if TYPE_CHECKING:
    from labsync.lis.mapped.soap import SoapLims

_T = TypeVar("_T")
ANSWER_MAX_BYTES = 10 * 1024 * 1024
# An order's answer that carries its PDF as base64: pdf.max_bytes (50 MB by default) as
# base64, and room for the rest of the answer.
INLINE_ANSWER_MAX_BYTES = 72 * 1024 * 1024
_CHUNK = 64 * 1024


class MappedClient(OrderLookup, PdfSource, PatientSearch):
    """An LIS whose answers ``[lis.mapped]`` maps: REST at ``lis.base_url`` or SOAP by WSDL."""

    def __init__(self, config: LisConfig, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        spec = spec_from(config.options)
        self.spec = spec
        self._shared_credential = config.credential
        problems = []
        if not config.base_url:
            if spec.transport == "rest":
                problems.append('lis.base_url: required with lis.mapped.transport = "rest"')
            elif spec.find_url:
                problems.append("lis.base_url: required with lis.mapped.find_url (it is "
                                "relative to lis.base_url)")
        if problems:
            raise ConfigError(problems)
        if spec.auth_header and spec.auth_value:
            # The whole header value is the credential ("Token abc"): lis.auth = "header".
            config = dataclasses.replace(config, auth="header", auth_header=spec.auth_header,
                                         auth_value=spec.auth_value)
        self._answer_max = INLINE_ANSWER_MAX_BYTES if spec.inline_pdf else ANSWER_MAX_BYTES
        self._rest: RestLims | None = None
        self._soap: SoapLims | None = None
        if spec.transport == "rest" or spec.find_url:
            self._rest = RestLims(config, spec, answer_max_bytes=self._answer_max,
                                  sleep=sleep, clock=clock)
        if spec.transport == "soap":
            from labsync.lis.mapped.soap import SoapLims  # zeep only for a SOAP LIS

            self._soap = SoapLims(config, spec, config.auth_headers(), sleep=sleep,
                                  clock=clock)

    @property
    def credential(self) -> tuple[str, str]:
        """(the key to fix, what it holds) when the LIS refuses the credential, as
        ``LisConfig.credential`` says it for the shared ``[lis]`` keys."""
        if self.spec.auth_value:
            return "lis.mapped.auth_value", "credential"
        return self._shared_credential

    @property
    def location(self) -> tuple[str, str] | None:
        """(the key, where) this adapter reaches its LIS, for ``check``: the WSDL of a SOAP
        LIS (its endpoint is the WSDL's); None for REST (``lis.base_url``)."""
        if self.spec.transport == "soap" and self.spec.wsdl:
            return "lis.mapped.wsdl", self.spec.wsdl
        return None

    def disabled_capabilities(self) -> frozenset[Capability]:
        off = set()
        if not self.spec.has_pdf_source:
            off.add(Capability.PDF)
        if not self.spec.find_url:
            off.add(Capability.PATIENT_SEARCH)
        return frozenset(off)

    def close(self) -> None:
        for part in (self._rest, self._soap):
            if part is not None:
                part.close()

    def probe(self) -> None:
        """REST: ``probe_url``, or ``order_url`` for an id no LIS has; SOAP: the WSDL loads and
        ``order_operation`` answers for such an id (``not_found_fault`` counts as an answer)."""
        if self._soap is None:
            assert self._rest is not None
            self._rest.probe()
            return
        try:
            self._order_answer(PROBE_ID)
        except UnknownOrder:
            pass

    # -- OrderLookup --------------------------------------------------------------------------

    def fetch_order(self, external_id: str) -> LisOrder:
        """The order by ``order_url`` / ``order_operation``, mapped; ``UnknownOrder`` on 404
        or the ``not_found_fault``."""
        return self.order_from_answer(external_id, self._order_answer(external_id))

    def answer_as_received(self, external_id: str) -> Answer:
        """The LIS's answer about the order, not yet mapped: its body as received (every
        secret masked) and its plain data."""
        return self._order_answer(external_id)

    def order_from_answer(self, external_id: str, answer: Answer) -> LisOrder:
        """``answer`` mapped to the order; ``BadLisData`` naming the order and the key."""
        return self._validated(mapper.order_from, external_id, answer.data, self.spec)

    def field_sources(self) -> dict[str, str]:
        """Each mapped field (``status``, ``results.value``, …) and its expression."""
        return self.spec.sources()

    def _order_answer(self, external_id: str) -> Answer:
        what = f"order {excerpt(external_id)}"
        if self._soap is not None:
            assert self.spec.order_operation is not None
            return self._soap.call(
                self.spec.order_operation, self.spec.order_args, external_id, what=what,
                not_found=UnknownOrder, max_bytes=self._answer_max)
        assert self._rest is not None
        return self._rest.order(external_id, what=what)

    # -- PdfSource ----------------------------------------------------------------------------

    def fetch_pdf(self, external_id: str, sink: BinaryIO, *, max_bytes: int,
                  ref: PdfRef = BY_ORDER) -> int:
        """``GET pdf_url`` (streamed), or the ``pdf_operation``'s answer at ``pdf_base64``."""
        what = f"PDF of order {excerpt(external_id)}"
        if ref.kind is not PdfKind.BY_ORDER:
            raise BadLisData(f"{what}: this adapter gives PDFs by order id only, not {ref.kind}")
        if not self.spec.has_pdf_source:
            raise PermanentLisError(f"{what}: no PDF source (lis.mapped.pdf_url or "
                                    "lis.mapped.pdf_operation is not set)")
        if self._soap is None:
            assert self._rest is not None
            return self._rest.pdf(external_id, sink, what=what, max_bytes=max_bytes)
        assert self.spec.pdf_operation is not None
        answer = self._soap.call(self.spec.pdf_operation, self.spec.pdf_args, external_id,
                                 what=what, not_found=PdfNotReady,
                                 max_bytes=max_bytes * 4 // 3 + 1024 * 1024)
        where = self.spec.pdf_base64 or _WHOLE_ANSWER
        data = self._validated(mapper.pdf_bytes, where.search(answer.data, what), what, where)
        if not data:
            raise PdfNotReady(f"{what}: the LIS gave none yet ({where.key} ({where.text}) gave "
                              "nothing)")
        if len(data) > max_bytes:
            raise BadLisData(f"{what}: the PDF is over {max_bytes} bytes")
        sink.seek(0)
        sink.truncate()
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            sink.write(view[start:start + _CHUNK])
        sink.flush()
        return len(data)

    # -- PatientSearch ------------------------------------------------------------------------

    def find_orders(self, phone: str, date_from: date) -> Sequence[LisOrderRef]:
        """``GET find_url``; each ``find_each`` item by ``[lis.mapped.find]``."""
        if self._rest is None or not self.spec.find_url:
            raise PermanentLisError("the mapped adapter cannot search orders by patient "
                                    "(lis.mapped.find_url is not set)")
        what = f"orders of phone {_mask(phone)}"
        answer = self._rest.find(phone, date_from, what=what)
        return self._validated(mapper.refs_from, answer.data, what, self.spec)

    def _validated(self, parse: Callable[..., _T], *args: Any) -> _T:
        """``parse(*args)``; its messages quote LIS values, which might echo a secret."""
        try:
            return parse(*args)
        except BadLisData as exc:
            part = self._soap if self._soap is not None else self._rest
            raise BadLisData(part.redact(str(exc)) if part else str(exc),
                             status=exc.status) from None


def _whole_answer() -> Expression:
    import jmespath

    return Expression("lis.mapped.pdf_base64", "@", jmespath.compile("@"))


_WHOLE_ANSWER = _whole_answer()


def _mask(phone: str) -> str:
    """A phone number for messages: enough to tell patients apart, not enough to call them."""
    return f"…{phone[-4:]}" if isinstance(phone, str) and len(phone) > 4 else "…"
