"""The cloud-only baseline (cloud_runtime/full_model.py) on the deep layers' runtime: several
concurrent requests over their own websockets are batched into shared passes by the same
Batcher (token-id steps, KV blocks from the same pool), and each one's greedy stream is
still the HF full model's."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.conftest import REFERENCE_TOKENS, TIE_GAP

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_NEW = 24


async def _generate(client, ids: list[int], n: int, **extra) -> tuple[list[int], dict]:
    ws = await client.ws_connect("/v1/generate")
    try:
        await ws.send_str(json.dumps({"prompt": ids, "max_tokens": n, **extra}))
        toks = []
        while "done" not in (msg := json.loads((await ws.receive(timeout=120)).data)):
            assert "error" not in msg, msg
            toks.append(msg["token"])
        return toks, msg
    finally:
        await ws.close()


@pytest.mark.slow
async def test_concurrent_cloud_only_requests_are_batched_and_match_hf(aiohttp_client, demo_source, chat_prompts,
                                                                       full_reference):
    from cloud_runtime.deep_model import load_deep_model
    from cloud_runtime.full_model import RUNTIME, create_app

    assert N_NEW <= REFERENCE_TOKENS
    model = load_deep_model(demo_source.spec, 0, demo_source.state)
    client = await aiohttp_client(create_app(model, "demo", batch_window_ms=20.0))
    prompts = chat_prompts[:4]
    results = await asyncio.gather(*(_generate(client, ids, N_NEW) for ids in prompts))
    for (toks, done), ids, (ref, gaps) in zip(results, prompts, full_reference):
        assert done["tokens"] == len(toks) == N_NEW and done["prompt_tokens"] == len(ids)
        first = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), None)
        assert first is None or gaps[first] < TIE_GAP, f"diverged at {first} (gap {gaps[first]:.4f})"
    text = await (await client.get("/metrics")).text()
    passes = float(re.search(r"^fogline_cloud_batch_sessions_count ([\d.e+]+)", text, re.M).group(1))
    assert passes < 4 * N_NEW * 0.75, passes  # most passes carried several requests
    assert "fogline_full_requests_total 4" in text
    rt = client.app[RUNTIME]
    assert len(rt.store) == 0 and rt.store.kv_bytes == 0  # every request's KV blocks went back
    assert model.kv_pool.free_blocks == model.kv_pool.n_blocks
    # a stop token ends the stream early; an out-of-vocabulary id is a typed error, not a crash
    toks, done = await _generate(client, prompts[0], N_NEW, stop=[results[0][0][2]])
    assert toks == results[0][0][:3] and done["tokens"] == 3
    ws = await client.ws_connect("/v1/generate")
    await ws.send_str(json.dumps({"prompt": [10 ** 9], "max_tokens": 2}))
    assert "token ids" in json.loads((await ws.receive(timeout=30)).data)["error"]
    await ws.close()
