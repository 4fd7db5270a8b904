"""No cloud call can vanish or park a request (issue 12.1), and its bytes are measured (12.2).

The real edge app (llama.cpp, the engine thread, the cloud bridge) and the real cloud app
(PyTorch deep layers, batcher) run in this process on one event loop, linked by a real
websocket on 127.0.0.1. Faults are injected on cue at the cloud's request handler, so every
frame still crosses the socket: the cloud raises internally, stalls, answers with the wrong
message type, or drops the connection — at each await point of each mode (infer in cloud and
collab, the lazy append in collab and spec, verify in spec). Every request must finish
within a bound far below the stall, either in edge mode with a reason, or (a bug on the
edge's own cloud path, injected by patching one method) with HTTP 500 / an SSE error event
and a logged traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

DEADLINE_MS = 800
STALL_S = 60.0  # a parked request would take this long; the bound below is far shorter
BOUND_S = 15.0
PROMPT = "Write a short poem about the sea."


class Cue:
    """Wraps the cloud runtime's `handle`: on cue, messages of one kind raise, stall, get a wrong
    reply or drop their connection."""

    def __init__(self, cloud_app: Any) -> None:
        from cloud_runtime.server import CONNECTIONS, RUNTIME

        self.rt, self.conns = cloud_app[RUNTIME], cloud_app[CONNECTIONS]
        self.orig = self.rt.handle
        self.kind: str | None = None
        self.action: str | None = None
        self.hits = 0
        self.release = asyncio.Event()
        self.rt.handle = self.handle

    def set(self, kind: str | None, action: str | None) -> None:
        self.kind, self.action, self.hits = kind, action, 0
        self.release.set()  # let earlier stalls go
        self.release = asyncio.Event()

    async def handle(self, msg: Any) -> Any:
        from fogline.wire.protocol import Pong

        if self.action is not None and msg.KIND == self.kind:
            self.hits += 1
            if self.action == "raise":
                raise RuntimeError("injected cloud bug")  # the server answers a typed `internal` error
            if self.action == "stall":
                try:
                    await asyncio.wait_for(self.release.wait(), STALL_S)
                except asyncio.TimeoutError:
                    pass
            elif self.action == "bad_reply":
                return Pong(id=msg.id, stamp=0.0)
            elif self.action == "drop":
                await asyncio.gather(*(c.close(1011, "injected drop") for c in list(self.conns._open)),
                                     return_exceptions=True)
                return None
        return await self.orig(msg)


@asynccontextmanager
async def linked(aiohttp_server: Any, aiohttp_client: Any, bundle: Path, *, via_wan: bool = False,
                 **edge: Any) -> AsyncIterator[tuple[Any, Cue, Any, Any]]:
    """(edge test client, cue, edge app, WanEmulator or None): a real cloud, a real edge linked to it."""
    from cloud_runtime.config import CloudConfig
    from cloud_runtime.server import create_app as cloud_app
    from edge_runtime.config import EdgeConfig
    from edge_runtime.server import create_app as edge_app
    from tools.wanem import WanEmulator

    cloud = await aiohttp_server(cloud_app(CloudConfig(bundle=bundle / "cloud", threads=1, batch_window_ms=2.0)),
                                 host="127.0.0.1")
    cue = Cue(cloud.app)
    wan = await WanEmulator(("127.0.0.1", cloud.port)).start() if via_wan else None
    port = wan.port if wan is not None else cloud.port
    cfg = dict(bundle=str(bundle / "edge"), threads=1, parallel=4, ctx_size=256, cloud_url=f"ws://127.0.0.1:{port}/ws",
               cloud_deadline_ms=DEADLINE_MS, cloud_ping_s=0.3)
    cfg.update(edge)
    app = edge_app(EdgeConfig(**cfg))
    client = await aiohttp_client(app)
    try:
        await wait_linked(client)
        yield client, cue, app, wan
    finally:
        cue.set(None, None)
        if wan is not None:
            await wan.close()


async def wait_linked(client: Any, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < end:
        r = await client.get("/health")
        body = await r.json()
        if r.status == 200 and body.get("cloud", {}).get("connected"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"edge never linked to the cloud: {body}")


async def complete(client: Any, mode: str, n: int = 24, **extra: Any) -> tuple[int, dict, float]:
    """(status, body, seconds) of a greedy /v1/completions request."""
    t0 = time.monotonic()
    r = await client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                                   "mode": mode, "ignore_eos": True, **extra},
                          timeout=aiohttp.ClientTimeout(total=4 * BOUND_S))  # a parked request fails fast
    return r.status, await r.json(), time.monotonic() - t0


# (mode, extra body, message kind at the cloud, fault, what must happen)
#   deadline / cloud error: edge fallback with that reason; fallback: any reason; finish: the request
#   completes, with or without the cloud (a stalled ack-less append at the cloud only delays that
#   session there: the next infer/verify meets a position gap and resends)
CLOUD_FAULTS = [
    ("cloud", {}, "infer", "raise", "cloud error"), ("cloud", {}, "infer", "stall", "deadline"),
    ("cloud", {}, "infer", "bad_reply", "cloud error"), ("cloud", {}, "infer", "drop", "fallback"),
    ("collab", {"fogline_tau": 0.6}, "infer", "stall", "deadline"),
    ("collab", {"fogline_tau": 0.6}, "append", "stall", "finish"),
    ("collab", {"fogline_tau": 0.0}, "append", "raise", "cloud error"),  # deferred error of an ack-less append
    ("spec", {}, "append", "stall", "finish"), ("spec", {}, "verify", "raise", "cloud error"),
    ("spec", {}, "verify", "stall", "deadline"), ("spec", {}, "verify", "bad_reply", "cloud error"),
    ("spec", {}, "verify", "drop", "fallback"),
]


async def test_cloud_failures_at_every_await_point_end_in_edge_mode(aiohttp_server, aiohttp_client, demo_bundle,
                                                                     monkeypatch):
    from edge_runtime.cloud_client import CloudLink

    async with linked(aiohttp_server, aiohttp_client, demo_bundle) as (client, cue, _, _):
        status, clean, _ = await complete(client, "cloud")
        assert status == 200 and clean["fogline"]["fallback"] is None, clean
        for mode, extra, kind, action, expect in CLOUD_FAULTS:
            cue.set(kind, action)
            status, body, took = await complete(client, mode, **extra)
            case = f"{mode} {kind} {action}"
            assert status == 200, (case, body)
            f = body["fogline"]
            assert cue.hits > 0, f"{case}: the fault was never hit"
            assert took < BOUND_S, f"{case}: took {took:.1f} s (parked?)"
            assert body["usage"]["completion_tokens"] == 24, (case, body)
            print(f"{case}: {took:.2f} s, fallback {f['fallback']!r}")
            if expect != "finish":
                assert f["fallback"], (case, f)
                assert f["fallbacks"] and f["fallbacks"][0]["reason"], (case, f)
            if expect in ("deadline", "cloud error"):
                assert expect in f["fallback"], (case, f)
            cue.set(None, None)
            await wait_linked(client)

        # the edge's own send stalls (e.g. a reconnect hanging on a black hole) while holding the
        # request's lock: the infer queued behind it still ends at the deadline, not never
        orig = CloudLink.append

        async def stalled(self: Any, session: str, start: int, hidden: Any, *, ack: bool = True, **_: Any) -> int:
            if not ack:
                await asyncio.sleep(STALL_S)
            return await orig(self, session, start, hidden, ack=ack)
        with monkeypatch.context() as mp:
            mp.setattr(CloudLink, "append", stalled)
            status, body, took = await complete(client, "collab", fogline_tau=0.6)
        assert status == 200 and took < BOUND_S, (took, body)
        assert "deadline" in body["fogline"]["fallback"], body
        await wait_linked(client)
        status, after, _ = await complete(client, "cloud")
        assert status == 200 and after["fogline"]["fallback"] is None, after  # the link serves again


# (mode, extra body, the CloudSession method a bug is planted in)
BUGS = [("cloud", {}, "infer"), ("collab", {"fogline_tau": 0.0}, "append_lazy"), ("spec", {}, "verify")]


async def test_a_bug_on_the_cloud_path_is_a_500_with_a_traceback(aiohttp_server, aiohttp_client, demo_bundle,
                                                                 monkeypatch, caplog):
    from edge_runtime.cloud_generation import CloudSession

    caplog.set_level(logging.ERROR, logger="fogline.edge.modes")
    async with linked(aiohttp_server, aiohttp_client, demo_bundle) as (client, _, _, _):
        for mode, extra, method in BUGS:
            async def broken(self: Any, *a: Any, **k: Any) -> Any:
                raise AttributeError(f"planted bug in CloudSession.{method}")
            with monkeypatch.context() as mp:
                mp.setattr(CloudSession, method, broken)
                caplog.clear()
                status, body, took = await complete(client, mode, n=48, **extra)
                assert status == 500, (mode, body)
                assert body["error"]["type"] == "server_error", body
                assert "AttributeError" in body["error"]["message"] and method in body["error"]["message"], body
                assert took < BOUND_S
                tb = [r for r in caplog.records if r.exc_info and r.exc_info[0] is AttributeError]
                assert tb, f"{mode}: no traceback logged"
                # streamed: an SSE error event, then [DONE]
                r = await client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 24,
                                                               "temperature": 0, "mode": mode, "ignore_eos": True,
                                                               "stream": True, **extra},
                                      timeout=aiohttp.ClientTimeout(total=4 * BOUND_S))
                events = [ln[6:] for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]", events
                last = json.loads(events[-2])
                assert last["error"]["type"] == "server_error" and "AttributeError" in last["error"]["message"], last
            await wait_linked(client)
        status, after, _ = await complete(client, "spec")
        assert status == 200 and after["fogline"]["fallback"] is None, after


async def test_bytes_are_the_websocket_frames_a_proxy_counts(aiohttp_server, aiohttp_client, demo_bundle):
    """bytes_up/down of a request equal what tools/wanem.py forwarded for it (its session's frames;
    only the session's Close, sent after the response, is missing), and /metrics says the same."""
    from prometheus_client.parser import text_string_to_metric_families

    async with linked(aiohttp_server, aiohttp_client, demo_bundle, via_wan=True, cloud_ping_s=3600.0) as (
            client, cue, _, wan):
        async def metric(name: str, direction: str) -> float:
            text = await (await client.get("/metrics")).text()
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == name and s.labels.get("direction") == direction:
                        return s.value
            raise AssertionError(f"{name} missing")

        for mode, extra in (("cloud", {}), ("spec", {}), ("collab", {"fogline_tau": 0.6})):
            await asyncio.sleep(0.3)  # the previous request's Close and its Ack have passed
            up0, down0 = wan.stats.bytes_up, wan.stats.bytes_down
            link0 = await metric("fogline_edge_cloud_link_bytes", "up")
            req0 = await metric("fogline_edge_request_cloud_bytes_total", "up")
            status, body, _ = await complete(client, mode, n=32, **extra)
            assert status == 200, body
            f = body["fogline"]
            assert f["fallback"] is None, f
            await asyncio.sleep(0.3)
            up, down = wan.stats.bytes_up - up0, wan.stats.bytes_down - down0
            print(f"\n{mode}: fogline bytes_up {f['bytes_up']} / proxy {up}; bytes_down {f['bytes_down']} / "
                  f"proxy {down}; round trips {f['cloud_round_trips']}")
            # the Close frame (~70 bytes) and its Ack (~60) follow the response
            assert 0 < up - f["bytes_up"] <= 120, (mode, up, f)
            assert 0 < down - f["bytes_down"] <= 100, (mode, down, f)
            assert await metric("fogline_edge_cloud_link_bytes", "up") - link0 == up
            assert await metric("fogline_edge_request_cloud_bytes_total", "up") - req0 == f["bytes_up"]

        # a dropped link mid-request: the retry's resend is counted too (replays are not free)
        status, clean, _ = await complete(client, "cloud", n=32)
        cue.set("infer", "drop")

        async def heal() -> None:
            while cue.hits == 0:
                await asyncio.sleep(0.01)
            cue.set(None, None)
        healer = asyncio.ensure_future(heal())
        status, body, _ = await complete(client, "cloud", n=32)
        await healer
        f, c = body["fogline"], clean["fogline"]
        assert status == 200 and f["fallback"] is None, f
        assert f["bytes_up"] > c["bytes_up"] and f["cloud_round_trips"] >= c["cloud_round_trips"], (f, c)
