"""Prometheus metrics at ``/metrics``, read from the hub's own counters at scrape time.

The hot path only bumps plain integers on connections and the hub; this
collector turns them into metric families when Prometheus scrapes, so a
delivery never pays for a metrics lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from ..protocol import codes
from ..schema import Schema
from .wires import WIRES

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["HubCollector", "metrics_endpoint"]

#: The reason of each disconnect code (the first constant of a code names it:
#: 3503 is "force disconnect" even though a block uses it with "blocked").
_REASONS: dict[int, str] = {}
for _value in vars(codes).values():
    if isinstance(_value, codes.Disconnect):
        _REASONS.setdefault(_value.code, _value.reason)


class HubCollector(Collector):
    """Collects the hub's counters for Prometheus."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        live: dict[str, list[int]] = {name: [0, 0, 0, 0, 0] for name in WIRES}
        queue = 0
        fast = 0
        for conn in list(hub.connections.values()):
            fast += conn.fast_path
            row = live[conn.transport_name]
            row[0] += 1
            row[1] += conn.messages_out
            row[2] += conn.bytes_out
            row[3] += conn.messages_in
            row[4] += conn.bytes_in
            queue += conn.queued_bytes()
        connections = GaugeMetricFamily(
            "eventcast_connections", "Open client connections.", labels=["transport"]
        )
        sent = CounterMetricFamily(
            "eventcast_messages_sent", "Messages written to clients.", labels=["transport"]
        )
        sent_bytes = CounterMetricFamily(
            "eventcast_bytes_sent", "Bytes written to clients.", labels=["transport"]
        )
        received = CounterMetricFamily(
            "eventcast_messages_received", "Frames received from clients.", labels=["transport"]
        )
        received_bytes = CounterMetricFamily(
            "eventcast_bytes_received", "Bytes received from clients.", labels=["transport"]
        )
        for transport, row in live.items():
            closed = hub.closed_totals.get(transport, (0, 0, 0, 0))
            connections.add_metric([transport], row[0])
            sent.add_metric([transport], row[1] + closed[0])
            sent_bytes.add_metric([transport], row[2] + closed[1])
            received.add_metric([transport], row[3] + closed[2])
            received_bytes.add_metric([transport], row[4] + closed[3])
        yield connections
        yield GaugeMetricFamily(
            "eventcast_connections_fast_path",
            "Connections written pre-framed straight to the socket (eventcast serve).",
            value=fast,
        )
        yield sent
        yield sent_bytes
        yield received
        yield received_bytes
        yield GaugeMetricFamily(
            "eventcast_subscriptions",
            "Channel subscriptions of connected clients.",
            value=hub.channels.subscriptions,
        )
        yield GaugeMetricFamily(
            "eventcast_channels", "Channels with subscribers on this node.", value=len(hub.channels)
        )
        yield GaugeMetricFamily(
            "eventcast_cluster_nodes",
            "Live nodes of the cluster (this one and those heard from in time).",
            value=1 + len(hub.cluster.nodes),
        )
        yield GaugeMetricFamily(
            "eventcast_queue_bytes", "Bytes queued for clients, not yet written.", value=queue
        )
        bus = hub.bus.statistics()
        yield CounterMetricFamily(
            "eventcast_publications", "Publications fanned out by the bus.", value=bus["published"]
        )
        yield CounterMetricFamily(
            "eventcast_dropped", "Events dropped by overflow policies.", value=bus["dropped"]
        )
        yield CounterMetricFamily(
            "eventcast_publications_conflated",
            "Publications a client that fell behind skipped: a newer one of its key replaced them.",
            value=hub.channels.conflated,
        )
        yield GaugeMetricFamily(
            "eventcast_emulation_sessions",
            "HTTP-streaming and SSE emulation sessions on this node.",
            value=len(hub.emulation),
        )
        yield GaugeMetricFamily(
            "eventcast_dead_letters", "Dead letters kept.", value=bus["dead_letters"]
        )
        refused = CounterMetricFamily(
            "eventcast_publications_refused",
            "Publications refused because their data broke the namespace's schema.",
            labels=["namespace", "reason"],
        )
        for name, namespace in sorted(hub.bus.namespaces.items()):
            schema = namespace.schema
            if isinstance(schema, Schema):
                refused.add_metric([name, "schema"], schema.refused)
        yield refused
        disconnects = CounterMetricFamily(
            "eventcast_disconnects", "Client disconnects by code.", labels=["code", "reason"]
        )
        for code, count in sorted(hub.disconnects.items()):
            disconnects.add_metric([str(code), _REASONS.get(code, "")], count)
        yield disconnects
        recoveries = CounterMetricFamily(
            "eventcast_recoveries", "Resumes from a position, by outcome.", labels=["result"]
        )
        recoveries.add_metric(["ok"], hub.recoveries[True])
        recoveries.add_metric(["failed"], hub.recoveries[False])
        yield recoveries
        handshakes = CounterMetricFamily(
            "eventcast_handshakes_refused", "Handshakes refused, by reason.", labels=["reason"]
        )
        for reason, count in hub.refused.items():
            handshakes.add_metric([reason], count)
        yield handshakes
        api = CounterMetricFamily(
            "eventcast_api_calls",
            "HTTP API calls by method and result.",
            labels=["method", "result"],
        )
        for (method, result), count in sorted(hub.api_calls.items()):
            api.add_metric([method, result], count)
        yield api
        hook_calls = CounterMetricFamily(
            "eventcast_hook_calls",
            "Application hook calls by hook and outcome (ok, rejected, error, timeout).",
            labels=["hook", "result"],
        )
        for (kind, outcome), count in sorted(hub.commands.hooks.calls.items()):
            hook_calls.add_metric([kind, outcome], count)
        yield hook_calls
        webhooks = hub.webhooks
        if webhooks is not None:
            deliveries = CounterMetricFamily(
                "eventcast_webhook_events",
                "Lifecycle webhook events by webhook and outcome (delivered, failed).",
                labels=["webhook", "result"],
            )
            queued = GaugeMetricFamily(
                "eventcast_webhook_queue", "Events waiting for a webhook.", labels=["webhook"]
            )
            for endpoint in webhooks.endpoints:
                deliveries.add_metric([endpoint.subscriber, "delivered"], endpoint.delivered)
                deliveries.add_metric([endpoint.subscriber, "failed"], endpoint.failed)
                queued.add_metric([endpoint.subscriber], endpoint.queued)
            yield deliveries
            yield queued
        latency = hub.bus.append_latency
        yield HistogramMetricFamily(
            "eventcast_log_append_seconds",
            "Time to commit a durable publish to the log.",
            buckets=[
                ("+Inf" if bound == float("inf") else str(bound), count)
                for bound, count in latency.cumulative()
            ],
            sum_value=latency.total,
        )
        yield GaugeMetricFamily(
            "eventcast_backplane_up",
            "1 when the backplane is connected (always 1 for the memory backplane).",
            value=1 if hub.backplane_up() else 0,
        )
        yield from _consumer_metrics(hub)


def _consumer_metrics(hub: Hub) -> Iterator[Metric]:
    """Each consumer of :mod:`eventcast.ingest`: messages, dead letters, errors, lag, state."""
    from ..ingest.base import ConsumerState

    consumers = hub.consumers
    if not consumers:
        return
    labels = ["consumer", "type"]
    processed = CounterMetricFamily(
        "eventcast_consumer_messages",
        "Messages a consumer acknowledged to its source (published or dead-lettered).",
        labels=labels,
    )
    dead = CounterMetricFamily(
        "eventcast_consumer_dead_letters",
        "Consumed messages kept as dead letters, by reason.",
        labels=[*labels, "reason"],
    )
    errors = CounterMetricFamily(
        "eventcast_consumer_errors",
        "Failures of a consumer's source or of the hub, each followed by a reconnect.",
        labels=labels,
    )
    lag = GaugeMetricFamily(
        "eventcast_consumer_lag",
        "Messages waiting at the source (sources that tell: outbox, AMQP, Redis, JetStream).",
        labels=labels,
    )
    up = GaugeMetricFamily(
        "eventcast_consumer_up", "1 when a consumer is connected and consuming.", labels=labels
    )
    for consumer in consumers:
        key = [consumer.name, consumer.type]
        stats = consumer.stats
        processed.add_metric(key, stats.processed)
        for reason, count in sorted(stats.rejected_by_reason.items()):
            dead.add_metric([*key, reason], count)
        errors.add_metric(key, stats.errors)
        if stats.lag is not None:
            lag.add_metric(key, stats.lag)
        up.add_metric(key, 1 if consumer.state is ConsumerState.RUNNING else 0)
    yield processed
    yield dead
    yield errors
    yield lag
    yield up


async def metrics_endpoint(request: Request) -> Response:
    """Serve ``/metrics`` in the Prometheus text format."""
    state = request.app.state
    registry = getattr(state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(HubCollector(state.hub))
        state.metrics_registry = registry
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")
