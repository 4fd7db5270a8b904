"""The edge daemon from outside: `fogline edge serve` in a subprocess, real sockets,
the official openai client (sync and async, streaming and not), raw HTTP for
malformed bodies, /metrics through prometheus_client's parser."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
from edge_server_util import EdgeServer, start_edge_server
from fogline.manifest import load_manifest
from prometheus_client.parser import text_string_to_metric_families

CTX = 256
PROMPTS = [
    "Write a short poem about the sea.",
    "List three colours.",
    "Explain in one sentence why the sky is blue, and then say what a rainbow is made of.",
    "Hi",
]


@pytest.fixture(scope="module")
def server(demo_bundle_adapter, tmp_path_factory) -> EdgeServer:
    s = start_edge_server(demo_bundle_adapter / "edge", tmp_path_factory.mktemp("edge") / "server.log",
                          "--threads", "1", "--parallel", "4", "--ctx-size", str(CTX), "--batch-size", "128")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.health()[1]["model"]


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def _metrics(server: EdgeServer) -> dict[tuple[str, tuple], float]:
    import urllib.request

    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _fogline(obj) -> dict:
    f = obj.model_extra.get("fogline") if hasattr(obj, "model_extra") else obj["fogline"]
    keys = {"mode", "edge_tokens", "cloud_tokens", "fallback", "cloud_round_trips", "bytes_up", "bytes_down",
            "lookup_tokens"}
    assert set(f) == keys or set(f) == keys | {"auto"}
    return f


# --------------------------------------------------------------------------- basic API


def test_health_and_models(server, client, model):
    status, body = server.health()
    assert status == 200 and body["status"] == "ok" and body["split"] == 20
    assert body["cloud"] == {"configured": False, "connected": False}
    ids = [m.id for m in client.models.list().data]
    assert ids == [model] == ["fogline-edge-k20"]


def test_chat_sync_nonstream(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=12, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    f = _fogline(r)
    assert f["mode"] == "edge" and f["fallback"] is None
    assert f["edge_tokens"] == r.usage.completion_tokens and f["cloud_tokens"] == 0


def test_chat_sync_stream_equals_nonstream(client, model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert _fogline(finals[0])["edge_tokens"] == full.usage.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


async def test_completions_async_stream_and_not(aclient, model):
    prompt = "The three primary colours are"
    full = await aclient.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens <= 16
    stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    parts, finish = [], None
    async for ch in stream:
        parts.append(ch.choices[0].text)
        finish = ch.choices[0].finish_reason or finish
    assert "".join(parts) == full.choices[0].text and finish == full.choices[0].finish_reason


async def test_chat_async_stream(aclient, model):
    msgs = [{"role": "user", "content": PROMPTS[2]}]
    full = await aclient.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
    stream = await aclient.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0,
                                                   stream=True)
    text = ""
    async for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
    assert text == full.choices[0].message.content


def test_completion_echo_and_token_prompt(client, model, demo_bundle_adapter):
    from edge_runtime.llama_backend import LlamaModel

    a = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True)
    assert a.choices[0].text.startswith("Once upon a time")
    b = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert a.choices[0].text == "Once upon a time" + b.choices[0].text
    tok = LlamaModel(demo_bundle_adapter / "edge" / "edge.gguf")
    try:
        ids = tok.tokenize("Once upon a time")
    finally:
        tok.close()
    c = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert c.choices[0].text == b.choices[0].text and c.usage.prompt_tokens == len(ids)


def test_logprobs_chat_and_completions(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[3]}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    assert "".join(e.token for e in content) == r.choices[0].message.content
    not_top = 0
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # greedy: the chosen token is the exit head's most likely one, unless prompt lookup picked it
        if e.top_logprobs[0].token == e.token:
            assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        else:
            not_top += 1
            assert e.logprob < e.top_logprobs[0].logprob
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert not_top == _fogline(r)["lookup_tokens"]
    c = client.completions.create(model=model, prompt="Paris is", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == c.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)


COPY_PROMPT = ("Repeat this list exactly, twice: red apple, green pear, yellow banana, purple plum, orange "
               "mango, red apple, green pear, yellow banana.")


def test_prompt_lookup_on_by_default_and_off_by_flag(server, client, model, demo_bundle_adapter, tmp_path):
    """The bundle's fitted λ drives greedy decoding: on a prompt whose answer copies it, some tokens
    are the lookup's, each counted; `--no-prompt-lookup` gives the exit head alone (none counted),
    and then greedy tokens are the head's argmax again."""
    lams = load_manifest(demo_bundle_adapter / "edge").calibration["prompt_lookup"]["lambdas"]
    assert len(lams) == 4 and max(lams) > 0, lams  # the demo model's greedy answers repeat their context
    msgs = [{"role": "user", "content": COPY_PROMPT}]
    on = client.chat.completions.create(model=model, messages=msgs, max_tokens=48, temperature=0,
                                        logprobs=True, top_logprobs=1)
    assert _fogline(on)["lookup_tokens"] > 0, on.choices[0].message.content
    off_server = start_edge_server(demo_bundle_adapter / "edge", tmp_path / "off.log", "--threads", "1",
                                   "--parallel", "1", "--ctx-size", str(CTX), "--no-prompt-lookup")
    try:
        assert "prompt lookup off" in off_server.log()
        off_client = openai.OpenAI(base_url=off_server.v1, api_key="unused", max_retries=0, timeout=120)
        off = off_client.chat.completions.create(model=model, messages=msgs, max_tokens=48, temperature=0,
                                                 logprobs=True, top_logprobs=1)
    finally:
        assert off_server.stop() == 0
    assert _fogline(off)["lookup_tokens"] == 0
    assert all(e.top_logprobs[0].token == e.token for e in off.choices[0].logprobs.content)
    assert off.choices[0].message.content != on.choices[0].message.content
    assert "prompt lookup on" in server.log()


def test_stop_string_across_token_boundary(client, model):
    prompt = "Write a short poem about the sea."
    base = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, logprobs=0)
    toks = base.choices[0].logprobs.tokens
    text = base.choices[0].text
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(1, len(toks) - 1) if toks[i] and toks[i + 1])
    stop = toks[i][-1:] + toks[i + 1][:1]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.find(stop)]
    assert stop not in r.choices[0].text
    # streaming withholds it too
    s = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert s == r.choices[0].text


def test_seed_reproduces_sampling(client, model):
    def run(seed: int) -> str:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
                                              ).choices[0].message.content
    a, b = run(1234), run(1234)
    assert a == b
    assert len({a, run(1), run(2), run(3)}) > 1


def test_modes_needing_a_cloud_fall_back_to_edge(client, model):
    for mode in ("collab", "spec", "cloud", "auto"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0, extra_body={"mode": mode})
        f = _fogline(r)
        if mode == "auto":  # the policy sees no cloud and chooses edge: a choice, not a fallback
            assert f["mode"] == "edge" and f["fallback"] is None and f["auto"]["arm"] == "edge"
        else:
            assert f["mode"] == "edge" and f["fallback"] == "no cloud configured" and "auto" not in f
        assert f["cloud_tokens"] == 0 and f["cloud_round_trips"] == 0 and f["edge_tokens"] == r.usage.completion_tokens
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       extra_body={"mode": "edge"})
    assert _fogline(r)["fallback"] is None


# --------------------------------------------------------------------------- malformed requests


async def _post(server: EdgeServer, path: str, data: bytes | str, headers: dict | None = None):
    async with aiohttp.ClientSession() as s:
        async with s.post(server.base + path, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None), r.headers


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ("", None),
    ("[1, 2]", None),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "mode": "warp"}, "mode"),
    ({"model": "$M", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "$M", "messages": []}, "messages"),
    ({"model": "$M", "messages": "hello"}, "messages"),
    ({"model": "$M", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "$M", "messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
])
async def test_malformed_chat_bodies_are_400_with_openai_error(server, model, body, param):
    if isinstance(body, dict):
        body = json.dumps(body).replace("$M", model)
    status, data, _ = await _post(server, "/v1/chat/completions", body)
    assert status == 400, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"model": "$M"}, "prompt"),
    ({"model": "$M", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "$M", "prompt": [1, 2, 10 ** 9]}, "prompt"),
    ({"model": "$M", "prompt": "x", "logprobs": 9}, "logprobs"),
    ({"model": "$M", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"model": "$M", "prompt": "x", "presence_penalty": 5}, "presence_penalty"),
])
async def test_malformed_completion_bodies(server, model, body, param):
    status, data, _ = await _post(server, "/v1/completions", json.dumps(body).replace("$M", model))
    assert status == 400 and data["error"]["param"] == param, data


async def test_any_model_name_and_unknown_routes(server, model):
    # one model is served: any name means it (strict_model_name refuses others: tests/test_ollama_api.py)
    status, data, _ = await _post(server, "/v1/chat/completions", json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
    assert status == 200 and data["model"] == model
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base + "/v1/chat/completions") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        async with s.get(server.base + "/v1/nothing") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_context_overflow_is_400_with_numbers(server, model):
    long_prompt = "word " * (CTX + 50)
    status, data, _ = await _post(server, "/v1/completions",
                                  json.dumps({"model": model, "prompt": long_prompt, "max_tokens": 4}))
    assert status == 400 and data["error"]["code"] == "context_length_exceeded"
    assert str(CTX) in data["error"]["message"]
    status, data, _ = await _post(server, "/v1/completions",
                                  json.dumps({"model": model, "prompt": "Hello there", "max_tokens": CTX}))
    assert status == 400 and data["error"]["param"] == "max_tokens"
    msg = data["error"]["message"]
    assert str(CTX) in msg and str(CTX) in msg.split("requested")[1]  # the limit and what was asked
    status, _, _ = await _post(server, "/v1/completions", json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2}))
    assert status == 200  # the server is fine afterwards


# --------------------------------------------------------------------------- concurrency


async def _stream_chat(aclient: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    stream = await aclient.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, temperature=0, stream=True)
    text, finish = "", None
    async for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    return text, finish


async def test_four_concurrent_streams_equal_one_at_a_time(server, aclient, model):
    n_tok = 24
    solo = []
    steps0 = server.health()[1]["steps"]
    for p in PROMPTS:
        solo.append(await _stream_chat(aclient, model, p, n_tok))
    steps_solo = server.health()[1]["steps"] - steps0
    together = await asyncio.gather(*(_stream_chat(aclient, model, p, n_tok) for p in PROMPTS))
    steps_together = server.health()[1]["steps"] - steps0 - steps_solo
    assert all(f in ("stop", "length") for _, f in together)  # none cancelled
    assert list(together) == solo
    # continuous batching: the four shared decode steps
    assert steps_together < 0.75 * steps_solo, (steps_together, steps_solo)


async def test_disconnecting_client_frees_its_sequence(server, model):
    before = _metrics(server)
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(server.v1 + "/chat/completions", json=body)
        assert resp.status == 200
        got = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                got += 1
            if got >= 4:
                break
        resp.close()  # drop the connection mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.health()[1]["running"] != 0:
        await asyncio.sleep(0.05)
    assert server.health()[1]["running"] == 0
    after = _metrics(server)
    key = ("fogline_edge_finished_total", (("reason", "cancelled"),))
    assert after.get(key, 0) == before.get(key, 0) + 1
    tokens = ("fogline_edge_tokens_total", (("origin", "edge"),))
    assert after[tokens] - before.get(tokens, 0) < 200  # generation stopped early
    status, _, _ = await _post(server, "/v1/completions", json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2}))
    assert status == 200


def test_metrics_parse(server, client, model):
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    m = _metrics(server)
    assert m[("fogline_edge_requests_total", (("endpoint", "chat"), ("status", "200")))] >= 1
    assert m[("fogline_edge_tokens_total", (("origin", "edge"),))] >= 3
    assert m[("fogline_edge_tokens_total", (("origin", "cloud"),))] == 0
    assert m[("fogline_edge_time_to_first_token_seconds_count", ())] >= 1
    assert m[("fogline_edge_inter_token_latency_seconds_count", ())] >= 1
    assert m[("fogline_edge_prompt_tokens_total", ())] > 0
    assert m[("fogline_edge_queue_depth", ())] == 0 and m[("fogline_edge_active_sequences", ())] == 0
    assert m[("fogline_edge_ready", ())] == 1
