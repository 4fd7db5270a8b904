"""spec's pipelined next block (drafted while a verdict is in flight), kept and rolled back.

The real cloud runtime serves the real websocket in this process; a hook delays every verdict
on cue, so the edge daemon (a real `fogline edge serve` on the production-path bundle) always
has a next block drafted when the verdict lands. A verdict that accepts the whole block keeps
that pipelined block; one that rejects a draft rolls it back. Both must leave the output
identical to cloud mode's (greedy: the cloud's argmax at every position).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.edge_server_util import edge_env, free_port, start_edge_server, wait_cloud_connected

N_TOKENS = 48
VERDICT_DELAY_S = 0.4  # far longer than drafting one token on the edge: the next block is always drafted
PROMPT = "<|im_start|>user\nTell me about owls in two sentences.<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class VerdictLog:
    """What the hook saw: (draft length, accepted) per verify; `cue` turns the delay on."""

    cue: threading.Event
    verdicts: list[tuple[int, int]]


class InProcessCloud:
    """The real cloud runtime (create_app) on a real port, its loop in a thread."""

    def __init__(self, bundle: Path, log: VerdictLog) -> None:
        self.bundle, self.log, self.port = bundle, log, free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.runner = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:  # reported by start()
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        from cloud_runtime.config import CloudConfig
        from cloud_runtime.server import create_app

        app = create_app(CloudConfig(bundle=self.bundle / "cloud", port=self.port, threads=1,
                                     batch_window_ms=5.0, step_deadline_ms=5000.0))
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(300), "the cloud did not start"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def verdict_log(monkeypatch_module) -> VerdictLog:
    """Wrap CloudRuntime._step: on cue, a verdict is held back VERDICT_DELAY_S before it is sent."""
    from cloud_runtime import server
    from fogline.wire.protocol import Verify

    log = VerdictLog(threading.Event(), [])
    real = server.CloudRuntime._step

    async def delayed(self, msg):
        reply = await real(self, msg)
        if isinstance(msg, Verify) and log.cue.is_set():
            log.verdicts.append((len(msg.draft), reply.accepted))
            await asyncio.sleep(VERDICT_DELAY_S)
        return reply

    monkeypatch_module.setattr(server.CloudRuntime, "_step", delayed)
    return log


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def pipeline_cloud(demo_bundle_adapter, verdict_log) -> Iterator[InProcessCloud]:
    cloud = InProcessCloud(demo_bundle_adapter, verdict_log)
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.stop()


@pytest.fixture(scope="module")
def linked_edge(demo_bundle_adapter, pipeline_cloud, tmp_path_factory):
    srv = start_edge_server(demo_bundle_adapter / "edge", tmp_path_factory.mktemp("spec-pipe") / "edge.log",
                            env=edge_env(f"ws://127.0.0.1:{pipeline_cloud.port}/ws",
                                         FOGLINE_EDGE_CLOUD_DEADLINE_MS="90000"))
    try:
        wait_cloud_connected(srv)
        yield srv
    finally:
        srv.stop()


def _complete(edge, mode: str) -> tuple[str, dict]:
    from openai import OpenAI

    r = OpenAI(base_url=edge.v1, api_key="unused", max_retries=0, timeout=600).completions.create(
        model="fogline-edge-k20", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0,
        extra_body={"mode": mode, "ignore_eos": True})
    return r.choices[0].text, r.model_extra["fogline"]


@pytest.mark.slow
def test_pipelined_block_kept_and_rolled_back_matches_cloud_mode(linked_edge, verdict_log):
    reference, ref_stats = _complete(linked_edge, "cloud")
    assert ref_stats["mode"] == "cloud" and ref_stats["fallback"] is None, ref_stats
    verdict_log.cue.set()
    try:
        text, stats = _complete(linked_edge, "spec")
    finally:
        verdict_log.cue.clear()
    assert stats["mode"] == "spec" and stats["fallback"] is None, stats
    # A whole-block accept keeps the pipelined block (when the cloud's bonus token is the edge's
    # first pipelined draft, engine._apply_verdict); a rejection always rolls it back.
    kept = [v for v in verdict_log.verdicts if v[1] == v[0]]
    rolled = [v for v in verdict_log.verdicts if v[1] < v[0]]
    print(f"\nspec with delayed verdicts: {len(verdict_log.verdicts)} verdicts, {len(kept)} accepted the whole "
          f"block (pipelined block kept), {len(rolled)} rejected a draft (pipelined block rolled back)")
    assert kept, verdict_log.verdicts
    assert rolled, verdict_log.verdicts
    assert stats["cloud_round_trips"] == len(verdict_log.verdicts)
    assert stats["edge_tokens"] + stats["cloud_tokens"] == N_TOKENS and stats["edge_tokens"] > 0
    assert text == reference


@pytest.fixture(scope="module")
def stopped_edges(demo_bundle_adapter, pipeline_cloud, tmp_path_factory):
    """Two more edges on the same in-process cloud: spec_stop 1.0 (never sure: no drafts) and 0.5."""
    cloud_url = f"ws://127.0.0.1:{pipeline_cloud.port}/ws"
    edges = {}
    try:
        for stop in ("1.0", "0.5"):
            edges[stop] = start_edge_server(
                demo_bundle_adapter / "edge", tmp_path_factory.mktemp(f"spec-stop-{stop}") / "edge.log",
                env=edge_env(cloud_url, FOGLINE_EDGE_CLOUD_DEADLINE_MS="90000", FOGLINE_EDGE_SPEC_STOP=stop))
            wait_cloud_connected(edges[stop])
        yield edges
    finally:
        for srv in edges.values():
            srv.stop()


@pytest.mark.slow
def test_spec_confidence_stop(linked_edge, stopped_edges):
    """spec_stop: a position the exit head is unsure of is not drafted. At 1.0 nothing is, so every
    token is the cloud's, one empty block per round trip, and the text is cloud mode's; at 0.5 the
    text is still exactly cloud mode's (greedy), with fewer rejected drafts than drafts."""
    reference, _ = _complete(linked_edge, "cloud")
    text, stats = _complete(stopped_edges["1.0"], "spec")
    assert stats["mode"] == "spec" and stats["fallback"] is None, stats
    assert text == reference
    assert stats["edge_tokens"] == 0 and stats["cloud_tokens"] == N_TOKENS, stats
    assert stats["spec"]["drafted"] == 0 and stats["cloud_round_trips"] >= N_TOKENS - 1, stats
    text, stats = _complete(stopped_edges["0.5"], "spec")
    assert stats["fallback"] is None and text == reference, stats
    s = stats["spec"]
    assert 0 < s["accepted"] <= s["drafted"] and stats["edge_tokens"] == s["accepted"], stats
