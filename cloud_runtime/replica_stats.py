"""One /health and one /metrics for many replicas (the Ray Serve app, cloud_runtime/ray_serve.py).

Whichever replica Serve's proxy hands a /health or /metrics request answers for
all of them, from the reports every replica sends the directory each
`REPORT_INTERVAL_S`: its own /health body (server.health_body) and its
Prometheus text. A replica that stopped reporting (killed, stuck, gone) drops
out after `STALE_AFTER_S`. Torch- and Ray-free: plain dicts and text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPORT_INTERVAL_S = 1.0  # how often each replica reports
STALE_AFTER_S = 3 * REPORT_INTERVAL_S + 2.0  # a report older than this is a replica that is gone
SUMMED = ("sessions", "kv_bytes", "kv_budget_bytes", "connections", "queued_steps")


def aggregate_health(replicas: Mapping[str, Mapping[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): totals over the live replicas and each replica's own body.

    200 while at least one replica takes new edges ("ok"), else 503 ("draining", or
    "unavailable" when none reports)."""
    ok = [r for r in replicas.values() if r.get("status") == "ok"]
    status = "ok" if ok else "draining" if replicas else "unavailable"
    body: dict[str, Any] = {"status": status, "replicas": len(replicas), "replicas_ok": len(ok)}
    first = next(iter(replicas.values()), {})
    for key in ("fingerprint", "split", "n_layers", "device", "dtype"):
        if key in first:
            body[key] = first[key]
    for key in SUMMED:
        body[key] = sum(int(r.get(key, 0)) for r in replicas.values())
    body["per_replica"] = {rid: dict(r) for rid, r in sorted(replicas.items())}
    return (200 if ok else 503), body


class _Families:
    """A collector that hands prometheus_client already-built metric families."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Sequence[Metric]:
        return self.families


def merge_metrics(texts: Mapping[str, str]) -> bytes:
    """One Prometheus exposition of every replica's metrics, each sample labelled replica="<id>"."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            into = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            into.samples.extend(s._replace(labels={**s.labels, "replica": replica}) for s in fam.samples)
    count = Metric("fogline_cloud_replicas", "Replicas reporting to the directory", "gauge")
    count.add_sample("fogline_cloud_replicas", {}, float(len(texts)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([count, *families.values()]))  # type: ignore[arg-type]
    return generate_latest(registry)
