"""Prometheus metrics and the /healthz endpoint (both optional: `--metrics-port`).

One small WSGI server in a background thread serves `/metrics` (prometheus-client's exposition)
and `/healthz` (200 when the delivery loop turns and the database answers, 503 otherwise, with
the reasons as JSON). It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from outbox.domain import Exchange, Outcome, Status

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# Each metric's HELP text, by name.
_HELP = {
    "outbox_rows_settled": "Rows that reached a final state, by status and outcome.",
    "outbox_retries": "Rows scheduled for another attempt, by reason class.",
    "outbox_http_attempts": (
        "HTTP calls to Partnero by kind and answer (the status code, or the transport error)."
    ),
    "outbox_http_request_duration_seconds": "Duration of HTTP calls to Partnero.",
    "outbox_backlog_rows": "Pending rows in outbox.events.",
    "outbox_oldest_pending_age_seconds": "Age of the oldest pending row.",
    "outbox_failed_rows": "Failed rows waiting for a person.",
    "outbox_leases_held": "Rows this daemon holds a lease on.",
    "outbox_loop_lag_seconds": "How late the event loop ran a timed wake-up.",
    "outbox_paused": "1 while sending is paused (the API key refused).",
    "outbox_service_crashes": (
        "Unexpected crashes of the daemon's services (each restarted, or the daemon stops)."
    ),
    "outbox_healthy": "1 while /healthz would answer 200.",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)

        def counter(name: str, *labels: str) -> Counter:
            return Counter(name, _HELP[name], labels, registry=r)

        def gauge(name: str) -> Gauge:
            return Gauge(name, _HELP[name], registry=r)

        self.settled = counter("outbox_rows_settled", "status", "outcome")
        self.retries = counter("outbox_retries", "reason")
        self.attempts = counter("outbox_http_attempts", "kind", "status")
        latency = "outbox_http_request_duration_seconds"
        self.latency = Histogram(
            latency, _HELP[latency], ["kind"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.backlog = gauge("outbox_backlog_rows")
        self.oldest_pending = gauge("outbox_oldest_pending_age_seconds")
        self.failed = gauge("outbox_failed_rows")
        self.leases = gauge("outbox_leases_held")
        self.loop_lag = gauge("outbox_loop_lag_seconds")
        self.paused = gauge("outbox_paused")
        self.service_crashes = counter("outbox_service_crashes", "service")
        self.healthy = gauge("outbox_healthy")

    def observe_result(
        self, status: Status, outcome: Outcome | None, reason: Outcome | None
    ) -> None:
        """A result the writer recorded: a settled row by status and outcome, a retry by its
        reason class (typed, never read back out of the error text)."""
        if status in (Status.DELIVERED, Status.SKIPPED, Status.FAILED):
            self.settled.labels(status.value, "" if outcome is None else outcome.value).inc()
        elif reason is not None:
            self.retries.labels(reason.value).inc()

    def observe_exchange(self, exchange: Exchange) -> None:
        status = (
            exchange.transport_error.value
            if exchange.transport_error is not None
            else str(exchange.status_code)
        )
        self.attempts.labels(exchange.kind.value, status).inc()
        if exchange.started_at is not None and exchange.finished_at is not None:
            seconds = (exchange.finished_at - exchange.started_at).total_seconds()
            self.latency.labels(exchange.kind.value).observe(max(0.0, seconds))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return  # the daemon logs with structlog; scrapes are not news


class _Server(WSGIServer):
    daemon_threads = True


class MetricsServer:
    def __init__(self, metrics: Metrics, health: HealthCheck, host: str, port: int) -> None:
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._health = health
        self._metrics = metrics
        self._server = make_server(
            host, port, self._app, server_class=_Server, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outbox-metrics", daemon=True
        )

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, detail = self._health()
            self._metrics.healthy.set(1 if ok else 0)
            body = json.dumps({"healthy": ok, **detail}, default=str).encode()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        result: Iterable[bytes] = self._metrics_app(environ, start_response)
        return result

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
