"""Garbage against a live cloud: while one good edge session generates, another client sends
hypothesis-generated bad frames (random bytes, truncated msgpack, wrong types, unknown kinds,
huge declared lengths, position gaps, text frames, bad handshakes). Every bad frame must get a
typed error frame or a clean close with a reason; the server (a real `fogline cloud serve`
process) must survive; the good session's tokens must not change."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time

import aiohttp
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DEMO_SPLIT

TOKEN = "T0ken-for-tests"
D = 576
N_GOOD = 24


@pytest.fixture()
def cloud_process(demo_bundle_adapter, python_exe, subprocess_env):
    proc = subprocess.Popen([python_exe, "-m", "fogline.cli", "cloud", "serve", "--bundle", str(demo_bundle_adapter / "cloud"),
                             "--port", "0", "--token", TOKEN, "--threads", "1", "--log-level", "WARNING"],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port, lines = None, []
    deadline = time.monotonic() + 180
    while port is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"http://127\.0\.0\.1:(\d+)", line):
            port = int(m.group(1))
    if port is None:
        proc.kill()
        pytest.fail("cloud server did not start: " + "".join(lines)[-2000:])
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _good_run(bundle, port, fingerprint, prompt, stop: threading.Event | None, outputs: list) -> None:
    """The good edge: llama.cpp layers [0, K) + cloud mode, generating N_GOOD tokens per round."""
    from edge_runtime.cloud_client import CloudLink
    from edge_runtime.cloud_generation import LlamaEdgeStep, generate_cloud
    from edge_runtime.llama_backend import LlamaContext, LlamaModel

    model = LlamaModel(bundle / "edge" / "edge.gguf")
    ctx = LlamaContext(model, n_ctx=256, n_batch=64, n_threads=1, tap_layer=DEMO_SPLIT - 1)

    async def main() -> None:
        async with CloudLink(f"ws://127.0.0.1:{port}/ws", fingerprint=fingerprint, split=DEMO_SPLIT,
                             token=TOKEN) as link:
            while True:
                outputs.append([r.token async for r in generate_cloud(LlamaEdgeStep(ctx), link, prompt, N_GOOD)])
                if stop is None or stop.is_set():
                    return

    try:
        asyncio.run(main())
    finally:
        ctx.close()
        model.close()


class Garbage:
    """The bad client: one handshaken websocket on its own event loop, reopened after a close."""

    def __init__(self, port: int, fingerprint: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.fingerprint = fingerprint
        self.loop = asyncio.new_event_loop()
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = iter(range(10**6, 10**9))
        self.stats = {"errors": 0, "closes": 0, "valid": 0}

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def hello(self, frame: bytes | None = None) -> aiohttp.ClientWebSocketResponse:
        if self.http is None:
            self.http = aiohttp.ClientSession()
        ws = await self.http.ws_connect(self.url)
        await ws.send_bytes(frame or msgpack.packb({"t": "hello", "version": 1, "fingerprint": self.fingerprint,
                                                    "split": DEMO_SPLIT, "token": TOKEN}))
        return ws

    async def ensure(self) -> aiohttp.ClientWebSocketResponse:
        if self.ws is None or self.ws.closed:
            self.ws = await self.hello()
            m = await self.ws.receive(timeout=30)
            assert msgpack.unpackb(m.data)["t"] == "hello_ok"
        return self.ws

    async def probe(self, frame: bytes | str, expect_error: bool, expect_code: str | None = None,
                    wait_id: int | None = None) -> list[dict]:
        """Send a frame, then a ping; collect everything up to its pong (or the close).

        Undecodable frames are answered before the ping; a decodable request is answered by its
        own task, possibly after the pong: `wait_id` also waits for that request's reply."""
        from fogline.wire import decode_frame

        ws = await self.ensure()
        ping_id = next(self.ids)
        await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        await ws.send_bytes(msgpack.packb({"t": "ping", "id": ping_id}))
        got: list[dict] = []
        while True:
            m = await ws.receive(timeout=60)
            if m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                # a clean close: a policy/size code and a reason (aiohttp's 1009 has its own message)
                assert m.data in (1008, 1009), f"closed with {m.data!r} {m.extra!r}"
                assert m.data == 1009 or m.extra, "close without a reason"
                self.stats["closes"] += 1
                await ws.close()
                self.ws = None
                return got
            assert m.type == aiohttp.WSMsgType.BINARY, f"unexpected {m.type}"
            msg = decode_frame(m.data)  # every reply is a valid, typed frame
            obj = msgpack.unpackb(m.data)
            if obj["t"] == "pong" and obj.get("id") == ping_id:
                ping_id = None
            else:
                got.append(obj)
            if ping_id is None and (wait_id is None or any(g.get("id") == wait_id for g in got)):
                break
        errors = [g for g in got if g["t"] == "error"]
        self.stats["errors"] += len(errors)
        if expect_error:
            assert errors, f"a bad frame got no error: {frame[:80]!r} -> {got}"
            if expect_code:
                assert errors[0]["code"] == expect_code, errors[0]
        else:
            self.stats["valid"] += 1
        del msg
        return got

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()


def _is_bad(frame) -> bool:
    from fogline.wire import ProtocolError, decode_frame

    if isinstance(frame, str):
        return True
    try:
        msg = decode_frame(frame, 8 << 20)
    except ProtocolError:
        return True
    return not msg.REQUEST or msg.KIND == "hello"


values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats() | st.text(max_size=12) | st.binary(max_size=64),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
FIELDS = ["id", "session", "start", "h", "ack", "sampling", "top_n", "draft", "length", "stamp", "codec", "rows"]


def _valid_request(kind: str, sid: str, start: int, n: int, req_id: int = 5) -> dict:
    h = {"codec": "fp16", "rows": n, "dim": D, "data": np.zeros((n, D), np.float16).tobytes()}
    base = {"t": kind, "id": req_id, "session": sid}
    if kind in ("append", "infer"):
        return {**base, "start": start, "h": h}
    if kind == "verify":
        return {**base, "start": start, "h": h, "draft": [1] * (n - 1)}
    if kind == "truncate":
        return {**base, "length": start}
    return base


frames = st.one_of(
    st.binary(max_size=300),  # random bytes, mostly not msgpack
    st.text(max_size=40),  # text frames
    st.builds(lambda k, f: msgpack.packb({"t": k, **f}, use_bin_type=True),
              st.sampled_from(["append", "infer", "verify", "truncate", "close", "ping", "hello", "token", "error",
                               "bye", "x" * 40, ""]),
              st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)),
    st.builds(lambda k, key, v, cut: (lambda raw: raw[:cut] if cut else raw)(
        msgpack.packb({**_valid_request(k, "g-mut", 0, 2), key: v}, use_bin_type=True)),
        st.sampled_from(["append", "infer", "verify", "truncate", "close"]),
        st.sampled_from(["id", "session", "start", "h", "draft", "length", "t"]), values,
        st.integers(0, 40)),
    # huge declared lengths: a bin32 claiming 4 GiB, rows that the payload cannot hold
    st.sampled_from([b"\xc6\xff\xff\xff\xff" + b"x" * 10, b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff",
                     msgpack.packb({"t": "infer", "id": 9, "session": "g", "start": 0,
                                    "h": {"codec": "fp16", "rows": 65536, "dim": 65536, "data": b"\0" * 16}})]),
)


def test_garbage_never_hurts_the_server_or_the_good_session(cloud_process, demo_bundle_adapter):
    from fogline.manifest import load_manifest
    from transformers import AutoTokenizer

    proc, port = cloud_process
    fingerprint = load_manifest(demo_bundle_adapter / "edge").fingerprint
    tok = AutoTokenizer.from_pretrained(demo_bundle_adapter / "cloud")
    text = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = list(tok(text, add_special_tokens=False).input_ids)

    baseline: list[list[int]] = []
    _good_run(demo_bundle_adapter, port, fingerprint, prompt, None, baseline)
    assert len(baseline[0]) == N_GOOD

    stop, outputs = threading.Event(), []
    good = threading.Thread(target=_good_run, args=(demo_bundle_adapter, port, fingerprint, prompt, stop, outputs))
    good.start()
    bad = Garbage(port, fingerprint)
    try:
        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(frames)
        def fuzz(frame):
            bad.run(bad.probe(frame, expect_error=_is_bad(frame)))

        fuzz()

        # position gaps on the bad client's own session: a typed position_gap naming the expected position
        async def gaps(sid: str) -> None:
            await bad.probe(msgpack.packb(_valid_request("append", sid, 0, 3, 11)), False, wait_id=11)
            for i, start in enumerate((0, 2, 4, 1000)):
                got = await bad.probe(msgpack.packb(_valid_request("infer", sid, start, 1, 20 + i)), True,
                                      "position_gap", wait_id=20 + i)
                assert got[0]["expected"] == 3 and got[0]["id"] == 20 + i
            await bad.probe(msgpack.packb(_valid_request("infer", "g-none", 7, 1, 30)), True, "unknown_session",
                            wait_id=30)
            await bad.probe(msgpack.packb({"t": "hello", "version": 1}), True, "bad_frame")  # hello twice

        bad.run(gaps("g-gap"))

        # bad handshakes on fresh connections: typed error, then a 1008 close with a reason
        async def handshakes() -> None:
            for hello in ({"t": "hello", "version": 1, "fingerprint": fingerprint, "split": DEMO_SPLIT, "token": "x"},
                          {"t": "hello", "version": 1, "fingerprint": fingerprint, "split": DEMO_SPLIT},
                          {"t": "hello", "version": 1, "fingerprint": "f" * 64, "split": DEMO_SPLIT, "token": TOKEN},
                          {"t": "hello", "version": 7},
                          {"t": "ping", "id": 1}):
                ws = await bad.hello(msgpack.packb(hello))
                err = msgpack.unpackb((await ws.receive(timeout=30)).data)
                assert err["t"] == "error" and err["code"] in ("auth", "mismatch", "version", "bad_frame")
                m = await ws.receive(timeout=30)
                assert m.type == aiohttp.WSMsgType.CLOSE and m.data == 1008 and m.extra
                await ws.close()

        bad.run(handshakes())
        # keep the garbage coming until the good session has finished rounds under fire
        rounds = 0
        while len(outputs) < 2 and rounds < 500:
            bad.run(gaps(f"g-gap-{rounds}"))
            bad.run(handshakes())
            rounds += 1
        print(f"\ngarbage client: {bad.stats}; good rounds under garbage: {len(outputs)}")
    finally:
        stop.set()
        good.join(timeout=300)
        bad.run(bad.close())
        bad.loop.close()
    assert not good.is_alive()
    assert outputs, "the good session produced nothing while the garbage ran"
    assert all(o == baseline[0] for o in outputs), "the good session's tokens changed under garbage"
    assert proc.poll() is None, "the cloud server died"

    # the server still answers, and shuts down gracefully on SIGTERM
    async def health() -> dict:
        async with aiohttp.ClientSession() as http:
            return await (await http.get(f"http://127.0.0.1:{port}/health")).json()

    assert asyncio.run(health())["status"] == "ok"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "shutting down" in out
