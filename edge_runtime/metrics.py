"""Prometheus metrics of one edge daemon, in their own registry (no global state).

Latency histograms are taken where the client feels them: in the HTTP layer,
from the request's arrival to the first token event (time to first token) and
between token events (inter-token latency).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EdgeMetrics:
    """All series the edge exports; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fogline_edge_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("fogline_edge_tokens", "Completion tokens by where they were decided",
                              ["origin"], registry=r)
        for origin in ("edge", "cloud", "draft"):
            self.tokens.labels(origin)  # every series exists from the start
        self.prompt_tokens = Counter("fogline_edge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.finished = Counter("fogline_edge_finished", "Generations by finish reason", ["reason"], registry=r)
        self.fallbacks = Counter("fogline_edge_fallbacks", "Requests served in edge mode instead of the mode asked for",
                                 ["requested"], registry=r)
        self.ttft = Histogram("fogline_edge_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fogline_edge_inter_token_latency_seconds", "Time between consecutive tokens of a stream",
                             buckets=_ITL_BUCKETS, registry=r)
        self.duration = Histogram("fogline_edge_request_duration_seconds", "Request arrival to last token",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("fogline_edge_queue_depth", "Requests waiting for a free sequence", registry=r)
        self.active = Gauge("fogline_edge_active_sequences", "Sequences being decoded", registry=r)
        self.ready = Gauge("fogline_edge_ready", "1 once the model is loaded and the engine runs", registry=r)
        self.request_bytes = Counter("fogline_edge_request_cloud_bytes",
                                     "Websocket bytes (frames as sent/received) of finished requests' cloud sessions",
                                     ["direction"], registry=r)
        self.cloud_departures = Counter("fogline_edge_cloud_departures",
                                        "Times a request left the cloud for the edge (rejoined: came back)",
                                        ["rejoined"], registry=r)
        for d in ("up", "down"):
            self.request_bytes.labels(d)
        for x in ("true", "false"):
            self.cloud_departures.labels(x)

    def watch_cloud(self, bridge: object) -> None:
        """Cloud link gauges, read from the CloudBridge at scrape time."""
        r = self.registry
        self.cloud_connected = Gauge("fogline_edge_cloud_connected", "1 while the cloud link is up", registry=r)
        self.cloud_rtt = Gauge("fogline_edge_cloud_rtt_seconds", "Cloud link round trip (ping EMA)", registry=r)
        self.cloud_reconnects = Gauge("fogline_edge_cloud_reconnects", "Times the cloud link came back", registry=r)
        self.cloud_connected.set_function(lambda: float(bridge.connected))  # type: ignore[attr-defined]
        self.cloud_rtt.set_function(lambda: bridge.rtt_s or 0.0)  # type: ignore[attr-defined]
        self.cloud_reconnects.set_function(lambda: bridge.reconnects)  # type: ignore[attr-defined]
        # every frame on the link, hello/pings/closes included (the HTTP upgrade is not a frame)
        self.link_bytes = Gauge("fogline_edge_cloud_link_bytes", "Websocket bytes on the cloud link since start",
                                ["direction"], registry=r)
        total = bridge.link.total  # type: ignore[attr-defined]
        self.link_bytes.labels("up").set_function(lambda: total.up)
        self.link_bytes.labels("down").set_function(lambda: total.down)

    def observe_cloud_bytes(self, up: int, down: int, departures: int, rejoined: int) -> None:
        """A finished request's measured cloud traffic and its fallbacks / rejoins."""
        self.request_bytes.labels("up").inc(up)
        self.request_bytes.labels("down").inc(down)
        self.cloud_departures.labels("true").inc(rejoined)
        self.cloud_departures.labels("false").inc(departures - rejoined)

    def watch(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Gauges read the engine at scrape time."""
        self.queue_depth.set_function(waiting)
        self.active.set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
