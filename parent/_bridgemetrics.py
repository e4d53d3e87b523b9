"""Plumbing of the bridge (:mod:`parent.bridge`): its metric families and its request budgets.

Metrics carry route names, statuses, sizes and times, never a path, a header or a body.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from parent.enclave_link import EnclaveLink
from parent.metrics import Gauge, Registry

__all__ = ["BridgeMetrics", "Slots"]


class Slots:
    """A budget of ``limit`` requests at once, mirrored in a gauge; callers check :meth:`full`
    and refuse (429) rather than wait."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self.used = 0
        self._gauge = gauge
        gauge.set(0)

    def full(self) -> bool:
        return self.used >= self.limit

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.used += 1
        self._gauge.set(self.used)
        try:
            yield
        finally:
            self.used -= 1
            self._gauge.set(self.used)


class BridgeMetrics:
    """The bridge's families on ``registry``, and the enclave's state as ``link`` last saw it."""

    def __init__(self, registry: Registry, link: EnclaveLink) -> None:
        self.requests = registry.counter(
            "nci_bridge_requests_total", "HTTP requests answered, by route and status.",
            ("route", "status"),
        )  # fmt: skip
        self.bytes_in = registry.counter(
            "nci_bridge_request_bytes_total", "Request body bytes received, by route.", ("route",)
        )
        self.bytes_out = registry.counter(
            "nci_bridge_response_bytes_total", "Response body bytes sent, by route.", ("route",)
        )
        self.latency = registry.histogram(
            "nci_bridge_request_duration_seconds",
            "Time from the request's headers to the end of its response, by route.",
            ("route",),
        )
        self.aborted = registry.counter(
            "nci_bridge_aborted_streams_total",
            "Responses cut off after they started (enclave failure, deadline, consumer gone).",
            ("reason",),
        )
        self.in_flight = registry.gauge(
            "nci_bridge_inference_in_flight", "Inference requests in progress (body received)."
        )
        self.uploads = registry.gauge(
            "nci_bridge_uploads_in_flight", "Inference request bodies being received."
        )
        self.attestations = registry.gauge(
            "nci_bridge_attestations_in_flight", "Attestation requests waiting on the enclave."
        )

        def enclave_state() -> list[tuple[dict[str, str], float]]:
            health = link.last_health
            current = "unreachable" if not link.connected else (health.state if health else "")
            return [
                ({"state": state}, 1.0 if state == current else 0.0)
                for state in ("booting", "ready", "failed", "unreachable")
            ]

        registry.callback(
            "nci_enclave_state", "The enclave's state as last seen (1 = current).", "gauge",
            enclave_state, ("state",),
        )  # fmt: skip
        registry.callback(
            "nci_enclave_connections_total", "Control connections made to the enclave.",
            "counter", lambda: [({}, link.connections)],
        )  # fmt: skip
        registry.callback(
            "nci_enclave_open_streams", "Requests waiting on the control connection.", "gauge",
            lambda: [({}, link.open_streams)],
        )  # fmt: skip
        registry.callback(
            "nci_enclave_served_total", "Inference requests the enclave reports answered.",
            "counter", lambda: [({}, link.last_health.served if link.last_health else 0)],
        )  # fmt: skip
