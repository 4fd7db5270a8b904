"""cloud / spec / collab modes through the real edge daemon over real sockets.

Real processes: `fogline cloud serve` (PyTorch deep layers) and `fogline edge serve`
(llama.cpp + the cloud link), driven with the official `openai` client. The bundle is
exported as F32 so the edge's h_K is "the same weights" as the PyTorch reference (with a
quantized edge, greedy output drifts at the first close call by design — see
tests/test_cloud_mode.py). Prompts go in as token ids (/v1/completions) so the edge and the
reference see the very same input.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REFERENCE_TOKENS, TIE_GAP
from tests.edge_server_util import REPO, start_edge_server
from tests.edge_server_util import edge_env as _edge_env
from tests.edge_server_util import free_port as _free_port
from tests.edge_server_util import wait_cloud_connected as _wait_connected

N_CLOUD = REFERENCE_TOKENS
N_SPEC = 32


class Cloud:
    """`fogline cloud serve` as a subprocess on a fixed port (so it can be restarted there)."""

    def __init__(self, bundle: Path, port: int, log: Path) -> None:
        self.bundle, self.port, self.log = bundle, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "fogline.cli", "cloud", "serve", "--bundle",
                                          str(self.bundle / "cloud"), "--port", str(self.port), "--threads", "1",
                                          "--batch-window-ms", "5"],
                                         stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(self.log.read_text())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metric(self, name: str, labels: str = "") -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def cloud(demo_bundle_f32, tmp_path_factory):
    c = Cloud(demo_bundle_f32, _free_port(), tmp_path_factory.mktemp("cloudlog") / "cloud.log")
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def edge(demo_bundle_f32, cloud, tmp_path_factory):
    srv = start_edge_server(demo_bundle_f32 / "edge", tmp_path_factory.mktemp("edgelog") / "edge.log",
                            env=_edge_env(f"ws://127.0.0.1:{cloud.port}/ws", FOGLINE_EDGE_CLOUD_DEADLINE_MS="90000"))
    _wait_connected(srv)
    yield srv
    srv.stop()


def _client(edge):
    from openai import OpenAI

    return OpenAI(base_url=edge.v1, api_key="unused", max_retries=0, timeout=600)


def _complete(edge, ids: list[int], n: int, mode: str, **extra) -> tuple[str, dict]:
    """Greedy completion: (generated text, the `fogline` stats)."""
    r = _client(edge).completions.create(model="fogline-edge-k20", prompt=ids, max_tokens=n, temperature=0,
                                         extra_body={"mode": mode, "ignore_eos": True,
                                                     **extra})
    # text, not token ids: re-tokenising is lossy, so _assert_matches compares with the
    # tokenizer's decode of the reference instead
    return r.choices[0].text, r.model_extra["fogline"]


_tok = None


def _decode(demo_bundle_f32: Path, ids: list[int]) -> str:
    global _tok
    if _tok is None:
        from transformers import AutoTokenizer

        _tok = AutoTokenizer.from_pretrained(demo_bundle_f32 / "cloud")
    return _tok.decode(ids, skip_special_tokens=True)  # the edge renders special tokens as ""


def _assert_matches(demo_bundle_f32, text: str, ref: tuple[list[int], list[float]], n: int) -> bool:
    """True if identical; a difference is allowed only after a numerical tie of the full model."""
    toks, gaps = ref
    if text == _decode(demo_bundle_f32, toks[:n]):
        return True
    # find the first reference token whose prefix no longer matches the text
    for i in range(n):
        if not text.startswith(_decode(demo_bundle_f32, toks[:i + 1])):
            assert gaps[i] < TIE_GAP, (f"diverged from the full model at token {i} (gap {gaps[i]:.4f}, not a tie): "
                                       f"{text!r} vs {_decode(demo_bundle_f32, toks[:n])!r}")
            return False
    return True


def test_cloud_mode_through_the_edge_daemon_matches_full_model(edge, demo_bundle_f32, chat_prompts, full_reference):
    with ThreadPoolExecutor(len(chat_prompts)) as ex:
        outs = list(ex.map(lambda ids: _complete(edge, ids, N_CLOUD, "cloud"), chat_prompts))
    identical = 0
    for (text, stats), ref in zip(outs, full_reference):
        assert stats["mode"] == "cloud" and stats["fallback"] is None, stats
        assert stats["cloud_tokens"] == N_CLOUD and stats["edge_tokens"] == 0
        identical += _assert_matches(demo_bundle_f32, text, ref, N_CLOUD)
    print(f"\ncloud mode via HTTP (fp16): {identical}/{len(chat_prompts)} identical to the full model for {N_CLOUD} tokens")
    assert identical >= 5


def test_spec_mode_matches_full_model(edge, cloud, demo_bundle_f32, chat_prompts, full_reference):
    repeat0 = cloud.metric("fogline_cloud_hidden_rows_total", '{kind="repeat"}')
    with ThreadPoolExecutor(len(chat_prompts)) as ex:
        outs = list(ex.map(lambda ids: _complete(edge, ids, N_SPEC, "spec"), chat_prompts))
    identical = 0
    accepted = 0
    for (text, stats), ref in zip(outs, full_reference):
        assert stats["mode"] == "spec" and stats["fallback"] is None, stats
        assert stats["edge_tokens"] + stats["cloud_tokens"] == N_SPEC
        accepted += stats["edge_tokens"]
        identical += _assert_matches(demo_bundle_f32, text, ref, N_SPEC)
    resent = cloud.metric("fogline_cloud_hidden_rows_total", '{kind="repeat"}') - repeat0
    print(f"\nspec mode: {identical}/{len(chat_prompts)} identical; {accepted} drafted tokens accepted of "
          f"{N_SPEC * len(chat_prompts)}; rolled-back rows re-sent: {resent:.0f}")
    assert identical >= 5


def test_collab_uploads_each_position_once(edge, cloud, chat_prompts):
    new0 = cloud.metric("fogline_cloud_hidden_rows_total", '{kind="new"}')
    rep0 = cloud.metric("fogline_cloud_hidden_rows_total", '{kind="repeat"}')
    gap0 = cloud.metric("fogline_cloud_errors_total", '{code="position_gap"}')
    total_edge = total_cloud = 0
    for ids in chat_prompts[:3]:
        _, stats = _complete(edge, ids, 40, "collab", fogline_tau=0.5)
        assert stats["mode"] == "collab" and stats["fallback"] is None, stats
        total_edge += stats["edge_tokens"]
        total_cloud += stats["cloud_tokens"]
    new = cloud.metric("fogline_cloud_hidden_rows_total", '{kind="new"}') - new0
    print(f"\ncollab τ=0.5: {total_edge} edge / {total_cloud} cloud tokens; {new:.0f} h_K rows uploaded")
    assert total_edge > 0 and total_cloud > 0  # both paths exercised
    assert cloud.metric("fogline_cloud_hidden_rows_total", '{kind="repeat"}') == rep0  # nothing sent twice
    assert cloud.metric("fogline_cloud_errors_total", '{code="position_gap"}') == gap0  # nothing missing
    # every position the cloud answered after was uploaded: at least prompt + cloud-decided tokens
    assert new >= sum(len(p) for p in chat_prompts[:3]) + total_cloud - 3


def test_concurrent_requests_in_different_modes(edge, demo_bundle_f32, chat_prompts, full_reference):
    jobs = [("cloud", 0, 24), ("spec", 1, 24), ("collab", 2, 24), ("edge", 3, 24), ("spec", 4, 24)]
    alone_edge = _complete(edge, chat_prompts[3], 24, "edge")[0]
    with ThreadPoolExecutor(len(jobs)) as ex:
        outs = list(ex.map(lambda j: _complete(edge, chat_prompts[j[1]], j[2], j[0]), jobs))
    for (mode, i, n), (text, stats) in zip(jobs, outs):
        assert stats["mode"] == mode and stats["fallback"] is None, stats
        if mode in ("cloud", "spec"):
            _assert_matches(demo_bundle_f32, text, full_reference[i], n)  # fails unless equal up to a full-model tie
        if mode == "edge":
            assert text == alone_edge  # batching with cloud-mode neighbours changes nothing


def test_cloud_restart_mid_generation_replays_and_output_is_unchanged(edge, cloud, demo_bundle_f32, chat_prompts, full_reference):
    """Kill -9 the cloud while a cloud-mode and a spec-mode stream are running, restart it on
    the same port: the edge replays its h_K history and both outputs equal uninterrupted runs."""
    from openai import OpenAI

    c = OpenAI(base_url=edge.v1, api_key="unused", max_retries=0, timeout=600)
    n = 40
    seen = threading.Event()
    results: dict[str, tuple[str, dict]] = {}

    def run(mode: str, ids: list[int]) -> None:
        text, stats, count = "", None, 0
        for ch in c.completions.create(model="fogline-edge-k20", prompt=ids, max_tokens=n, temperature=0,
                                       stream=True, extra_body={"mode": mode, "ignore_eos": True}):
            text += ch.choices[0].text if ch.choices else ""
            count += 1
            if count >= 8:
                seen.set()
            if ch.model_extra.get("fogline"):
                stats = ch.model_extra["fogline"]
            elif ch.choices and ch.choices[0].model_extra and ch.choices[0].model_extra.get("fogline"):
                stats = ch.choices[0].model_extra["fogline"]
        results[mode] = (text, stats or {})

    threads = [threading.Thread(target=run, args=("cloud", chat_prompts[0])),
               threading.Thread(target=run, args=("spec", chat_prompts[1]))]
    for t in threads:
        t.start()
    assert seen.wait(300)
    cloud.kill()
    time.sleep(0.5)
    cloud.start()
    for t in threads:
        t.join(600)
    assert set(results) == {"cloud", "spec"}
    for mode, i in (("cloud", 0), ("spec", 1)):
        text, stats = results[mode]
        assert stats.get("fallback") is None, stats
        assert _assert_matches(demo_bundle_f32, text, full_reference[i], n), mode
    _wait_connected(edge)


def test_stalled_or_unreachable_cloud_falls_back_to_edge(demo_bundle_f32, cloud, chat_prompts, tmp_path):
    """Through the WAN emulator: a stall longer than cloud_deadline_ms mid-stream, then a cut
    with new connections refused — every request completes, in edge mode, saying why."""
    from tools.wanem import LinkShape, WanEmulator

    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    wan = asyncio.run_coroutine_threadsafe(
        WanEmulator(("127.0.0.1", cloud.port), LinkShape(delay_ms=2.0)).start(), loop).result(30)
    srv = start_edge_server(demo_bundle_f32 / "edge", tmp_path / "edge.log",
                            env=_edge_env(f"ws://127.0.0.1:{wan.port}/ws", FOGLINE_EDGE_CLOUD_DEADLINE_MS="1500"))
    try:
        _wait_connected(srv)
        c = _client(srv)
        got: list[dict] = []

        def stream(mode: str, ids: list[int], fault) -> tuple[int, dict]:
            n, stats = 0, None
            for ch in c.completions.create(model="fogline-edge-k20", prompt=ids, max_tokens=30, temperature=0,
                                           stream=True, extra_body={"mode": mode, "ignore_eos": True}):
                n += 1
                if n == 5:
                    loop.call_soon_threadsafe(fault)
                extra = ch.choices[0].model_extra if ch.choices else {}
                stats = (extra or {}).get("fogline") or ch.model_extra.get("fogline") or stats
            return n, stats or {}

        _, st = stream("cloud", chat_prompts[0], lambda: wan.stall(6.0))
        assert st["fallback"] and "deadline" in st["fallback"], st
        assert st["edge_tokens"] > 0 and st["cloud_tokens"] > 0
        got.append(st)
        time.sleep(6.5)  # the stall ends
        _wait_connected(srv)

        def cut() -> None:
            wan.refuse(30.0)
            wan.cut_all()

        _, st = stream("spec", chat_prompts[1], cut)
        assert st["fallback"], st
        assert st["edge_tokens"] + st["cloud_tokens"] == 30
        # while the cloud is unreachable a new request goes straight to edge mode
        r = c.completions.create(model="fogline-edge-k20", prompt=chat_prompts[2], max_tokens=8, temperature=0,
                                 extra_body={"mode": "collab", "ignore_eos": True})
        assert r.model_extra["fogline"]["fallback"], r.model_extra
        assert r.usage.completion_tokens == 8
        with urllib.request.urlopen(srv.base + "/metrics") as m:
            body = m.read().decode()
        assert re.search(r'^fogline_edge_fallbacks_total\{requested="cloud"\} [1-9]', body, re.M), body
        _, h = srv.health()
        assert h["cloud"]["configured"] is True
    finally:
        srv.stop()
        asyncio.run_coroutine_threadsafe(wan.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


def test_spec_mode_sampling_is_seeded_and_mixes_origins(edge, chat_prompts):
    """temperature > 0 with a seed: spec mode completes in spec mode, the same seed gives the
    same completion (fixed γ, no pipelined block: see cloud_modes.py), tokens come from both
    the edge (accepted drafts) and the cloud (corrections / bonus tokens)."""
    def run(seed: int) -> tuple[str, dict]:
        r = _client(edge).completions.create(model="fogline-edge-k20", prompt=chat_prompts[2], max_tokens=24,
                                             temperature=0.8, seed=seed, extra_body={"mode": "spec",
                                                                                     "ignore_eos": True})
        return r.choices[0].text, r.model_extra["fogline"]

    a, sa = run(1234)
    b, sb = run(1234)
    for st in (sa, sb):
        assert st["mode"] == "spec" and st["fallback"] is None, st
        assert st["edge_tokens"] + st["cloud_tokens"] == 24
    assert a == b and sa["edge_tokens"] == sb["edge_tokens"]
    assert sa["edge_tokens"] > 0 and sa["cloud_tokens"] > 0, sa
    others = {run(s)[0] for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # the seed matters: sampled, not greedy


def test_replay_history_is_fp16_and_bounded(cloud, demo_bundle_f32):
    """CloudSession keeps h_K as fp16, at most ~replay_history_tokens rows; a replay within the
    bound reproduces the uninterrupted session, one beyond it raises ReplayImpossible (the
    modes turn that into a fallback) — and nothing is refused before a replay is needed."""
    import numpy as np

    from edge_runtime.cloud_client import CloudLink
    from edge_runtime.cloud_generation import CloudSession, ReplayImpossible
    from fogline.manifest import load_manifest

    m = load_manifest(demo_bundle_f32 / "edge", role="edge")
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((40, m.hidden_size)).astype(np.float32)
    steps = [rng.standard_normal((1, m.hidden_size)).astype(np.float32) for _ in range(30)]

    async def go() -> None:
        link = CloudLink(f"ws://127.0.0.1:{cloud.port}/ws", fingerprint=m.fingerprint, split=m.split)
        try:
            ref, small, big = (CloudSession(link, history_tokens=h) for h in (None, 16, 64))
            for cs in (ref, small, big):
                await cs.infer(prompt)
                for row in steps[:20]:
                    await cs.infer(row)  # 60 positions: past the small bound, still served
            assert small.history.dtype == np.float16 and small.n == 60
            assert small.base > 0 and 16 <= small.n - small.base <= max(2 * 16, len(prompt))
            assert big.base == 0 and len(big.history) == 60
            assert np.array_equal(big.history[:40], np.clip(prompt, -65504, 65504).astype(np.float16))
            for cs in (small, big):  # the cloud loses both sessions
                await link.close_session(cs.sid)
            want = [(await ref.infer(r)).token for r in steps[20:]]
            got = [(await big.infer(r)).token for r in steps[20:]]
            assert big.replays == 1 and got == want  # fp16 codec: the replay is bit-identical
            with pytest.raises(ReplayImpossible, match="keeps only positions >= "):
                await small.infer(steps[20])
            for cs in (ref, big):
                await cs.close()
        finally:
            await link.close()

    asyncio.run(go())


def test_cloud_unreachable_at_startup_then_reconnects(demo_bundle_f32, chat_prompts, tmp_path):
    """The edge starts with its cloud_url on a closed port: /health is 200 with the cloud not
    connected, a cloud-mode request completes in edge mode naming the reason; once a cloud
    listens on that port the link reconnects (backoff) and a later request uses it."""
    port = _free_port()
    srv = start_edge_server(demo_bundle_f32 / "edge", tmp_path / "edge.log",
                            env=_edge_env(f"ws://127.0.0.1:{port}/ws", FOGLINE_EDGE_CLOUD_DEADLINE_MS="60000"))
    late = Cloud(demo_bundle_f32, port, tmp_path / "cloud.log")
    try:
        status, h = srv.health()
        assert status == 200 and h["cloud"]["configured"] is True and h["cloud"]["connected"] is False, h
        end = time.monotonic() + 30
        while srv.health()[1]["cloud"].get("last_error") is None and time.monotonic() < end:
            time.sleep(0.1)
        text, st = _complete(srv, chat_prompts[0], 8, "cloud")
        assert st["fallback"] and "unreachable" in st["fallback"] and str(port) in st["fallback"], st
        assert st["edge_tokens"] == 8 and st["cloud_tokens"] == 0 and text
        late.start()
        _wait_connected(srv, timeout=90)
        _, st = _complete(srv, chat_prompts[0], 8, "cloud")
        assert st["fallback"] is None and st["cloud_tokens"] == 8, st
    finally:
        srv.stop()
        late.stop()


def test_spec_mode_settles_a_kept_draft_and_keeps_going(demo_bundle, tmp_path):
    """Spec on the Q8_0 bundle equals cloud mode. Guards the verdict ordering fix: when the cloud's
    correction equals the next held draft, the engine re-asks the source only after the source saw
    the verdict (it used to park forever). Whether that case arises depends on when verdicts land,
    so this test exercises it without being able to force it."""
    from openai import OpenAI

    cloud = Cloud(demo_bundle, _free_port(), tmp_path / "cloud.log")
    cloud.start()
    srv = start_edge_server(demo_bundle / "edge", tmp_path / "edge.log", "--parallel", "2", "--ctx-size", "256",
                            "--batch-size", "64", env=_edge_env(f"ws://127.0.0.1:{cloud.port}/ws",
                                                                FOGLINE_EDGE_CLOUD_DEADLINE_MS="60000"))
    try:
        _wait_connected(srv)
        client = OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120)
        texts = {}
        for mode in ("cloud", "spec"):
            r = client.completions.create(model="fogline-edge-k20", prompt="List three colours.", max_tokens=24,
                                          temperature=0, extra_body={"mode": mode, "ignore_eos": True})
            stats = r.model_extra["fogline"]
            assert stats["fallback"] is None and stats["edge_tokens"] + stats["cloud_tokens"] == 24, stats
            texts[mode] = r.choices[0].text
        assert texts["spec"] == texts["cloud"]
    finally:
        srv.stop()
        cloud.stop()
