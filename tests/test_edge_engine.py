"""The edge engine in-process, on real llama.cpp with the demo bundle: continuous
batching, h_K capture, token sources (including a deferred, cloud-like one),
cancellation, admission control."""

from __future__ import annotations

import queue
import random
import threading

import numpy as np
import pytest

from edge_runtime.config import load_config
from edge_runtime.engine import ExitStep, GenerationRequest, StreamEvent
from edge_runtime.errors import ApiError, ErrorKind
from edge_runtime.llama_backend import BatchRow, LlamaContext, prefill, ubatch_order
from edge_runtime.loader import EdgeRuntime, load_runtime
from edge_runtime.sampling import SamplingParams, TokenChoice

PARALLEL = 4
QUEUE = 2
CTX = 256
TEXTS = ["The quick brown fox", "Once upon a time in a land far away, there lived", "def square(x):",
         "Paris is the capital of"]


@pytest.fixture(scope="module")
def rt(demo_bundle) -> EdgeRuntime:
    cfg = load_config(env={}, overrides=dict(bundle=str(demo_bundle / "edge"), threads=1, parallel=PARALLEL,
                                             ctx_size=CTX, batch_size=48, queue_size=QUEUE, capture_hidden=True,
                                             verify_bundle=False))
    r = load_runtime(cfg)
    yield r
    r.close()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def collect(rt: EdgeRuntime, reqs: list[GenerationRequest]) -> dict[str, list[StreamEvent]]:
    """Submit all at once, wait for every finish event."""
    q: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
    for r in reqs:
        rt.engine.submit(r, q.put)
    out: dict[str, list[StreamEvent]] = {r.request_id: [] for r in reqs}
    done = 0
    while done < len(reqs):
        ev = q.get(timeout=300)
        out[ev.request_id].append(ev)
        done += ev.finish_reason is not None
    return out


def tokens_of(events: list[StreamEvent]) -> list[int]:
    return [e.choice.token for e in events if e.choice is not None]


def prompts(rt: EdgeRuntime) -> list[list[int]]:
    return [rt.model.tokenize(t) for t in TEXTS]


def test_concurrent_requests_equal_solo_and_share_steps(rt):
    ps = prompts(rt)
    solo, steps_solo = [], 0
    for i, p in enumerate(ps):
        s0 = rt.engine.steps
        solo.append(tokens_of(collect(rt, [GenerationRequest(f"s{i}", p, greedy(16))])[f"s{i}"]))
        steps_solo += rt.engine.steps - s0
    s0 = rt.engine.steps
    res = collect(rt, [GenerationRequest(f"c{i}", p, greedy(16)) for i, p in enumerate(ps)])
    steps_together = rt.engine.steps - s0
    assert [tokens_of(res[f"c{i}"]) for i in range(len(ps))] == solo
    assert all(len(t) == 16 for t in solo)
    assert steps_together <= steps_solo / 2, (steps_together, steps_solo)
    fin = res["c0"][-1]
    assert fin.finish_reason == "length" and fin.completion_tokens == 16 and fin.prompt_tokens == len(ps[0])
    assert fin.stats.edge_tokens == 16 and fin.stats.mode == "edge"


class Recorder:
    """A token source that decides like the edge but keeps what a cloud client would upload."""

    def __init__(self, rt: EdgeRuntime) -> None:
        self.rt = rt
        self.hidden: dict[str, np.ndarray] = {}
        self.tokens: dict[str, list[int]] = {}
        self.released: list[str] = []

    def decide(self, step: ExitStep) -> TokenChoice:
        assert step.hidden is not None and step.hidden.n == step.position
        self.hidden[step.request.request_id] = step.hidden.view().copy()
        self.tokens[step.request.request_id] = list(step.tokens)
        return step.sampler.choose(step.logits)

    def release(self, request: GenerationRequest) -> None:
        self.released.append(request.request_id)


def test_hidden_states_of_every_position_match_a_solo_prefill(rt):
    rec = Recorder(rt)
    rt.engine.register_source("collab", rec)
    ps = prompts(rt)
    reqs = [GenerationRequest(f"h{i}", p, greedy(6), mode="collab", capture_hidden=True) for i, p in enumerate(ps[:3])]
    # a request without capture shares the batches
    reqs.append(GenerationRequest("plain", ps[3], greedy(6)))
    res = collect(rt, reqs)
    assert sorted(rec.released) == ["h0", "h1", "h2"]
    for r in reqs[:3]:
        fin = res[r.request_id][-1]
        assert fin.stats.mode == "collab" and fin.stats.fallback is None
        toks = rec.tokens[r.request_id]
        hid = rec.hidden[r.request_id]
        assert hid.dtype == np.float16 and hid.shape == (len(toks), rt.model.n_embd)
        ref_ctx = LlamaContext(rt.model, n_ctx=CTX, n_batch=CTX, n_threads=1, tap_layer=rt.manifest.split - 1)
        try:
            ref = prefill(ref_ctx, toks, capture_hidden=True).hidden
        finally:
            ref_ctx.close()
        np.testing.assert_array_equal(hid, ref.astype(np.float16))


def test_a_prompt_sharing_a_finished_prefix_skips_its_prefill_and_matches(rt):
    """A second chat turn (same system prompt and history) reuses the slot's KV and h_K rows;
    its tokens and uploaded h_K equal a cold run's, and a prompt that diverges reuses only the
    common part."""
    rec = Recorder(rt)
    rt.engine.register_source("collab", rec)
    base = prompts(rt)[1]
    longer = base + rt.model.tokenize(" and the story goes on")
    first = collect(rt, [GenerationRequest("p1", base, greedy(5), mode="collab", capture_hidden=True)])["p1"]
    before = rt.engine.prefix_reused
    second = collect(rt, [GenerationRequest("p2", longer, greedy(5), mode="collab", capture_hidden=True)])["p2"]
    assert rt.engine.prefix_reused - before >= len(base)  # the prompt and some of p1's completion
    assert first[-1].finish_reason == second[-1].finish_reason == "length"
    ref_ctx = LlamaContext(rt.model, n_ctx=CTX, n_batch=CTX, n_threads=1, tap_layer=rt.manifest.split - 1)
    try:
        ref = prefill(ref_ctx, rec.tokens["p2"], capture_hidden=True).hidden
    finally:
        ref_ctx.close()
    np.testing.assert_array_equal(rec.hidden["p2"], ref.astype(np.float16))
    # its first token equals a cold prefill's greedy choice in a context of its own
    cold = LlamaContext(rt.model, n_ctx=CTX, n_batch=CTX, n_threads=1)
    try:
        res = prefill(cold, longer, capture_hidden=False)
        assert int(np.argmax(res.logits[-1])) == tokens_of(second)[0]
    finally:
        cold.close()
    before = rt.engine.prefix_reused
    diverged = base[:3] + rt.model.tokenize(" something else entirely")
    collect(rt, [GenerationRequest("p3", diverged, greedy(2))])
    assert rt.engine.prefix_reused - before == 3

@pytest.mark.parametrize("layer, via", [(19, "callback"), (12, "layer_input")])
def test_hidden_rows_come_back_in_batch_order_across_micro_batches(rt, layer, via):
    """Random mixed batches over 3 sequences: every h_K row lands where its batch row was,
    whether the eval callback or llama.cpp's layer-input copy reads it (checked against
    the callback tap decoding each sequence alone)."""
    ps = prompts(rt)[:3]
    ctx = LlamaContext(rt.model, n_ctx=3 * CTX, n_batch=16, n_seq=3, n_threads=1, tap_layer=layer,
                       hidden_via=via)
    assert (ctx.tap is None) == (via == "layer_input")
    refs = []
    for p in ps:
        c = LlamaContext(rt.model, n_ctx=CTX, n_batch=CTX, n_threads=1, tap_layer=layer)
        refs.append(prefill(c, p, capture_hidden=True).hidden)
        c.close()
    rng = random.Random(7)
    pos = [0, 0, 0]
    n_multi = 0
    try:
        while any(pos[s] < len(ps[s]) for s in range(3)):
            seqs = [s for s in range(3) if pos[s] < len(ps[s])]
            rng.shuffle(seqs)
            rows = []
            for s in seqs:
                n = rng.randint(1, len(ps[s]) - pos[s])
                rows += [BatchRow(ps[s][pos[s] + i], pos[s] + i, s, False) for i in range(n)]
            rows = rows[:16]
            rows[-1].output = True
            n_multi += len(ubatch_order(rows, 16)[1]) > 1
            h = ctx.decode(rows, capture_hidden=True).hidden
            for j, r in enumerate(rows):
                np.testing.assert_array_equal(h[j], refs[r.seq][r.pos])
            for r in rows:
                pos[r.seq] = max(pos[r.seq], r.pos + 1)
    finally:
        ctx.close()
    assert n_multi > 0  # the test did exercise split batches


class DeferredCloud:
    """Stands in for a cloud-backed source: answers later, from another thread."""

    def __init__(self, rt: EdgeRuntime) -> None:
        self.rt = rt
        self.threads: list[threading.Thread] = []

    def decide(self, step: ExitStep) -> None:
        logits = step.logits.copy()
        rid = step.request.request_id
        step.stats.cloud_round_trips += 1
        step.stats.bytes_up += 2 * self.rt.model.n_embd

        def answer() -> None:
            tok = int(np.argmax(logits))
            self.rt.engine.deliver(rid, TokenChoice(token=tok, logprob=0.0, confidence=1.0, origin="cloud"))

        t = threading.Timer(0.01, answer)
        self.threads.append(t)
        t.start()
        return None

    def release(self, request: GenerationRequest) -> None:
        pass


def test_a_deferred_token_source_parks_only_its_sequence(rt):
    ps = prompts(rt)
    rt.engine.register_source("cloud", DeferredCloud(rt))
    expect = tokens_of(collect(rt, [GenerationRequest("e", ps[1], greedy(8))])["e"])
    res = collect(rt, [GenerationRequest("cl", ps[1], greedy(8), mode="cloud"),
                       GenerationRequest("ed", ps[0], greedy(30))])
    assert tokens_of(res["cl"]) == expect
    fin = res["cl"][-1]
    assert fin.stats.mode == "cloud" and fin.stats.cloud_tokens == 8 and fin.stats.edge_tokens == 0
    assert fin.stats.cloud_round_trips == 8 and fin.stats.bytes_up == 8 * 2 * rt.model.n_embd
    assert res["ed"][-1].finish_reason == "length" and res["ed"][-1].stats.edge_tokens == 30
    assert all(e.choice.origin == "cloud" for e in res["cl"] if e.choice is not None)


def test_cancel_stops_generation_and_frees_the_kv_sequence(rt):
    q: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
    rt.engine.submit(GenerationRequest("long", prompts(rt)[0], greedy(200, ignore_eos=True)), q.put)
    n = 0
    while n < 3:
        n += q.get(timeout=60).choice is not None
    rt.engine.cancel("long")
    while (ev := q.get(timeout=60)).finish_reason is None:
        pass
    assert ev.finish_reason == "cancelled" and ev.completion_tokens < 200
    assert rt.engine.n_running == 0
    # a cancelled request leaves nothing in the KV cache: each slot holds only the prefix it keeps
    # for reuse from an earlier finished request
    assert [rt.engine.kv_positions(s) for s in range(PARALLEL)] == [rt.engine.cached_prefix(s) - 1
                                                                    for s in range(PARALLEL)]
    # and the slot is usable again
    fin = collect(rt, [GenerationRequest("after", prompts(rt)[0], greedy(2))])["after"][-1]
    assert fin.finish_reason == "length"


def test_full_queue_is_rate_limited_and_cancels_nobody(rt):
    p = prompts(rt)[2]
    q: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
    n = PARALLEL + QUEUE
    for i in range(n):
        rt.engine.submit(GenerationRequest(f"q{i}", p, greedy(12, ignore_eos=True)), q.put)
    with pytest.raises(ApiError) as e:
        rt.engine.submit(GenerationRequest("extra", p, greedy(12)), q.put)
    assert e.value.kind is ErrorKind.RATE_LIMITED and e.value.retry_after is not None
    fins = []
    while len(fins) < n:
        ev = q.get(timeout=300)
        if ev.finish_reason is not None:
            fins.append(ev)
    assert all(f.finish_reason == "length" and f.completion_tokens == 12 for f in fins)


def test_context_overflow_names_the_numbers(rt):
    with pytest.raises(ApiError) as e:
        rt.engine.submit(GenerationRequest("big", [1] * (CTX + 5), greedy(4)), lambda ev: None)
    assert e.value.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED and str(CTX) in str(e.value) and str(CTX + 5) in str(e.value)
    with pytest.raises(ApiError) as e:
        rt.engine.submit(GenerationRequest("big2", [1] * 100, greedy(CTX)), lambda ev: None)
    assert "100 in the prompt" in str(e.value) and f"{CTX} for the completion" in str(e.value)
    # without max_tokens a request may use the rest of its context
    fin = collect(rt, [GenerationRequest("rest", [1] * (CTX - 3), SamplingParams(temperature=0, ignore_eos=True))])
    assert fin["rest"][-1].finish_reason == "length" and fin["rest"][-1].completion_tokens == 3


def test_end_of_generation_token_stops_unless_ignored(rt):
    eos = rt.model.eos
    p = prompts(rt)[0]
    res = collect(rt, [GenerationRequest("eos", p, greedy(10, logit_bias={eos: 100.0})),
                       GenerationRequest("noeos", p, greedy(10, logit_bias={eos: 100.0}, ignore_eos=True))])
    fin = res["eos"][-1]
    assert fin.finish_reason == "stop" and fin.completion_tokens == 1
    assert "".join(e.text for e in res["eos"]) == ""
    assert res["noeos"][-1].finish_reason == "length" and eos not in tokens_of(res["noeos"])


def test_stop_strings_are_never_emitted(rt):
    p = prompts(rt)[1]
    full = collect(rt, [GenerationRequest("f", p, greedy(20))])["f"]
    text = "".join(e.text for e in full)
    stop = text[5:8]
    res = collect(rt, [GenerationRequest("s", p, greedy(20, stop=(stop, "never-there")))])["s"]
    got = "".join(e.text for e in res)
    assert res[-1].finish_reason == "stop" and got == text[:text.find(stop)] and stop not in got
