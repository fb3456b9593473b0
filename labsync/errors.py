"""The exception tree. One place says what is fatal, what is retried and what is refused.

    LabsyncError
    ├── ConfigError          the configuration cannot be used; carries every problem
    ├── StoreError           the database cannot be reached or used
    ├── PdfError             a PDF could not be stored (unsafe name, bad file)
    │   └── DiskError            the PDF folder refuses writes (full, read-only, permissions)
    └── LisError             anything that went wrong talking to the LIS
        ├── TransientLisError    worth retrying: timeouts, resets, 5xx, 429
        ├── PermanentLisError    not worth retrying: other 4xx
        │   ├── LisAuthError         401/403: the API key is wrong; stop asking this pass
        │   ├── UnknownOrder         404 on an order: the LIS does not know it (yet)
        │   └── PdfNotReady          404 on a PDF: the form is not rendered yet
        └── BadLisData           the LIS answered, but with something we refuse

Messages never contain secrets: the LIS layer builds them from the status code, the
path and a short, sanitised excerpt of the body, never from headers or URLs with keys.
"""

from __future__ import annotations


class LabsyncError(Exception):
    """Base of every error labsync raises on purpose."""


class ConfigError(LabsyncError):
    """The configuration cannot be used. ``problems``: one line per problem, naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StoreError(LabsyncError):
    """The database is unreachable or refused an operation labsync needs."""


class PdfError(LabsyncError):
    """A PDF could not be written to its final place (disk full, permissions, unsafe name)."""


class DiskError(PdfError):
    """The PDF folder refused a write: full, read-only, not permitted, over a size limit.

    A problem of the host, not of the order: every order that needs the folder meets it, so
    the admin log gets one line for the pass (``reason``, how many orders it held back), not
    one per order.
    """

    kind = "disk"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class LisError(LabsyncError):
    """Talking to the LIS failed. ``kind`` is a short stable label for logs and metrics."""

    kind = "lis"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientLisError(LisError):
    """Worth another try: connection error, timeout, 5xx, 429.

    ``retry_after`` is the delay in seconds the LIS asked for (429/503 ``Retry-After``), if any.
    """

    kind = "transient"

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentLisError(LisError):
    """The LIS refused the request; asking again the same way will not help."""

    kind = "permanent"


class LisAuthError(PermanentLisError):
    """401/403: the API key is missing or wrong. The pass stops asking the LIS."""

    kind = "auth"


class UnknownOrder(PermanentLisError):
    """404 on an order: the LIS does not know this order (yet)."""

    kind = "unknown_order"


class PdfNotReady(PermanentLisError):
    """404 on an order's PDF: the form is not ready yet; try on a later pass."""

    kind = "pdf_not_ready"


class BadLisData(LisError):
    """The LIS answered with something labsync refuses: bad JSON, wrong shape or type, not a PDF."""

    kind = "bad_data"


class Interrupted(LabsyncError):
    """labsync is stopping: an LIS call gave up waiting so the order in hand can be let go."""
