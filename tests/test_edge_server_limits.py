"""Admission, auth and lifecycle of the edge daemon: 429 with Retry-After when the
wait queue is full (and nobody running is cancelled), Bearer API keys, /health
503 while the model loads or when it cannot load."""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import openai
import pytest
from edge_server_util import EdgeServer, start_edge_server

from edge_runtime.config import load_config
from edge_runtime.loader import load_runtime
from edge_runtime.server import create_app
from fogline.errors import BundleError

KEY = "sekret-key"


@pytest.fixture(scope="module")
def small(demo_bundle_adapter, tmp_path_factory) -> EdgeServer:
    s = start_edge_server(demo_bundle_adapter / "edge", tmp_path_factory.mktemp("edge-small") / "server.log",
                          "--threads", "1", "--parallel", "1", "--queue-size", "1", "--ctx-size", "256",
                          "--api-key", KEY, "--no-verify-bundle")
    yield s
    assert s.stop() == 0, s.log()


async def _sse_lines(resp: aiohttp.ClientResponse):
    async for line in resp.content:
        if line.startswith(b"data: "):
            yield line[6:].strip()


def test_api_key_is_required_on_v1_only(small):
    model = small.health()[1]["model"]
    for key in ("wrong", ""):
        c = openai.OpenAI(base_url=small.v1, api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=small.v1, api_key=KEY, max_retries=0)
    assert ok.models.list().data[0].id == model
    assert small.health()[0] == 200  # /health needs no key


async def test_full_queue_answers_429_and_cancels_nobody(small):
    model = small.health()[1]["model"]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
            "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession(headers=headers) as s:
        a = await s.post(small.v1 + "/chat/completions", json={**body, "max_tokens": 30})
        assert a.status == 200
        a_lines = _sse_lines(a)
        first = [await a_lines.__anext__() for _ in range(2)]  # role chunk + a token: A runs
        assert json.loads(first[1])["choices"][0]["delta"]["content"] is not None
        b = await s.post(small.v1 + "/chat/completions", json={**body, "max_tokens": 4})
        assert b.status == 200  # accepted into the wait queue
        async with s.post(small.v1 + "/chat/completions", json={**body, "max_tokens": 4}) as c:
            assert c.status == 429 and int(c.headers["Retry-After"]) >= 1
            err = (await c.json())["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        # the official client sees a RateLimitError
        cl = openai.AsyncOpenAI(base_url=small.v1, api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            await cl.chat.completions.create(model=model, messages=body["messages"], max_tokens=2)
        # A runs to its end, B after it
        a_chunks = [json.loads(x) for x in [ln async for ln in a_lines] if x != b"[DONE]"]
        assert a_chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert a_chunks[-1]["fogline"]["edge_tokens"] == 30
        b_chunks = [json.loads(x) for x in [ln async for ln in _sse_lines(b)] if x != b"[DONE]"]
        assert b_chunks[-1]["choices"][0]["finish_reason"] == "length"
        a.close()
        b.close()


async def test_health_is_503_while_loading_then_200(aiohttp_client, demo_bundle_adapter):
    cfg = load_config(env={}, overrides=dict(bundle=str(demo_bundle_adapter / "edge"), threads=1, parallel=1, ctx_size=128,
                                             verify_bundle=False))
    gate = threading.Event()

    def slow_loader(c):
        assert gate.wait(120)
        return load_runtime(c)

    client = await aiohttp_client(create_app(cfg, loader=slow_loader))
    r = await client.get("/health")
    assert r.status == 503 and (await r.json())["status"] == "loading"
    r = await client.post("/v1/completions", json={"model": "fogline-edge-k20", "prompt": "Hi"})
    assert r.status == 503 and "Retry-After" in r.headers and (await r.json())["error"]["code"] == "unavailable"
    gate.set()
    for _ in range(600):
        r = await client.get("/health")
        if r.status == 200:
            break
        await asyncio.sleep(0.05)
    assert r.status == 200 and (await r.json())["status"] == "ok"
    r = await client.post("/v1/completions", json={"model": "fogline-edge-k20", "prompt": "Hi", "max_tokens": 2})
    assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2


async def test_health_reports_a_failed_load(aiohttp_client, demo_bundle_adapter):
    cfg = load_config(env={}, overrides=dict(bundle=str(demo_bundle_adapter / "edge")))

    def broken(_):
        raise BundleError("edge.gguf: sha256 mismatch")

    client = await aiohttp_client(create_app(cfg, loader=broken))
    for _ in range(200):
        r = await client.get("/health")
        body = await r.json()
        if body["status"] != "loading":
            break
        await asyncio.sleep(0.02)
    assert r.status == 503 and body["status"] == "error" and "sha256 mismatch" in body["error"]
    r = await client.get("/v1/models")
    assert r.status == 503 and "failed to load" in (await r.json())["error"]["message"]
