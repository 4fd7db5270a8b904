"""Prometheus metrics of one cloud app (own registry, so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class CloudMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("fogline_cloud_connections", "Open edge websockets", registry=r)
        self.sessions = Gauge("fogline_cloud_sessions", "Live sessions (with a KV cache)", registry=r)
        self.kv_bytes = Gauge("fogline_cloud_kv_bytes", "Bytes held by session KV caches", registry=r)
        self.kv_budget = Gauge("fogline_cloud_kv_budget_bytes", "KV memory budget", registry=r)
        self.evictions = Counter("fogline_cloud_evictions_total", "Sessions dropped by the store",
                                 ["reason"], registry=r)
        self.rows = Counter("fogline_cloud_hidden_rows_total", "h_K rows received: 'new' positions, or "
                            "'repeat' (a position this session had received before: replay or rolled-back draft)",
                            ["kind"], registry=r)
        self.rows.labels("new")
        self.rows.labels("repeat")
        self.frames = Counter("fogline_cloud_frames_total", "Frames received, by kind", ["kind"], registry=r)
        self.errors = Counter("fogline_cloud_errors_total", "Error frames sent, by code", ["code"], registry=r)
        self.tokens = Counter("fogline_cloud_positions_total", "h_K positions pushed through the deep layers",
                              registry=r)
        self.batch_sessions = Histogram("fogline_cloud_batch_sessions", "Sessions per forward pass",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_rows = Histogram("fogline_cloud_batch_rows", "Rows per forward pass",
                                    buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r)
        self.forward_seconds = Histogram("fogline_cloud_forward_seconds", "Time of one forward pass",
                                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                         registry=r)
        self.queue_wait_seconds = Histogram("fogline_cloud_queue_wait_seconds",
                                            "Time a step waits before its forward pass",
                                            buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1),
                                            registry=r)
        self.agreement_checks = Counter("fogline_cloud_agreement_checks_total",
                                        "Edge-emitted tokens (collab) checked against the deep model's greedy "
                                        "token, by outcome", ["outcome"], registry=r)
        self.agreement_checks.labels("agreed")
        self.agreement_checks.labels("disagreed")

    def render(self) -> bytes:
        return generate_latest(self.registry)
