"""SOAP for the mapped adapter: a WSDL's operations called through zeep, the answers as
plain data for the mapper.

- The WSDL (a URL or a file) is loaded on first use, not when the adapter is built: a LIS
  that is down at start delays the first pass, it does not stop the daemon. A failed load
  is tried again on the next call.
- ``order_args`` / ``pdf_args`` are the operation's arguments; ``{id}`` in a string is the
  order's id, ``{auth}`` the credential (``lis.mapped.auth_value``).
- The answer is what ``zeep.helpers.serialize_object`` makes of it: the response wrapper
  unwrapped by zeep, lists inside their wrapper element (``Results.Result[]``), absent
  elements as null, numbers as their literal text (``literals.py``), ``xs:dateTime`` as
  datetimes, ``xs:base64Binary`` as bytes. ``xml_huge_tree`` is on: a base64 PDF is one text
  node, and libxml2 refuses text nodes over 10 MB without it (zeep issues #332, #1362); the
  body cap of ``soap_http.py`` bounds what is parsed instead.
- A fault is an error through ``labsync.lis.classify``: it is classified as the HTTP status
  it stands for (``fault_status``): ``auth_fault`` as 401 (``LisAuthError``),
  ``not_found_fault`` as 404 (``UnknownOrder``, or ``PdfNotReady`` for the PDF operation),
  other ``Client``/``Sender`` faults as 400 (permanent), ``Server``/``Receiver`` faults as
  503 (transient, retried).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests
import zeep
import zeep.exceptions
import zeep.helpers
from lxml import etree

from labsync.config import LisConfig
from labsync.errors import BadLisData, LisError, PermanentLisError
from labsync.lis.classify import NotFound, classify_response, excerpt
from labsync.lis.mapped.literals import keep_number_literals
from labsync.lis.mapped.mapper import Answer
from labsync.lis.mapped.soap_http import LabsyncTransport
from labsync.lis.mapped.spec import Spec

#: An answer's cap, unless it carries a PDF: then the PDF's own cap, as base64, and more.
ANSWER_MAX_BYTES = 10 * 1024 * 1024
_PLACEHOLDER = re.compile(r"\{(id|auth)\}")


def fault_code(fault: zeep.exceptions.Fault) -> str:
    """A fault's code without its namespace prefix: ``Client.OrderNotFound``; a SOAP 1.2
    fault's subcodes follow its code (``Sender.OrderNotFound``)."""
    parts = [str(fault.code or "").rpartition(":")[2]]
    parts += [str(getattr(s, "localname", s)).rpartition(":")[2] for s in fault.subcodes or ()]
    return ".".join(p for p in parts if p)


def fault_status(code: str, spec: Spec) -> int:
    """The HTTP status a SOAP fault code stands for, for ``classify_response`` to judge."""
    if spec.auth_fault and code == spec.auth_fault:
        return 401
    if spec.not_found_fault and code == spec.not_found_fault:
        return 404
    if code.split(".", 1)[0] in ("Server", "Receiver"):
        return 503
    return 400


def fault_error(fault: zeep.exceptions.Fault, spec: Spec, *, what: str, not_found: NotFound,
                redact: tuple[str, ...]) -> LisError:
    """The ``LisError`` a fault means: the classifier's, for the status it stands for."""
    code = fault_code(fault)
    status = fault_status(code, spec)
    stand_in = requests.Response()
    stand_in.status_code = status
    stand_in._content = str(fault.message or "").encode("utf-8", "replace")
    stand_in._content_consumed = True
    label = f"{what}: SOAP fault {excerpt(code, redact=redact)}"
    try:
        classify_response(stand_in, what=f"{label} (as HTTP {status})", not_found=not_found,
                          redact=redact)
    except LisError as exc:
        return exc
    raise AssertionError("a stand-in status of 400 or more always raises")  # pragma: no cover


class SoapLims:
    """One WSDL's service, asked by operation; safe for many threads at once."""

    def __init__(self, config: LisConfig, spec: Spec, headers: dict[str, str], *,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert spec.wsdl is not None and spec.order_operation is not None
        self._spec = spec
        self._address = config.base_url or None
        self._secret = spec.auth_value.reveal()
        self.transport = LabsyncTransport(config, headers, [*config.secret_values(),
                                                            self._secret],
                                          sleep=sleep, clock=clock)
        self._redact = tuple(s for s in (*config.secret_values(), self._secret) if s)
        self._lock = threading.Lock()
        self._service: Any = None
        self._client: Any = None

    def close(self) -> None:
        self.transport.close()

    def redact(self, text: str) -> str:
        return self.transport.redact(text)

    # -- the service ------------------------------------------------------------------------

    def _proxy(self) -> Any:
        """The service proxy, the WSDL loaded on first use (and again after a failure)."""
        with self._lock:
            if self._service is not None:
                return self._service
            what = "the WSDL (lis.mapped.wsdl)"
            settings = zeep.Settings(xml_huge_tree=True, strict=True, forbid_entities=True)
            try:
                client = zeep.Client(self._spec.wsdl, transport=self.transport,
                                     settings=settings)
            except LisError:
                raise
            except (zeep.exceptions.Error, etree.LxmlError, ValueError, OSError) as exc:
                raise PermanentLisError(f"{what} cannot be used: "
                                        f"{excerpt(str(exc), redact=self._redact)}") from None
            keep_number_literals(client.wsdl.types)
            services = list(client.wsdl.services.values())
            ports = list(services[0].ports.values()) if services else []
            if not ports:
                raise PermanentLisError(f"{what} names no service to call")
            binding = ports[0].binding  # the one zeep's client.service calls
            service = (client.create_service(binding.name, self._address) if self._address
                       else client.service)  # lis.base_url, when given, is the endpoint
            operations = set(binding.all())
            for key in ("order_operation", "pdf_operation"):
                name = getattr(self._spec, key)
                if name is not None and name not in operations:
                    raise PermanentLisError(
                        f"lis.mapped.{key}: the WSDL has no operation {name!r} (it has: "
                        f"{', '.join(sorted(operations)) or 'none'})")
            self._client, self._service = client, service
            return service

    # -- calls ------------------------------------------------------------------------------

    def call(self, operation: str, args: Mapping[str, Any], external_id: str, *, what: str,
             not_found: NotFound, max_bytes: int = ANSWER_MAX_BYTES) -> Answer:
        """Call ``operation`` for ``external_id``, retrying what is transient."""
        service = self._proxy()
        filled = {name: _filled(value, external_id, self._secret) for name, value in args.items()}
        key = "order_args" if operation == self._spec.order_operation else "pdf_args"
        try:
            self._client.create_message(service, operation, **filled)
        except (TypeError, zeep.exceptions.Error) as exc:
            raise PermanentLisError(f"{what}: lis.mapped.{key} do not fit operation "
                                    f"{operation}: {excerpt(str(exc), redact=self._redact)}"
                                    ) from None

        def attempt() -> Answer:
            with self.transport.exchange(what, max_bytes) as exchange:
                try:
                    result = service[operation](**filled)
                except zeep.exceptions.Fault as fault:
                    raise fault_error(fault, self._spec, what=what, not_found=not_found,
                                      redact=self._redact) from None
                except zeep.exceptions.Error as exc:
                    raise BadLisData(f"{what}: the answer does not fit the WSDL "
                                     f"({type(exc).__name__}: "
                                     f"{excerpt(str(exc), redact=self._redact)})") from None
            return Answer(exchange.body, zeep.helpers.serialize_object(result, dict))

        answer: Answer = self.transport.retrying(what)(attempt)
        return answer


def _filled(value: Any, external_id: str, secret: str) -> Any:
    """An argument with ``{id}`` and ``{auth}`` filled in, in strings at any depth."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: external_id if m[1] == "id" else secret, value)
    if isinstance(value, list):
        return [_filled(v, external_id, secret) for v in value]
    if isinstance(value, Mapping):
        return {k: _filled(v, external_id, secret) for k, v in value.items()}
    return value
