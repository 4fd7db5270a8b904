"""The cloud server from outside, over real websockets on 127.0.0.1: handshake refusals,
positions, sessions (LRU budget, TTL, replay), verify, batching, limits, health, metrics,
and graceful shutdown. The deep model is the demo bundle's; h_K rows are random."""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import numpy as np
import pytest

from tests.conftest import DEMO_SPLIT

D = 576  # SmolLM2-135M hidden size
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def manifest(demo_bundle):
    from fogline.manifest import load_manifest

    return load_manifest(demo_bundle / "cloud", role="cloud")


@pytest.fixture(scope="module")
def direct(demo_bundle, manifest):
    """The same deep model, called directly (no server): the expected answers."""
    import json

    from safetensors.torch import load_file

    from cloud_runtime.deep_model import load_deep_model
    from fogline.arch import ArchSpec

    spec = ArchSpec.from_hf_config(json.loads((demo_bundle / "cloud" / "config.json").read_text()))
    return load_deep_model(spec, manifest.split, load_file(str(demo_bundle / "cloud" / "deep.safetensors")))


def direct_logits(model, h: np.ndarray):
    """Logits of every row of one session fed h from position 0."""
    import torch

    from cloud_runtime.deep_model import Segment

    return model.logits(model.forward_ragged([Segment(torch.from_numpy(h), model.new_cache(), 0)]))


def rows(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, D)) * 2.0).astype(np.float32)


async def start(aiohttp_server, demo_bundle, port: int | None = None, **kw):
    from cloud_runtime.config import CloudConfig
    from cloud_runtime.server import create_app

    return await aiohttp_server(create_app(CloudConfig(bundle=demo_bundle / "cloud", **kw)), host="127.0.0.1",
                                port=port)


def link_for(server, manifest, **kw):
    from edge_runtime.cloud_client import CloudLink

    kw.setdefault("fingerprint", manifest.fingerprint)
    kw.setdefault("split", manifest.split)
    return CloudLink(f"ws://127.0.0.1:{server.port}/ws", **kw)


async def test_handshake_refusals_are_typed_and_close_the_socket(aiohttp_server, demo_bundle, manifest):
    from fogline.wire import AuthError, MismatchError

    server = await start(aiohttp_server, demo_bundle, token="s3cret")
    for kw, exc, what in ((dict(token="wrong"), AuthError, "token"),
                          (dict(token=""), AuthError, "token"),
                          (dict(token="s3cret", fingerprint="0" * 64), MismatchError, "fingerprint"),
                          (dict(token="s3cret", split=DEMO_SPLIT + 1), MismatchError, "K=")):
        link = link_for(server, manifest, **kw)
        with pytest.raises(exc, match=what):
            await link.connect()
        await link.close()
    # raw: a newer protocol version, then a text frame instead of hello; both get an error + 1008
    async with aiohttp.ClientSession() as http:
        for first in (msgpack.packb({"t": "hello", "version": 9, "fingerprint": manifest.fingerprint}),
                      "hello?"):
            ws = await http.ws_connect(f"ws://127.0.0.1:{server.port}/ws")
            await (ws.send_bytes(first) if isinstance(first, bytes) else ws.send_str(first))
            m = await ws.receive(timeout=10)
            err = msgpack.unpackb(m.data)
            assert err["t"] == "error" and err["code"] in ("version", "bad_frame")
            m = await ws.receive(timeout=10)
            assert m.type == aiohttp.WSMsgType.CLOSE and m.data == 1008 and m.extra
            await ws.close()
        # the token may also come as an Authorization header
        ws = await http.ws_connect(f"ws://127.0.0.1:{server.port}/ws", headers={"Authorization": "Bearer s3cret"})
        await ws.send_bytes(msgpack.packb({"t": "hello", "version": 1, "fingerprint": manifest.fingerprint,
                                           "split": DEMO_SPLIT}))
        assert msgpack.unpackb((await ws.receive(timeout=10)).data)["t"] == "hello_ok"
        await ws.close()


async def test_positions_gaps_truncate_and_unknown_sessions(aiohttp_server, demo_bundle, manifest, direct):
    from fogline.wire import PositionGap, UnknownSession

    server = await start(aiohttp_server, demo_bundle)
    h = rows(12, 1)
    want = direct_logits(direct, h).argmax(-1).tolist()
    async with link_for(server, manifest) as link:
        r = await link.infer("a", 0, h[:5])
        assert (r.token, r.length) == (want[4], 5)
        with pytest.raises(PositionGap) as gap:
            await link.infer("a", 3, h[3:6])  # overlap
        assert gap.value.expected == 5
        with pytest.raises(PositionGap) as gap:
            await link.infer("a", 7, h[7:8])  # hole
        assert gap.value.expected == 5
        with pytest.raises(UnknownSession):
            await link.infer("never-opened", 4, h[4:5])
        with pytest.raises(PositionGap):
            await link.truncate("a", 9)
        assert await link.truncate("a", 2) == 2
        r = await link.infer("a", 2, h[2:8])  # recomputed from position 2 on
        assert (r.token, r.length) == (want[7], 8)
        assert await link.append("a", 8, h[8:10]) == 10
        await link.append("a", 10, h[10:11], ack=False)
        r = await link.infer("a", 11, h[11:12])
        assert (r.token, r.length) == (want[11], 12)
        await link.close_session("a")
        with pytest.raises(UnknownSession, match="closed"):
            await link.infer("a", 12, h[:1])


async def test_concurrent_sessions_are_batched_and_answers_do_not_change(aiohttp_server, demo_bundle, manifest,
                                                                         direct):
    """16 sessions decode concurrently through one websocket: every token equals the unbatched
    model's, and the batcher really ran several sessions per forward pass."""
    import torch

    server = await start(aiohttp_server, demo_bundle, batch_window_ms=30.0)
    n_sess, prompt, steps = 16, 9, 6
    hs = [rows(prompt + steps, 100 + i) for i in range(n_sess)]
    expected, gaps = [], []
    for h in hs:
        lg = direct_logits(direct, h)[prompt - 1:]
        expected.append(lg.argmax(-1).tolist())
        top2 = torch.topk(lg, 2).values
        gaps.append((top2[:, 0] - top2[:, 1]).tolist())

    async def one(link, i):
        out = [(await link.infer(f"s{i}", 0, hs[i][:prompt], top_n=3))]
        for t in range(steps):
            out.append(await link.infer(f"s{i}", prompt + t, hs[i][prompt + t:prompt + t + 1]))
        return out

    async with link_for(server, manifest) as link:
        results = await asyncio.gather(*(one(link, i) for i in range(n_sess)))
    for i, res in enumerate(results):
        for t, r in enumerate(res):
            if gaps[i][t] > 1e-3:  # not a numerical tie
                assert r.token == expected[i][t], (i, t)
        top = res[0].top
        assert len(top) == 3 and top[0][0] == res[0].token and top[0][1] >= top[1][1] >= top[2][1] > 0
    from cloud_runtime.server import METRICS

    hist = server.app[METRICS].batch_sessions
    count = next(s.value for m in hist.collect() for s in m.samples if s.name.endswith("_count"))
    single = next(s.value for m in hist.collect() for s in m.samples
                  if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
    assert count < n_sess * (steps + 1) and single < count  # most passes carried several sessions


async def test_verify_accepts_the_matching_prefix_and_truncates(aiohttp_server, demo_bundle, manifest, direct):
    server = await start(aiohttp_server, demo_bundle)
    h = rows(10, 7)
    greedy = direct_logits(direct, h).argmax(-1).tolist()  # greedy[i]: the token after position i
    async with link_for(server, manifest) as link:
        await link.append("v", 0, h[:4])
        # rows 4..7 are "drafted" tokens' h_K: drafts = the model's own choices -> all accepted
        v = await link.verify("v", 4, h[4:8], greedy[4:7])
        assert (v.accepted, v.token, v.length) == (3, greedy[7], 8)
        await link.truncate("v", 4)
        bad = [greedy[4], (greedy[5] + 1) % 49152, greedy[6]]
        v = await link.verify("v", 4, h[4:8], bad)
        assert (v.accepted, v.token, v.length) == (1, greedy[5], 6)
        r = await link.infer("v", 6, h[6:7])  # the cloud kept exactly [0, 6)
        assert r.token == greedy[6]


async def test_agreement_checks_and_step_load_come_back_measured(aiohttp_server, demo_bundle, manifest, direct):
    """collab's live agreement (issue 12.5): the cloud compares the edge's token after each checked
    row with its own greedy token and reports the counts in the session's next reply (an
    ack-less append's counts too); every step reply carries its queue wait and pass time."""
    from edge_runtime.cloud_client import Meter

    server = await start(aiohttp_server, demo_bundle)
    h = rows(12, 3)
    greedy = direct_logits(direct, h).argmax(-1).tolist()
    wrong = {p: (greedy[p] + 1) % 49152 for p in range(12)}
    async with link_for(server, manifest) as link:
        meter = Meter()
        link.attach("c", meter)
        assert link.cloud_step_ms is None and link.cloud_queue_ms is None
        # ack-less append: rows 0..5, checks on 1 (right), 2 (wrong), 4 (right)
        await link.append("c", 0, h[:6], ack=False, check={1: greedy[1], 2: wrong[2], 4: greedy[4]})
        assert (meter.checked, meter.agreed) == (0, 0)  # no reply yet
        # infer piggybacks rows 6..8: checks on 6 (wrong), 7 (right); the reply brings all five
        r = await link.infer("c", 6, h[6:9], check={6: wrong[6], 7: greedy[7]})
        assert r.token == greedy[8]
        assert (meter.checked, meter.agreed) == (5, 3)
        assert link.cloud_step_ms is not None and link.cloud_step_ms > 0
        assert link.cloud_queue_ms is not None and link.cloud_queue_ms >= 0
        r = await link.infer("c", 9, h[9:10])  # nothing new to report: the counts do not change
        assert (meter.checked, meter.agreed) == (5, 3)
    from cloud_runtime.server import METRICS

    text = server.app[METRICS].render().decode()
    assert 'fogline_cloud_agreement_checks_total{outcome="agreed"} 3.0' in text
    assert 'fogline_cloud_agreement_checks_total{outcome="disagreed"} 2.0' in text


async def test_lru_eviction_and_replay(aiohttp_server, demo_bundle, manifest, direct):
    from cloud_runtime.server import METRICS, RUNTIME
    from edge_runtime.cloud_generation import CloudSession
    from fogline.wire import UnknownSession

    per_session = direct.new_cache().bytes_for(5)  # the KV blocks of one 5-position session
    server = await start(aiohttp_server, demo_bundle, kv_budget_bytes=3 * per_session)
    h = [rows(5, 200 + i) for i in range(4)]
    async with link_for(server, manifest) as link:
        for i in range(3):
            await link.append(f"e{i}", 0, h[i][:4])
        await link.append("e0", 4, h[0][4:5])  # e0 is now the most recently used
        await link.append("e3", 0, h[3][:4])  # over budget: evicts the LRU idle session, e1
        store = server.app[RUNTIME].store
        assert store.get("e1") is None and store.get("e0") is not None
        assert store.kv_bytes <= 3 * per_session
        with pytest.raises(UnknownSession, match="evicted"):
            await link.infer("e1", 4, h[1][4:5])
        cs = CloudSession(link, "e1")  # the edge's side: it kept e1's rows and replays them
        cs.record(h[1][:4])
        cs.cloud_len = 4
        r = await cs.infer(h[1][4:5])
        assert cs.replays == 1 and r.length == 5
        assert r.token == int(direct_logits(direct, h[1]).argmax(-1)[-1])
        evictions = server.app[METRICS].evictions.labels("budget")._value.get()
        assert evictions >= 2  # e1, then one more to make room for e1's replay


async def test_ttl_reaper_and_budget_overload(aiohttp_server, demo_bundle, manifest):
    from fogline.wire import Overloaded, UnknownSession

    server = await start(aiohttp_server, demo_bundle, session_ttl_s=0.2, reap_interval_s=0.05)
    async with link_for(server, manifest) as link:
        await link.append("t", 0, rows(3, 3))
        await asyncio.sleep(0.6)
        with pytest.raises(UnknownSession, match="expired"):
            await link.infer("t", 3, rows(1, 4))
    tiny = await start(aiohttp_server, demo_bundle, kv_budget_bytes=1000)
    async with link_for(tiny, manifest) as link:
        with pytest.raises(Overloaded) as e:
            await link.infer("x", 0, rows(2, 5))
        assert e.value.retry_after and e.value.retry_after > 0


async def test_limits_and_payload_checks(aiohttp_server, demo_bundle, manifest):
    from fogline.wire import BadFrame, Infer, TooLarge, encode_hidden

    server = await start(aiohttp_server, demo_bundle, max_rows_per_frame=8, max_frame_bytes=64 << 10,
                         codecs=("fp16",))
    async with link_for(server, manifest, codec="int8") as link:
        with pytest.raises(BadFrame, match="codec int8 is not accepted"):
            await link.infer("c", 0, rows(2, 1))
    async with link_for(server, manifest) as link:
        with pytest.raises(BadFrame, match="hidden size"):
            await link.infer("c", 0, np.zeros((2, D + 1), np.float32))
        link._max_rows = lambda: 1 << 20  # defeat the client's own chunking to reach the server limits
        with pytest.raises(TooLarge, match="rows"):
            await link.infer("c", 0, rows(9, 1))
        with pytest.raises(TooLarge, match="bytes"):
            await link.infer("c", 0, np.zeros((60, D), np.float32))
        assert await link.ping() >= 0  # the connection survived all of it
    async with aiohttp.ClientSession() as http:  # beyond aiohttp's hard cap: a clean 1009 close
        ws = await http.ws_connect(f"ws://127.0.0.1:{server.port}/ws")
        await ws.send_bytes(msgpack.packb({"t": "hello", "version": 1, "fingerprint": manifest.fingerprint,
                                           "split": DEMO_SPLIT}))
        await ws.receive(timeout=10)
        big = Infer(id=1, session="z", start=0, h=encode_hidden(np.zeros((200, D), np.float32), "fp16"))
        from fogline.wire import encode_frame

        await ws.send_bytes(encode_frame(big))
        m = await ws.receive(timeout=10)
        assert m.type == aiohttp.WSMsgType.CLOSE and m.data == 1009
        await ws.close()


async def test_seeded_sampling_is_reproducible(aiohttp_server, demo_bundle, manifest):
    from fogline.wire import Sampling

    server = await start(aiohttp_server, demo_bundle)
    h = rows(6, 9)
    async with link_for(server, manifest) as link:
        picks = []
        for sid in ("p", "q"):
            toks = [(await link.infer(sid, 0, h[:4], Sampling(1.2, 0.95, 50, seed=42))).token]
            toks.append((await link.infer(sid, 4, h[4:5], Sampling(1.2, 0.95, 50, seed=42))).token)
            picks.append(toks)
        assert picks[0] == picks[1]
        assert len({(await link.infer(f"r{i}", 0, h[:4], Sampling(5.0, seed=i))).token for i in range(12)}) > 1


async def test_health_metrics_and_graceful_shutdown(aiohttp_server, demo_bundle, manifest):
    server = await start(aiohttp_server, demo_bundle)
    async with aiohttp.ClientSession() as http:
        health = await (await http.get(f"http://127.0.0.1:{server.port}/health")).json()
        assert health["status"] == "ok" and health["split"] == DEMO_SPLIT
        assert health["fingerprint"] == manifest.fingerprint
    link = link_for(server, manifest)
    await link.connect()
    # a long step in flight when shutdown starts must still be answered (drain), then a bye
    long = asyncio.ensure_future(link.infer("long", 0, rows(1500, 11)))
    await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as http:
        text = await (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text()
    for name in ("fogline_cloud_sessions", "fogline_cloud_kv_bytes", "fogline_cloud_evictions_total",
                 "fogline_cloud_batch_sessions", "fogline_cloud_connections 1.0"):
        assert name in text
    await server.close()
    r = await long
    assert r.length == 1500
    for _ in range(100):
        if link.bye is not None:
            break
        await asyncio.sleep(0.02)
    assert link.bye is not None and "shutting down" in link.bye.reason
    await link.close()


def test_judge_rules_for_greedy_and_sampled_drafts():
    """The verification rule on hand-made logits (no server): greedy prefix matching, and
    speculative sampling's accept/resample with the edge's draft distribution."""
    import torch

    from cloud_runtime.sampling import judge
    from fogline.wire import Sampling

    logits = torch.full((3, 5), -10.0)
    logits[0, 1] = logits[1, 2] = logits[2, 3] = 10.0  # the model wants 1, 2, then 3
    j = judge(logits, (1, 2), Sampling(), 0)
    assert (j.accepted, j.token) == (2, 3)
    j = judge(logits, (1, 4), Sampling(), 0)
    assert (j.accepted, j.token) == (1, 2)
    j = judge(logits, (0, 2), Sampling(), 0)
    assert (j.accepted, j.token) == (0, 1)
    # sampled, q == p: every draft is accepted (u < p/q = 1)
    s = Sampling(temperature=1.0, seed=3)
    p = [torch.softmax(logits[i], -1) for i in range(3)]
    probs = tuple(tuple((t, float(p[i][t])) for t in range(5)) for i in range(2))
    assert judge(logits, (1, 2), s, 0, probs).accepted == 2
    # sampled, the edge was sure of a token the model finds impossible: rejected, resampled from p - q
    sure = (((0, 1.0),), ((0, 1.0),))
    j = judge(logits, (0, 0), s, 0, sure)
    assert j.accepted == 0 and j.token == 1
    # out-of-vocabulary drafts are rejected, never crash
    assert judge(logits, (99, 2), s, 0).accepted == 0
    assert judge(logits, (1, 99), Sampling(), 0).accepted == 1


async def test_edge_replays_after_the_cloud_restarts(aiohttp_server, demo_bundle, manifest, direct):
    """The cloud goes away (graceful shutdown) and comes back empty on the same port: the edge's
    CloudSession reconnects, gets unknown_session, replays its history, and the token is right."""
    from edge_runtime.cloud_generation import CloudSession

    first = await start(aiohttp_server, demo_bundle)
    port = first.port
    link = link_for(first, manifest)
    cs = CloudSession(link, backoff_s=0.05)
    h = rows(8, 21)
    want = direct_logits(direct, h).argmax(-1).tolist()
    assert (await cs.infer(h[:5])).token == want[4]
    await first.close()
    await start(aiohttp_server, demo_bundle, port=port)
    r = await cs.infer(h[5:6])
    assert (r.token, r.length) == (want[5], 6) and cs.replays == 1
    await link.close()


def test_config_precedence_and_validation(tmp_path):
    from cloud_runtime.config import load_config
    from fogline.errors import ConfigError

    toml = tmp_path / "cloud.toml"
    toml.write_text('[cloud]\nbundle = "/srv/b/cloud"\nport = 9000\nbatch_window_ms = 5\ndtype = "bf16"\n')
    env = {"FOGLINE_CLOUD_PORT": "9100", "FOGLINE_CLOUD_FAST_GEMV": "yes", "FOGLINE_CLOUD_CODECS": "fp16, int8"}
    c = load_config(toml, env=env)
    assert (c.port, c.batch_window_ms, c.dtype, c.fast_gemv, c.codecs) == (9100, 5.0, "bfloat16", True,
                                                                          ("fp16", "int8"))
    assert load_config(toml, env=env, overrides={"port": 9200}).port == 9200
    for bad_env, bad_over, match in (({"FOGLINE_CLOUD_PORT": "eighty"}, {}, "port"),
                                     ({}, {"dtype": "int4"}, "dtype"),
                                     ({}, {"codecs": ("fp8",)}, "codecs"),
                                     ({}, {"kv_budget_bytes": 0}, "kv_budget_bytes"),
                                     ({}, {"nonsense": 1}, "nonsense")):
        with pytest.raises(ConfigError, match=match):
            load_config(toml, env=bad_env, overrides=bad_over)
    toml.write_text('bundle = "/b"\nbatch_windw_ms = 1\n')
    with pytest.raises(ConfigError, match="batch_windw_ms"):
        load_config(toml, env={})
    with pytest.raises(ConfigError, match="no bundle"):
        load_config(None, env={})


async def test_a_session_whose_peers_went_quiet_is_not_held_for_a_window(aiohttp_server, demo_bundle, manifest):
    """Two sessions decode together (each learns a think time), then one stops: the other's
    next steps run as soon as the quiet one is overdue, never after the (huge) batch window."""
    import time

    server = await start(aiohttp_server, demo_bundle, batch_window_ms=1000.0)
    h = rows(16, 9)
    async with link_for(server, manifest) as link:
        await asyncio.gather(link.infer("p", 0, h[:4]), link.infer("q", 0, h[:4]))

        async def steps(sid: str, a: int, b: int) -> None:
            for i in range(a, b):
                await link.infer(sid, i, h[i:i + 1])

        await asyncio.gather(steps("p", 4, 8), steps("q", 4, 8))
        lone = []
        for i in range(8, 12):  # q has gone quiet
            t0 = time.perf_counter()
            await link.infer("p", i, h[i:i + 1])
            lone.append(time.perf_counter() - t0)
    assert max(lone) < 0.5, lone  # a window would be >= 1 s
