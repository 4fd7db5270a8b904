"""The cloud's /health tells a load balancer the truth (issue 12.7): 200 "ok" only while the
runtime takes new work; 503 "overloaded" while the batcher's queue is at `health_max_queue`,
503 "draining" once shutdown began. A real cloud app, real websocket clients flooding it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


async def test_health_is_503_while_overloaded_or_draining(aiohttp_client, demo_bundle):
    from cloud_runtime.config import CloudConfig
    from cloud_runtime.server import CONNECTIONS, RUNTIME, create_app
    from edge_runtime.cloud_client import CloudLink
    from fogline.manifest import load_manifest

    # one 64-row step per deep-layer pass, so a flood of steps queues up
    app = create_app(CloudConfig(bundle=demo_bundle / "cloud", threads=1, batch_window_ms=0.0, max_batch_tokens=64,
                                 health_max_queue=4))
    client = await aiohttp_client(app)
    r = await client.get("/health")
    body = await r.json()
    assert r.status == 200 and body["status"] == "ok" and body["queue_limit"] == 4, body

    m = load_manifest(demo_bundle / "edge", role="edge")
    url = str(client.make_url("/ws")).replace("http", "ws", 1)
    rows = np.random.default_rng(0).standard_normal((64, m.hidden_size)).astype(np.float32)
    seen: list[tuple[int, str, int]] = []
    async with CloudLink(url, fingerprint=m.fingerprint, split=m.split) as link:
        flood = asyncio.gather(*(link.infer(f"s{i}", 0, rows) for i in range(16)))
        while not flood.done():
            r = await client.get("/health")
            b = await r.json()
            seen.append((r.status, b["status"], b["queued_steps"]))
            await asyncio.sleep(0.005)
        await flood
    print("\n/health during the flood:", seen[:5], "...")
    assert any(st == 503 and s == "overloaded" for st, s, _ in seen), seen
    assert all((st == 503) == (q >= 4) for st, _, q in seen), seen  # 503 exactly while >= 4 steps wait
    r = await client.get("/health")
    assert r.status == 200 and (await r.json())["status"] == "ok"

    await app[CONNECTIONS].drain(app[RUNTIME], "test drain")
    r = await client.get("/health")
    body = await r.json()
    assert r.status == 503 and body["status"] == "draining" and r.headers.get("Retry-After"), body
