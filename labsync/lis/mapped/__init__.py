"""The mapped adapter (issue 15): any REST or SOAP LIS, its answers mapped by configuration.

- ``client``: ``MappedClient``, the adapter, and the hooks of ``labsync try-order``;
- ``spec``: ``[lis.mapped]`` compiled, every JMESPath expression once, at start;
- ``mapper``: an answer as plain data → ``labsync.model``, field by field;
- ``rest``: GETs relative to ``lis.base_url`` through ``lis/http.py``;
- ``soap``, ``soap_http``, ``literals``: a WSDL's operations through zeep, on labsync's HTTP
  rules, faults through ``lis/classify.py``, numbers as the XML wrote them.

``docs/mapped.md`` explains the keys with the examples in ``config/examples/``.
"""

from labsync.lis.mapped.client import MappedClient

__all__ = ["MappedClient"]
