"""SOAP numbers as the XML wrote them: ``5.40`` stays ``5.40``.

zeep parses ``xs:decimal`` into a ``Decimal`` (which keeps ``3.90``, though not an exponent's
spelling), ``xs:integer`` and its kin into an ``int`` (``007`` becomes 7) and ``xs:float`` /
``xs:double`` into a ``float`` (``5.40`` becomes 5.4). ``keep_number_literals(schema)`` makes
the numeric types of one zeep client's schema parse into their literal text instead
(``JsonNumber``, as the JSON side has it), so the mapper gets the LIS's own digits.

It sets ``pythonvalue`` on the type objects of that schema only: zeep builds them per
client (``Schema._load_default_documents``), so no other zeep client in the process is
touched. Types zeep only meets while parsing (an ``xsi:type`` naming a type no element of
the schema has) keep zeep's own parsing, and the mapper takes their ``Decimal``, ``int``
or ``float`` as described in ``mapper.py``; ``docs/mapped.md`` says so.
"""

from __future__ import annotations

from typing import Any

from zeep.xsd.types import builtins
from zeep.xsd.types.complex import ComplexType

from labsync.lis.body import JsonNumber

_NUMBERS = (builtins.Decimal, builtins.Float, builtins.Double)  # Integer is a Decimal


def _literal(text: str) -> JsonNumber:
    return JsonNumber(text.strip())  # XML Schema collapses the blanks around a number


def keep_number_literals(schema: Any) -> int:
    """Make every numeric type reachable in ``schema`` parse to its literal text; returns
    how many type objects were changed."""
    seen: set[int] = set()
    changed = 0

    def visit(xsd_type: Any) -> None:
        nonlocal changed
        if xsd_type is None or id(xsd_type) in seen:
            return
        seen.add(id(xsd_type))
        if isinstance(xsd_type, _NUMBERS):
            xsd_type.pythonvalue = _literal
            changed += 1
        if isinstance(xsd_type, ComplexType):
            for _name, element in xsd_type.elements:
                visit(getattr(element, "type", None))
            for _name, attribute in xsd_type.attributes:
                visit(getattr(attribute, "type", None))
        for inner in ("item_type", "base_type"):  # lists, and what zeep derived a type from
            visit(getattr(xsd_type, inner, None))
        for inner in getattr(xsd_type, "item_types", None) or ():  # unions
            visit(inner)

    for xsd_type in schema.types:
        visit(xsd_type)
    for element in schema.elements:
        visit(getattr(element, "type", None))
    return changed
