"""The Ollama API of the edge daemon, from outside: `fogline edge serve` in a subprocess driven
with the official `ollama` Python client (sync and async, streaming and not), raw HTTP where
the client hides what is checked (the `fogline` fields, error bodies); and the model-name
rule of both surfaces (lenient by default, strict on request)."""

from __future__ import annotations

import json

import aiohttp
import numpy as np
import ollama
import openai
import pytest
from edge_server_util import EdgeServer, start_edge_server

SERVER_ARGS = ("--threads", "1", "--parallel", "2", "--ctx-size", "256", "--batch-size", "128")
GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 16}  # what the OpenAI surface does by default
MSGS = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def server(demo_bundle_adapter, tmp_path_factory) -> EdgeServer:
    s = start_edge_server(demo_bundle_adapter / "edge", tmp_path_factory.mktemp("ollama") / "server.log", *SERVER_ARGS)
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def strict(demo_bundle_adapter, tmp_path_factory) -> EdgeServer:
    """Strict model names and an API key (which the Ollama API honours like /v1)."""
    s = start_edge_server(demo_bundle_adapter / "edge", tmp_path_factory.mktemp("strict") / "server.log", *SERVER_ARGS,
                          "--strict-model-name", "--api-key", "sekrit")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture()
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base, timeout=120)


async def _post(base: str, path: str, body, headers: dict | None = None) -> tuple[int, list]:
    """Raw POST; returns the status and every JSON line of the body (NDJSON or one object)."""
    data = body if isinstance(body, str) else json.dumps(body)
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, data=data, headers=headers or {}) as r:
            text = await r.text()
            return r.status, [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- model listing


def test_version_tags_show(server, client, demo_bundle_adapter):
    import hashlib

    tags = client.list()
    assert [m.model for m in tags.models] == ["fogline-edge-k20:latest"]
    m = tags.models[0]
    gguf = demo_bundle_adapter / "edge" / "edge.gguf"
    assert m.size == gguf.stat().st_size and m.digest == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert m.details.format == "gguf" and m.details.family == "llama" and m.details.quantization_level == "Q8_0"
    show = client.show("fogline-edge-k20")
    assert show.modelinfo["fogline.split"] == 20 and show.modelinfo["llama.block_count"] == 30
    assert "im_start" in show.template and "temperature 0.8" in show.parameters
    assert show.capabilities == ["completion"]


async def test_version_is_ollama_shaped(server):
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base + "/api/version") as r:
            body = await r.json()
    assert r.status == 200 and body["version"].count(".") == 2 and body["fogline"]


# --------------------------------------------------------------------------- generation


def test_chat_stream_equals_nonstream_and_openai(server, client):
    full = client.chat(model="fogline-edge-k20", messages=MSGS, options=GREEDY)
    assert full.done and full.done_reason in ("stop", "length") and full.message.role == "assistant"
    assert 0 < full.eval_count <= 16 and full.prompt_eval_count > 5
    assert full.total_duration >= full.prompt_eval_duration + full.eval_duration > 0
    parts = list(client.chat(model="fogline-edge-k20", messages=MSGS, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == full.done_reason
    assert "".join(p.message.content for p in parts) == full.message.content
    # the same greedy request on the OpenAI surface (any model name: one model is served)
    oa = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    r = oa.chat.completions.create(model="whatever", messages=MSGS, max_tokens=16, temperature=0)
    assert r.model == "fogline-edge-k20" and r.choices[0].message.content == full.message.content


async def test_generate_async_stream_raw_and_system(server):
    c = ollama.AsyncClient(host=server.base, timeout=120)
    whole = await c.generate(model="llama3.2", prompt="List three colours.", options=GREEDY)
    assert whole.model == "fogline-edge-k20:latest" and whole.response and whole.done
    text = ""
    async for part in await c.generate(model="llama3.2", prompt="List three colours.", options=GREEDY, stream=True):
        text += part.response
    assert text == whole.response
    # generate = a one-turn chat with an optional system message
    chat = await c.chat(model="x", messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "List three colours."}], options=GREEDY)
    gen = await c.generate(model="x", system="Be brief.", prompt="List three colours.", options=GREEDY)
    assert gen.response == chat.message.content
    # raw: the prompt goes in as it is, no template: it is a plain continuation
    raw = await c.generate(model="x", prompt="The three primary colours are", raw=True, options=GREEDY)
    comp = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0).completions.create(
        model="x", prompt="The three primary colours are", max_tokens=16, temperature=0)
    assert raw.response == comp.choices[0].text and raw.prompt_eval_count < gen.prompt_eval_count


def test_options_map_to_sampling(client):
    def run(**opts) -> str:
        return client.generate(model="m", prompt="Count from one to twenty in words.", options=opts).response

    # num_predict bounds the completion
    r = client.generate(model="m", prompt="Tell me a story.", options={"num_predict": 5, "temperature": 0})
    assert r.eval_count == 5 and r.done_reason == "length"
    # stop strings are honoured and never emitted
    base = run(temperature=0, num_predict=24, repeat_penalty=1.0)
    cut = base.strip().split()[2]
    stopped = run(temperature=0, num_predict=24, repeat_penalty=1.0, stop=[cut])
    assert cut not in stopped and base.startswith(stopped)
    # a seed reproduces a sampled completion; another seed (almost surely) does not
    a = run(temperature=1.0, seed=7, num_predict=20)
    assert a == run(temperature=1.0, seed=7, num_predict=20)
    assert len({a, run(temperature=1.0, seed=8, num_predict=20), run(temperature=1.0, seed=9, num_predict=20)}) > 1
    # repeat_penalty reaches the sampler: a strong one changes greedy text that repeats tokens
    assert run(temperature=0, num_predict=24, repeat_penalty=2.0) != base
    # Ollama's defaults (temperature 0.8, top_k 40, ...) apply when options are left out
    assert client.generate(model="m", prompt="Hi", options={"num_predict": 3}).eval_count == 3


def test_repeat_penalty_is_llama_cpp_s():
    from edge_runtime.sampling import Sampler, SamplingParams

    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2), 4)
    for t in (0, 1, 3):  # only the last two (1, 3) are in the window
        s.observe(t)
    assert s.adjusted(logits).tolist() == [2.0, -2.0, 0.5, 1.5]
    assert Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=0), 4).adjusted(logits) is logits


async def test_mode_extension_and_origins(server):
    body = {"model": "m", "messages": MSGS, "options": {**GREEDY, "mode": "spec"}}
    status, lines = await _post(server.base, "/api/chat", body)
    assert status == 200 and lines[-1]["done"]
    assert lines[-1]["fogline"]["mode"] == "edge" and lines[-1]["fogline"]["fallback"] == "no cloud configured"
    assert {ln["fogline"]["origin"] for ln in lines[:-1]} == {"edge"}
    status, lines = await _post(server.base, "/api/generate", {"model": "m", "prompt": "Hi", "stream": False,
                                                               "mode": "edge", "options": {"num_predict": 2}})
    assert status == 200 and len(lines) == 1 and lines[0]["fogline"]["fallback"] is None


async def test_load_requests(server):
    for path, body in (("/api/generate", {"model": "m"}), ("/api/chat", {"model": "m", "messages": []})):
        status, lines = await _post(server.base, path, body)
        assert status == 200 and lines == [{**lines[0], "done": True, "done_reason": "load"}]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("path, body, needle", [
    ("/api/chat", "{not json", "not valid JSON"),
    ("/api/chat", [1], "JSON object"),
    ("/api/chat", {"messages": MSGS}, "'model' is required"),
    ("/api/chat", {"model": "m", "messages": MSGS, "format": "yaml"}, "format"),
    ("/api/chat", {"model": "m", "messages": MSGS, "format": {"type": "string", "pattern": "(a"}}, "JSON schema"),
    ("/api/chat", {"model": "m", "messages": MSGS, "think": True}, "thinking"),
    ("/api/chat", {"model": "m", "messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "text only"),
    ("/api/chat", {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/api/chat", {"model": "m", "messages": MSGS, "options": {"temperature": "hot"}}, "temperature"),
    ("/api/chat", {"model": "m", "messages": MSGS, "options": {"num_predict": 0}}, "num_predict"),
    ("/api/chat", {"model": "m", "messages": MSGS, "options": {"mirostat": 2}}, "mirostat"),
    ("/api/chat", {"model": "m", "messages": MSGS, "options": {"mode": "warp"}}, "mode"),
    ("/api/chat", {"model": "m", "messages": MSGS, "options": []}, "options"),
    ("/api/generate", {"model": "m", "prompt": "x", "context": [1, 2]}, "context"),
    ("/api/generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, "template"),
    ("/api/generate", {"model": "m", "prompt": 5}, "prompt"),
    ("/api/generate", {"model": "m", "prompt": "x", "options": {"stop": 3}}, "stop"),
    ("/api/show", {}, "'model' is required"),
])
async def test_bad_requests_are_400_in_ollama_shape(server, path, body, needle):
    status, lines = await _post(server.base, path, body)
    assert status == 400 and list(lines[0]) == ["error"] and needle in lines[0]["error"], lines


async def test_context_overflow_and_unknown_route(server, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="m", prompt="word " * 400, options={"num_predict": 4})
    assert e.value.status_code == 400 and "maximum context length is 256" in e.value.error
    status, lines = await _post(server.base, "/api/embed", {"model": "m", "input": "x"})
    assert status == 404 and "error" in lines[0]
    assert client.generate(model="m", prompt="Hi", options={"num_predict": 2}).done  # still fine


def test_strict_model_names_and_api_key(strict):
    auth = {"Authorization": "Bearer sekrit"}
    good = ollama.Client(host=strict.base, headers=auth)
    assert good.generate(model="fogline-edge-k20", prompt="Hi", options={"num_predict": 2}).done
    assert good.chat(model="fogline-edge-k20:latest", messages=MSGS, options={"num_predict": 2}).done
    with pytest.raises(ollama.ResponseError) as e:
        good.chat(model="llama3.2", messages=MSGS)
    assert e.value.status_code == 404 and "llama3.2" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        good.show("llama3.2")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=strict.base).list()
    assert e.value.status_code == 401 and "API key" in e.value.error
    oa = openai.OpenAI(base_url=strict.v1, api_key="sekrit", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    assert oa.chat.completions.create(model="fogline-edge-k20", messages=MSGS, max_tokens=2).model == "fogline-edge-k20"


def test_strict_model_name_setting(demo_bundle_adapter, tmp_path):
    from edge_runtime.config import load_config

    bundle = str(demo_bundle_adapter / "edge")
    assert load_config(env={}, overrides={"bundle": bundle}).strict_model_name is False  # lenient by default
    assert load_config(env={"FOGLINE_EDGE_STRICT_MODEL_NAME": "yes"}, overrides={"bundle": bundle}).strict_model_name
    toml = tmp_path / "edge.toml"
    toml.write_text(f'bundle = "{bundle}"\nstrict_model_name = true\n')
    assert load_config(toml, env={}).strict_model_name
