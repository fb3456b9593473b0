"""Optional Prometheus metrics: an HTTP endpoint, a node_exporter textfile, or both.

Disabled unless ``[metrics]`` is configured; then every method is a cheap no-op and
``prometheus_client`` is never imported. Enabled, a failure to record or write metrics is
logged and never reaches the sync pass: losing a sample must not lose a result. The two
exceptions are deliberate and happen at start-up: a missing ``prometheus-client`` package and
a port that cannot be bound are ``ConfigError``s.

Each ``Metrics`` has its own ``CollectorRegistry``, so several of them (tests, ``sync-once``
next to a daemon's) never collide in the process-wide default registry.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import structlog

from labsync.config.metrics import MetricsConfig
from labsync.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = structlog.get_logger("labsync.metrics")

MISSING_PACKAGE = "metrics: prometheus-client is not installed (pip install 'labsync[metrics]')"
ORDER_OUTCOMES = ("completed", "corrected", "rechecked", "cancelled", "pending", "failed",
                  "skipped")
ORDER_STATES = ("pending", "processing", "stale", "failing")
LIS_ERROR_KINDS = (
    "transient",
    "permanent",
    "auth",
    "unknown_order",
    "pdf_not_ready",
    "bad_data",
    "other",
)
PASS_OUTCOMES = ("ok", "lis_auth", "lis_unreachable", "interrupted")
# From a quiet pass over a few orders to a long catch-up after an outage.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class PassTally(Protocol):
    """What ``pass_finished`` reads of a pass (``labsync.passes.PassSummary``): the
    metrics sit below the engine and know only these counts, one per ``ORDER_OUTCOMES``."""

    duration_s: float
    outcome: str
    events: int
    completed: int
    corrected: int
    rechecked: int
    cancelled: int
    pending: int
    failed: int
    skipped: int


class Metrics:
    """No-op unless enabled; never raises into the caller (a metrics failure is logged, not fatal).

    Call ``set_orders`` and ``set_mail_queue`` before ``pass_finished``: the textfile is
    written there, once per pass.
    """

    def __init__(
        self, config: MetricsConfig | None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.enabled = config is not None
        self._clock = clock
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()
        if config is None:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigError([MISSING_PACKAGE]) from None
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._duration = prom.Histogram(
            "labsync_pass_duration_seconds",
            "How long a sync pass took.",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._passes = prom.Counter(
            "labsync_passes", "Sync passes by how they ended.", ["outcome"], registry=reg
        )
        self._processed = prom.Counter(
            "labsync_orders_processed",
            "Orders a pass handled, by what became of them.",
            ["outcome"],
            registry=reg,
        )
        self._mail_events = prom.Counter(
            "labsync_mail_events", "Mail events (b_event rows) labsync queued.", registry=reg
        )
        self._lis_errors = prom.Counter(
            "labsync_lis_errors", "Errors talking to the LIS, by class.", ["kind"], registry=reg
        )
        self._orders = prom.Gauge(
            "labsync_orders", "Orders labsync is tracking, by state.", ["state"], registry=reg
        )
        self._mail_queue = prom.Gauge(
            "labsync_mail_queue_depth", "b_event rows the site has not sent yet.", registry=reg
        )
        self._last_pass = prom.Gauge(
            "labsync_last_pass_timestamp_seconds",
            "When the last pass ended (Unix time).",
            registry=reg,
        )
        self._last_success = prom.Gauge(
            "labsync_last_success_timestamp_seconds",
            "When the last pass that ended ok finished (Unix time).",
            registry=reg,
        )
        # Every label value exists from the start, so a rate() or an alert sees 0, not nothing.
        for outcome in PASS_OUTCOMES:
            self._passes.labels(outcome=outcome)
        for outcome in ORDER_OUTCOMES:
            self._processed.labels(outcome=outcome)
        for kind in LIS_ERROR_KINDS:
            self._lis_errors.labels(kind=kind)
        for state in ORDER_STATES:
            self._orders.labels(state=state)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread, if a port is configured."""
        if self.config is None or self.config.port is None or self._server is not None:
            return
        host, port = self.config.host, self.config.port
        try:
            self._server, self._thread = self._prom.start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            problem = f"metrics.port: cannot listen on {host}:{port} ({reason})"
            raise ConfigError([problem]) from None
        log.info("metrics.listening", host=host, port=self.port)

    @property
    def port(self) -> int | None:
        """The port the endpoint listens on (``None`` when not serving)."""
        return self._server.server_port if self._server is not None else None

    def close(self) -> None:
        """Stop the HTTP server, if one runs. Safe to call twice."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None:
            return
        try:
            server.shutdown()
            server.server_close()
            if thread is not None:
                thread.join(timeout=5)
        except Exception as exc:  # noqa: BLE001 - shutting down must not fail the daemon's exit
            log.warning("metrics.close_failed", error=f"{type(exc).__name__}: {exc}")

    # -- recording ------------------------------------------------------------------------

    def pass_finished(self, summary: PassTally) -> None:
        """Record one finished pass, then write the textfile if one is configured."""
        if self.config is None:
            return
        try:
            now = self._clock()
            self._duration.observe(max(summary.duration_s, 0.0))
            self._passes.labels(outcome=_bounded(summary.outcome, PASS_OUTCOMES)).inc()
            for outcome in ORDER_OUTCOMES:
                count = getattr(summary, outcome)
                if count > 0:
                    self._processed.labels(outcome=outcome).inc(count)
            if summary.events > 0:
                self._mail_events.inc(summary.events)
            self._last_pass.set(now)
            if summary.outcome == "ok":
                self._last_success.set(now)
        except Exception as exc:  # noqa: BLE001 - a metrics bug must not fail the pass
            log.warning("metrics.record_failed", metric="pass", error=_describe(exc))
        if self.config.textfile is not None:
            self.write_textfile()

    def lis_error(self, kind: str) -> None:
        """Count one LIS error; ``kind`` is ``LisError.kind`` (unknown kinds count as other)."""
        if self.config is None:
            return
        try:
            self._lis_errors.labels(kind=_bounded(kind, LIS_ERROR_KINDS)).inc()
        except Exception as exc:  # noqa: BLE001 - see pass_finished
            log.warning("metrics.record_failed", metric="lis_error", error=_describe(exc))

    def set_orders(self, counts: Mapping[str, int]) -> None:
        """Set the orders-by-state gauge; a state missing from ``counts`` is 0."""
        if self.config is None:
            return
        try:
            unknown = sorted(set(counts) - set(ORDER_STATES))
            if unknown:  # a fixed label set: an unexpected state is a caller's bug, not a series
                log.warning("metrics.unknown_state", states=unknown)
            for state in ORDER_STATES:
                self._orders.labels(state=state).set(counts.get(state, 0))
        except Exception as exc:  # noqa: BLE001 - see pass_finished
            log.warning("metrics.record_failed", metric="orders", error=_describe(exc))

    def set_mail_queue(self, depth: int) -> None:
        """Set the mail queue depth: ``b_event`` rows the site has not sent yet."""
        if self.config is None:
            return
        try:
            self._mail_queue.set(depth)
        except Exception as exc:  # noqa: BLE001 - see pass_finished
            log.warning("metrics.record_failed", metric="mail_queue", error=_describe(exc))

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition text, as the endpoint serves it (empty when disabled)."""
        if self.config is None:
            return b""
        return self._prom.generate_latest(self.registry)

    def write_textfile(self) -> None:
        """Write the exposition to ``textfile`` atomically: a temp file, then a rename.

        node_exporter may read the file at any moment; it must see the old text or the new,
        never half of one. The temp name does not end in ``.prom``, so it is never collected.
        """
        if self.config is None or self.config.textfile is None:
            return
        path = self.config.textfile
        with self._write_lock:
            tmp: str | None = None
            try:
                data = self.render()
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fchmod(out.fileno(), 0o644)  # mkstemp makes 0600; node_exporter must read
                    os.fsync(out.fileno())
                os.replace(tmp, path)
                tmp = None
            except Exception as exc:  # noqa: BLE001 - a full disk must not fail the pass
                log.warning("metrics.textfile_failed", path=str(path), error=_describe(exc))
            finally:
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass


def _bounded(value: str, known: tuple[str, ...]) -> str:
    """``value`` if it is a known label value, else ``other``: a label set must stay small."""
    return value if value in known else "other"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
