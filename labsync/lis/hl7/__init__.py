"""The ``hl7`` adapter: HL7 v2 ORU^R01 results from a drop folder or an MLLP listener,
stored before they are acknowledged (``docs/hl7.md``).

Modules, one idea each: ``text`` (charsets, escapes), ``parse`` (messages, segments,
fields), ``dates``, ``mapping`` (ORU^R01 → orders), ``reader`` (a stored message → a
delivery), ``commit`` (grouped fsyncs), ``spool`` (the folders), ``ack``, ``mllp`` (the
listener), ``folders`` (``labsync check``), ``adapter`` (``Hl7Inbox``).
"""

from labsync.lis.hl7.adapter import Hl7Inbox

__all__ = ["Hl7Inbox"]
