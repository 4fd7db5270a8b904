"""Sampling semantics and the text-side stop rules, on plain numpy (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.sampling import Sampler, SamplingParams, StopMatcher, Utf8Stream

V = 1000


def logits_from_probs(p: list[float], n: int = V) -> np.ndarray:
    out = np.full(n, -1e9, dtype=np.float32)
    out[: len(p)] = np.log(np.asarray(p, dtype=np.float64)).astype(np.float32)
    return out


def draws(params: SamplingParams, logits: np.ndarray, n: int = 3000) -> np.ndarray:
    s = Sampler(params, logits.shape[0])
    return np.array([s.choose(logits).token for _ in range(n)])


def test_greedy_logprob_and_confidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=V).astype(np.float32) * 3
    c = Sampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5), V).choose(logits)
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    assert c.token == int(np.argmax(logits)) and c.origin == "edge"
    assert c.logprob == pytest.approx(logp[c.token], abs=1e-5)
    assert c.confidence == pytest.approx(np.exp(logp.max()), rel=1e-5)
    assert [t for t, _ in c.top_logprobs] == list(np.argsort(-logits)[:5])
    assert [lp for _, lp in c.top_logprobs] == pytest.approx(sorted(logp, reverse=True)[:5], abs=1e-5)


def test_temperature_sampling_follows_the_distribution():
    probs = [0.5, 0.3, 0.2]
    got = np.bincount(draws(SamplingParams(temperature=1.0, seed=1), logits_from_probs(probs)), minlength=3)[:3]
    assert got.sum() == 3000
    np.testing.assert_allclose(got / 3000, probs, atol=0.04)
    # a low temperature sharpens it
    cold = np.bincount(draws(SamplingParams(temperature=0.2, seed=1), logits_from_probs(probs)), minlength=3)
    assert cold[0] / 3000 > 0.9


def test_top_p_keeps_the_nucleus_only():
    probs = [0.5, 0.3, 0.15, 0.05]
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=3), logits_from_probs(probs)).tolist())
    assert got == {0, 1}
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.85, seed=3), logits_from_probs(probs)).tolist())
    assert got == {0, 1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.0, seed=3), logits_from_probs(probs)).tolist()) == {0}


def test_top_p_looks_past_its_prefilter_on_a_flat_distribution():
    flat = np.zeros(V, dtype=np.float32)  # 256 best tokens hold only ~26 % of the mass
    got = draws(SamplingParams(temperature=1.0, top_p=0.9, seed=5), flat, 2000)
    assert len(set(got.tolist())) > 600  # far more than the 256-token prefilter


def test_top_k():
    probs = [0.4, 0.3, 0.2, 0.1]
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=2), logits_from_probs(probs)).tolist()) == {0, 1}
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, seed=2), logits_from_probs(probs)).tolist()) == {0}


def test_seed_reproduces_and_differs():
    logits = np.random.default_rng(9).normal(size=V).astype(np.float32)
    a = draws(SamplingParams(temperature=1.0, seed=42), logits, 50)
    b = draws(SamplingParams(temperature=1.0, seed=42), logits, 50)
    c = draws(SamplingParams(temperature=1.0, seed=43), logits, 50)
    assert (a == b).all() and (a != c).any()


def test_penalties_and_logit_bias():
    logits = np.zeros(V, dtype=np.float32)
    logits[7] = 1.0
    s = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.4, presence_penalty=0.3), V)
    assert s.choose(logits).token == 7
    s.observe(7)  # 1 - 0.4 - 0.3 = 0.3 > 0: still best
    assert s.choose(logits).token == 7
    s.observe(7)  # 1 - 0.8 - 0.3 < 0: every unseen token now beats it
    assert s.choose(logits).token != 7
    adj = s.adjusted(logits)
    assert adj[7] == pytest.approx(1.0 - 2 * 0.4 - 0.3) and logits[7] == 1.0  # the input is not modified
    banned = Sampler(SamplingParams(temperature=0.0, logit_bias={7: -100.0, 9: 5.0}), V).choose(logits)
    assert banned.token == 9
    # log-probabilities describe the model, not the bias
    assert banned.logprob == pytest.approx(float(logits[9] - np.log(np.exp(logits).sum())), abs=1e-5)


def test_banned_tokens_are_never_chosen():
    logits = logits_from_probs([0.9, 0.1])
    s = Sampler(SamplingParams(temperature=1.0, seed=0), V)
    assert all(s.choose(logits, banned=(0,)).token != 0 for _ in range(200))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab c\n", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=12),
       stops=st.lists(st.text(alphabet="ab c\n", min_size=1, max_size=4), min_size=1, max_size=4))
def test_stop_matcher_never_emits_a_stop_and_loses_nothing(text, cuts, stops):
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    m = StopMatcher(tuple(stops))
    out, hit = "", False
    for p in pieces:
        emitted, hit = m.push(p)
        out += emitted
        if hit:
            break
    # generation stops at the first piece that completes a stop string; the text is cut at the
    # earliest stop string in what was generated by then, however it was split into tokens
    so_far, expected = "", None
    for p in pieces:
        so_far += p
        hits = [i for i in (so_far.find(s) for s in stops) if i >= 0]
        if hits:
            expected = so_far[:min(hits)]
            break
    if expected is not None:
        assert hit and out == expected
    else:
        assert not hit and out + m.flush() == text
    assert not any(s in out for s in stops)


def test_utf8_stream_joins_split_characters():
    data = "é✓🙂".encode()
    u = Utf8Stream()
    got = "".join(u.push(data[i:i + 1]) for i in range(len(data))) + u.flush()
    assert got == "é✓🙂"
    u = Utf8Stream()
    assert u.push(b"\xf0\x9f") == "" and u.flush() == "\ufffd"  # a dangling partial char becomes U+FFFD
