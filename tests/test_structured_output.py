"""Structured output (response_format / Ollama `format`) in every mode, from outside.

Real processes: `fogline cloud serve` (PyTorch deep layers) and `fogline edge serve`
(llama.cpp + llguidance), driven with the official `openai` and `ollama` clients. Every
output must parse (json.loads) and validate (jsonschema) in edge, collab, spec and cloud
mode; spec must equal cloud under a schema (greedy: the cloud judges each drafted prefix
under the mask the edge drafted it with); a schema the engine cannot enforce is a 400.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from tests.edge_server_util import edge_env, free_port, start_edge_server, wait_cloud_connected
from tests.test_collab_modes import Cloud

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "country": {"type": "string", "maxLength": 16},
                   "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}
PROMPTS = {"person": "Describe Alice, a 30 year old administrator, as JSON.",
           "city": "Give the capital of France as JSON.",
           "object": "Alice is 30. Reply with a JSON object with her name and age."}
MODES = ("edge", "collab", "spec", "cloud")
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def cloud(demo_bundle, tmp_path_factory):
    c = Cloud(demo_bundle, free_port(), tmp_path_factory.mktemp("so-cloud") / "cloud.log")
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def edge(demo_bundle, cloud, tmp_path_factory):
    srv = start_edge_server(demo_bundle / "edge", tmp_path_factory.mktemp("so-edge") / "edge.log",
                            env=edge_env(f"ws://127.0.0.1:{cloud.port}/ws", FOGLINE_EDGE_CLOUD_DEADLINE_MS="90000"))
    wait_cloud_connected(srv)
    yield srv
    srv.stop()


def _client(edge):
    from openai import OpenAI

    return OpenAI(base_url=edge.v1, api_key="unused", max_retries=0, timeout=600)


def _fmt(name: str) -> dict:
    if name == "object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True,
                                                   "schema": PERSON if name == "person" else CITY}}


def _chat(edge, name: str, mode: str) -> tuple[str, str, dict]:
    r = _client(edge).chat.completions.create(
        model="any", messages=[{"role": "user", "content": PROMPTS[name]}], max_tokens=MAX_TOKENS, temperature=0,
        response_format=_fmt(name), extra_body={"mode": mode, "fogline_tau": 0.5})
    return r.choices[0].message.content, r.choices[0].finish_reason, r.model_extra["fogline"]


@pytest.mark.slow
def test_every_mode_parses_and_validates_and_spec_equals_cloud(edge):
    # json_object (any object, strings unbounded) only where the deep layers decide: the demo's
    # K=20 exit head alone can ramble inside a free string past any small max_tokens
    jobs = [(name, mode) for name in ("person", "city") for mode in MODES] + [("object", "spec"), ("object", "cloud")]
    with ThreadPoolExecutor(4) as ex:
        outs = dict(zip(jobs, ex.map(lambda j: _chat(edge, *j), jobs)))
    for (name, mode), (text, finish, stats) in outs.items():
        print(f"\n{name:6s} {mode:6s} {finish}: {text}")
        assert finish == "stop", (name, mode, text)
        assert stats["mode"] == mode and stats["fallback"] is None, stats
        value = json.loads(text)
        jsonschema.validate(value, {"type": "object"} if name == "object" else (PERSON if name == "person" else CITY))
        if mode in ("spec", "cloud", "collab"):
            assert stats["cloud_round_trips"] > 0, stats
    for name in ("person", "city", "object"):
        assert outs[(name, "spec")][0] == outs[(name, "cloud")][0], name  # lossless under the same masks


def test_bad_schema_is_a_400(edge):
    import openai

    c = _client(edge)
    for fmt, needle in ((_fmt("person") | {"json_schema": {"name": "x", "schema": {"type": "string",
                                                                                   "pattern": "(a"}}}, "regex"),
                        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
                        ({"type": "yaml"}, "json_object")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      response_format=fmt)
        err = e.value.body
        assert err["param"] == "response_format" and needle in err["message"], err
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        c.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  response_format={"type": "json_object"}, extra_body={"ignore_eos": True})


def test_ollama_format_json_and_schema(edge):
    import ollama

    c = ollama.Client(host=edge.base, timeout=300)
    opts = {"temperature": 0, "num_predict": MAX_TOKENS}
    r = c.chat(model="any", messages=[{"role": "user", "content": PROMPTS["object"]}], format="json",
               options=opts | {"mode": "cloud"})
    assert isinstance(json.loads(r.message.content), dict) and r.done_reason == "stop"
    parts = list(c.generate(model="any", prompt=PROMPTS["city"], format=CITY, options=opts, stream=True))
    jsonschema.validate(json.loads("".join(p.response for p in parts)), CITY)


# --------------------------------------------------------------------------- the wire (no servers)


def test_masks_travel_on_infer_and_verify_and_bad_ones_are_typed_errors():
    import numpy as np

    from fogline.constraint import allowed_of, pack_mask, unpack_mask
    from fogline.wire.codecs import Codec, encode_hidden
    from fogline.wire.errors import BadFrame
    from fogline.wire.protocol import Infer, Verify, decode_frame, encode_frame

    vocab = 49152
    bits = np.zeros(vocab, bool)
    bits[[0, 107, 49151]] = True
    raw = np.packbits(bits, bitorder="little").tobytes() + b"\0\0\0\0"  # llguidance's extra word
    assert list(np.nonzero(allowed_of(unpack_mask(pack_mask(raw), vocab), vocab))[0]) == [0, 107, 49151]
    h = encode_hidden(np.zeros((2, 8), np.float32), Codec.FP16)
    m = decode_frame(encode_frame(Infer(id=1, session="s", start=0, h=h, mask=pack_mask(raw))))
    assert isinstance(m, Infer) and m.mask == pack_mask(raw)
    v = decode_frame(encode_frame(Verify(id=2, session="s", start=0, h=h, draft=(5,), masks=(b"a", b"b"))))
    assert isinstance(v, Verify) and v.masks == (b"a", b"b")
    with pytest.raises(BadFrame, match="one token mask"):
        decode_frame(encode_frame(Verify(id=3, session="s", start=0, h=h, draft=(5,), masks=(b"a",))))
    for bad in (b"not zlib", pack_mask(raw[:100]), pack_mask(raw + b"\0" * 4096)):
        with pytest.raises(ValueError, match="token mask"):
            unpack_mask(bad, vocab)
