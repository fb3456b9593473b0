"""The FHIR R4 adapter (issue 13): ``FhirClient``, over a narrow reader of FHIR JSON.

- ``client``: the adapter (order lookup, change feed, PDFs), over ``lis/http.py``;
- ``reader``: a DiagnosticReport and its Observations as a ``LisOrder`` (the mapping);
- ``values``, ``elements``: Observation values and FHIR data types as text;
- ``bundle``: search Bundles, references, next links;
- ``links``: what lies under ``lis.base_url``, and the feed's cursor;
- ``binary``: a ``Binary`` download, raw or as JSON.
"""

from labsync.lis.fhir.client import FhirClient

__all__ = ["FhirClient"]
