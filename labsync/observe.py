"""Step 1 of a pass: asking the LIS about one order, in a worker thread.

A worker asks the LIS for the order and, for a completed order, stages its PDF (streamed
into a checked temporary file by ``labsync.pdfs``). It touches no database. Every failure
becomes the observation's ``error``, for the pass's own thread to record against the order;
the LIS circuit breaker (``labsync.breaker``) hears of every answer and failure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from labsync.breaker import Breaker
from labsync.errors import (
    BadLisData,
    Interrupted,
    LabsyncError,
    LisAuthError,
    PdfNotReady,
    TransientLisError,
)
from labsync.lis.base import LisClient
from labsync.model import LisOrder, OrderStatus, PdfRef
from labsync.pdfs import PdfStore, StagedPdf, is_safe_name
from labsync.store.orders import PendingOrder

log = structlog.get_logger("labsync.sync")


@dataclass
class Observation:
    """What a worker learned about one order: the LIS's answer and a staged PDF, or an error."""

    order: PendingOrder
    lis_order: LisOrder | None = None
    pdf: StagedPdf | None = None
    error: LabsyncError | None = None
    skipped: bool = False


class Observer:
    """Asks the LIS about orders; safe to call from many worker threads at once."""

    def __init__(self, lis: LisClient, pdfs: PdfStore, breaker: Breaker, *,
                 fingerprint: Callable[[LisOrder], str], pdf_required: bool,
                 on_refused: Callable[[PendingOrder, str], None] | None = None) -> None:
        self.lis = lis
        self.on_refused = on_refused  # a refused form, for the admin log (told once)
        self.pdfs = pdfs
        self.breaker = breaker
        self.fingerprint = fingerprint
        self.pdf_required = pdf_required

    def observe(self, order: PendingOrder, stop: threading.Event) -> Observation:
        structlog.contextvars.bind_contextvars(order=order.external_id)
        obs = Observation(order)
        if self.breaker.tripped or stop.is_set():
            obs.skipped = True
            return obs
        try:
            if not is_safe_name(order.external_id):
                # Checked before asking the LIS: such an id must never become a path.
                self.pdfs.final_path(order.user_id, order.external_id)
            obs.lis_order = self.lis.fetch_order(order.external_id)
            obs.pdf = self._form(order, obs.lis_order)
            self.breaker.answered()
        except Interrupted:
            obs.skipped = True
        except LisAuthError as exc:
            if self.breaker.refused():
                log.error("lis.auth_failed", error=str(exc))
            obs.error = exc
        except TransientLisError as exc:
            streak = self.breaker.streak + 1
            if self.breaker.failed():
                log.error("lis.unreachable",
                          error=f"{streak} LIS requests in a row failed, the last: {exc}")
            obs.error = exc
        except LabsyncError as exc:
            self.breaker.answered()  # bad data or a 4xx: the LIS is there
            obs.error = exc
        except Exception as exc:  # a bug must not end the pass for every order
            log.exception("order.internal_error")
            obs.error = LabsyncError(f"internal error: {type(exc).__name__}")
        return obs

    def given(self, order: PendingOrder, lis_order: LisOrder) -> Observation:
        """An answer the LIS pushed or listed (an inbox delivery, a change feed's page):
        its PDF staged as for an answer asked for, its failure the observation's error."""
        obs = Observation(order, lis_order)
        try:
            if not is_safe_name(order.external_id):
                self.pdfs.final_path(order.user_id, order.external_id)
            obs.pdf = self._form(order, lis_order)
        except Interrupted:
            obs.skipped = True
        except LabsyncError as exc:
            obs.error = exc
        except Exception as exc:  # a bug must not end the run for every order
            log.exception("order.internal_error")
            obs.error = LabsyncError(f"internal error: {type(exc).__name__}")
        return obs

    def _form(self, order: PendingOrder, lis_order: LisOrder) -> StagedPdf | None:
        """The PDF to stage with this answer, if any: a completion's, or a correction's."""
        if lis_order.status is OrderStatus.COMPLETED and (
                not order.recheck or order.pdf_missing
                or self.fingerprint(lis_order) != order.results_hash):
            # A correction usually comes with a new form: fetch it with the results.
            return self._stage_pdf(order, lis_order.pdf)
        return None

    def _stage_pdf(self, order: PendingOrder, ref: PdfRef | None) -> StagedPdf | None:
        """The order's PDF, staged and checked; None for "no PDF yet" where the order may
        go on without one (``pdf.required = false``, or a completed order asked again)."""
        try:
            if ref is None:  # this answer carries no PDF handle: "no PDF yet"
                raise PdfNotReady(f"PDF of order {order.external_id}: the LIS gave none")
            return self.pdfs.stage(order.user_id, order.external_id, self.lis, ref)
        except (PdfNotReady, BadLisData) as exc:
            if self.pdf_required and not order.pdf_missing:
                raise
            # A refused form counts as none: pdf.required / pdf.wait decide (the planner).
            refused = isinstance(exc, BadLisData)
            log.warning("order.pdf_refused" if refused else "order.pdf_not_ready",
                        error=str(exc)[:300])
            if refused and self.on_refused is not None:
                self.on_refused(order, f"{exc} (the form counts as not there yet)")
            return None
