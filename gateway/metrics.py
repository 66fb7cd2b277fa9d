"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# fine around the dashboard batch interval (50 ms), where a batch's oldest event waits
RELAY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1,
                 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)  # fmt: skip


COMMAND_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.devices_connected = Gauge(
            "gateway_devices_connected", "Device sockets open on this process", registry=r
        )
        self.dashboards_connected = Gauge(
            "gateway_dashboards_connected", "Dashboard sockets open on this process", registry=r
        )
        self.messages_in = Counter(
            "gateway_messages_in", "Frames received from devices", ["type"], registry=r
        )
        self.messages_out = Counter(
            "gateway_messages_out", "Frames sent to sockets", ["kind"], registry=r
        )
        self.batch_size = Histogram(
            "gateway_heartbeat_batch_size",
            "Devices written per heartbeat tick",
            buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 10000),
            registry=r,
        )
        self.redis_latency = Histogram(
            "gateway_redis_seconds",
            "Latency of the gateway's Redis calls",
            ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.transitions = Counter(
            "gateway_presence_transitions",
            "Presence transitions this process published",
            ["status", "reason"],
            registry=r,
        )
        self.slow_clients = Counter(
            "gateway_slow_clients_dropped",
            "Sockets closed for not keeping up",
            ["kind"],
            registry=r,
        )
        self.rejected = Counter(
            "gateway_frames_rejected", "Frames refused, by error code", ["code"], registry=r
        )
        self.handshakes_refused = Counter(
            "gateway_handshakes_refused", "Device handshakes refused", ["status"], registry=r
        )
        # the gateway's own share of a relay's latency, so a load test can tell a slow gateway
        # from a client too busy to read its socket in time
        self.relay = Histogram(
            "gateway_relay_seconds",
            "From a relayed message read off Redis to its frame written to the socket",
            ["kind"],
            buckets=RELAY_BUCKETS,
            registry=r,
        )
        self.resubscriptions = Counter(
            "gateway_pubsub_resubscriptions",
            "Times pub/sub subscriptions had to be placed again, by what found them lost",
            ["reason"],
            registry=r,
        )
        # admission control (gateway/admission.py): connections before they are clients
        self.connections_open = Gauge(
            "gateway_connections_open",
            "Connections open on this process, HTTP and WebSocket (one descriptor each)",
            registry=r,
        )
        self.connections_pending = Gauge(
            "gateway_connections_pending",
            "Connections that have not yet sent a complete request or upgrade",
            registry=r,
        )
        self.connections_limit = Gauge(
            "gateway_connections_limit",
            "Most connections this process holds at once (0: no limit)",
            registry=r,
        )
        self.connections_refused = Counter(
            "gateway_connections_refused",
            "Connections refused at accept, by the limit they met",
            ["limit"],
            registry=r,
        )
        self.handshake_timeouts = Counter(
            "gateway_handshake_timeouts",
            "Connections closed for not sending a complete request or upgrade in time",
            registry=r,
        )

        # commands (gateway/commands/)
        self.commands = Counter(
            "gateway_commands",
            "Command status changes this process made (accepted as queued or sent, re-sent, "
            "finished)",
            ["status"],
            registry=r,
        )
        self.commands_pending = Gauge(
            "gateway_commands_pending",
            "Commands of the whole fleet not final yet, by status (the same in every process)",
            ["status"],
            registry=r,
        )
        self.command_queue_depth = Histogram(
            "gateway_command_queue_depth",
            "A device's pending commands right after one was accepted",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000),
            registry=r,
        )
        self.command_seconds = Histogram(
            "gateway_command_seconds",
            "From a command accepted (since=created) or last sent (since=sent) to its result "
            "stored",
            ["since"],
            buckets=COMMAND_BUCKETS,
            registry=r,
        )

        # MQTT devices (gateway/mqtt/)
        self.mqtt_connected = Gauge(
            "gateway_mqtt_connected",
            "1 while this process is connected to its MQTT broker",
            registry=r,
        )
        self.mqtt_sessions = Gauge(
            "gateway_mqtt_sessions", "MQTT device sessions this process holds", registry=r
        )
        self.mqtt_messages = Counter(
            "gateway_mqtt_messages", "MQTT messages received, by topic", ["topic"], registry=r
        )
        self.mqtt_published = Counter(
            "gateway_mqtt_published", "MQTT messages published, by topic", ["topic"], registry=r
        )
        self.mqtt_dropped = Counter(
            "gateway_mqtt_dropped",
            "MQTT messages dropped (bad_topic, bad_json, bad_payload, oversize, unregistered, "
            "no_session, stale_session, queue_full, outgoing_full, conflict, unavailable)",
            ["reason"],
            registry=r,
        )

        # webhooks (gateway/webhooks/)
        self.webhook_deliveries = Counter(
            "gateway_webhook_deliveries",
            "Webhook delivery attempts this process made, by result",
            ["result"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "gateway_webhook_seconds",
            "From a webhook POST sent to its 2xx answer",
            buckets=COMMAND_BUCKETS,
            registry=r,
        )
        self.webhook_failing = Counter(
            "gateway_webhook_failing",
            "webhook_failing events: endpoints this process marked failing after the retry limit",
            registry=r,
        )
        self.webhook_gaps = Counter(
            "gateway_webhook_gaps",
            "Gap events sent: an endpoint's cursor was trimmed from the fleet log before delivery",
            registry=r,
        )

        # hot-path children, resolved once: labels() takes a lock and a dict lookup per call
        self.in_heartbeat = self.messages_in.labels("heartbeat")
        self.in_report = self.messages_in.labels("report")
        self.in_get = self.messages_in.labels("get")
        self.in_command_result = self.messages_in.labels("command_result")
        self.relay_command = self.relay.labels("command")
        self.relay_dashboard = self.relay.labels("dashboard")
        self._out: dict[str, Any] = {}

    def out(self, kind: str) -> Any:
        child = self._out.get(kind)
        if child is None:
            child = self._out[kind] = self.messages_out.labels(kind)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
