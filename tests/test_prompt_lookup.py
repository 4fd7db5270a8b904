"""Prompt lookup: the context match, the λ fit, the mixture in the edge's sampler, and that the
export's calibration replays exactly what the edge's sampler decides."""

from __future__ import annotations

import random

import numpy as np
import pytest

from edge_runtime.sampling import Sampler, SamplingParams
from fogline.prompt_lookup import MAX_N, PromptLookup, continuation, fit_lambdas, mix


def _reference(ctx: list[int], max_n: int = MAX_N) -> tuple[int, int] | None:
    """Brute force: longest suffix first, most recent earlier occurrence first."""
    for n in range(max_n, 0, -1):
        if len(ctx) < n + 1:
            continue
        for j in range(len(ctx) - n - 1, -1, -1):
            if ctx[j:j + n] == ctx[len(ctx) - n:]:
                return ctx[j + n], n
    return None


def test_continuation_is_the_most_recent_longest_match():
    rng = random.Random(0)
    for _ in range(3000):
        vocab = rng.choice([2, 3, 5, 50])
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        assert continuation(ctx) == _reference(ctx), ctx
    # "the cat sat . the cat" -> "sat" (n = 2), not the later "cat" after a 1-token match
    assert continuation([1, 2, 3, 9, 1, 2]) == (3, 2)
    assert continuation([5, 6, 7, 8, 6, 7, 8, 5, 6, 7, 8]) == (6, 4)  # capped at MAX_N, most recent
    assert continuation([1, 2, 3]) is None and continuation([]) is None


def test_fit_recovers_the_likelihood_optimum():
    """Where the candidate is right a share r of the time and p_exit(true) is tiny, the best λ is ≈ r;
    where it is never right, 0; a length with no position gets 0."""
    rng = np.random.default_rng(0)
    n = 4000
    match_len = rng.choice([1, 2], size=n)
    right = np.where(match_len == 2, rng.random(n) < 0.7, False)
    fit = fit_lambdas(match_len, np.full(n, 1e-4), right)
    assert fit.lambdas[1] == pytest.approx(right[match_len == 2].mean(), abs=0.02)
    assert fit.lambdas[0] == 0.0 and fit.lambdas[2] == 0.0 and fit.lambdas[3] == 0.0
    assert len(fit.lambdas) == MAX_N


def test_manifest_entry_round_trips_and_bad_ones_are_refused():
    lk = PromptLookup((0.05, 0.3, 0.4, 0.7))
    assert PromptLookup.from_manifest(lk.to_manifest()) == lk
    for bad in (None, {}, {"lambdas": []}, {"lambdas": [0.2, 1.0]}, {"lambdas": [-0.1]}, {"lambdas": ["x"]},
                {"lambdas": [float("nan")]}):
        assert PromptLookup.from_manifest(bad) is None, bad
    assert lk.hint([4, 5, 6, 4, 5]) == (6, 0.3)
    assert PromptLookup((0.0, 0.0, 0.0, 0.0)).hint([4, 5, 6, 4, 5]) is None  # λ = 0 is no hint


def _logits(probs: dict[int, float], vocab: int = 16) -> np.ndarray:
    p = np.full(vocab, 1e-6)
    for t, v in probs.items():
        p[t] = v
    return np.log(p / p.sum()).astype(np.float32)


def test_greedy_sampler_takes_the_mixture_argmax_and_reports_its_confidence():
    greedy = Sampler(SamplingParams(temperature=0.0), 16)
    z = _logits({3: 0.4, 7: 0.3, 9: 0.3})
    p = np.exp(z.astype(np.float64)) / np.exp(z.astype(np.float64)).sum()
    # candidate 7 with λ 0.3: q(7) = 0.7*0.3 + 0.3 = 0.51 > q(3) = 0.28 -> 7, confidence 0.51
    c = greedy.choose(z, (), (7, 0.3))
    assert c.token == 7 and c.lookup and c.confidence == pytest.approx(0.7 * p[7] + 0.3, rel=1e-5)
    assert c.logprob == pytest.approx(np.log(p[7]), abs=1e-5)  # the exit head's own log-probability
    assert greedy.choose(z, (), (7, 0.1)).token == 7  # q(7) = 0.9*0.3 + 0.1 = 0.37 > q(3) = 0.36
    assert greedy.choose(z, (), (7, 0.05)).token == 3  # q(7) = 0.335 < q(3) = 0.38: a weak λ does not override
    same = greedy.choose(z, (), (3, 0.3))  # the candidate is the argmax: same token, more confident
    assert same.token == 3 and not same.lookup and same.confidence == pytest.approx(0.7 * p[3] + 0.3, rel=1e-5)
    plain = greedy.choose(z)
    assert plain.token == 3 and plain.confidence == pytest.approx(p[3], rel=1e-5)
    # a banned or masked candidate is no hint
    assert greedy.choose(z, (7,), (7, 0.9)).token == 3
    masked = z.copy()
    masked[7] = -np.inf
    assert greedy.choose(masked, (), (7, 0.9)).token == 3
    # penalties and logit_bias steer the tokens: no lookup under them
    for steer in (dict(repeat_penalty=1.3), dict(presence_penalty=0.5), dict(frequency_penalty=0.5),
                  dict(logit_bias={5: 1.0})):
        s = Sampler(SamplingParams(temperature=0.0, **steer), 16)
        assert not s.takes_lookup and s.choose(z, (), (7, 0.9)).token == 3, steer
    assert greedy.takes_lookup and Sampler(SamplingParams(temperature=0.7, top_k=1), 16).takes_lookup
    # sampling ignores the hint: draws follow the exit head (7 would be ~90% under the mixture)
    sampled = Sampler(SamplingParams(temperature=1.0, seed=3), 16)
    draws = np.array([sampled.choose(z, (), (7, 0.9)).token for _ in range(3000)])
    assert (draws == 7).mean() == pytest.approx(p[7], abs=0.04)


def test_calibration_replays_the_edge_sampler_exactly():
    """quantize.calibrate.with_lookup must give, position by position, the token correctness and
    confidence the edge's Sampler gives with the same candidate: one rule on both sides."""
    from quantize.calibrate import ExitStats, LookupFeatures, with_lookup

    rng = np.random.default_rng(1)
    lookup = PromptLookup((0.05, 0.3, 0.45, 0.7))
    vocab, n = 12, 600
    greedy = Sampler(SamplingParams(temperature=0.0), vocab)
    conf, correct, feats, want = [], [], [], []
    for _ in range(n):
        z = (rng.normal(size=vocab) * rng.choice([0.5, 2.0, 4.0])).astype(np.float32)
        p = np.exp(z.astype(np.float64) - z.max())
        p /= p.sum()
        true, cand, length = int(rng.integers(vocab)), int(rng.integers(vocab)), int(rng.integers(0, MAX_N + 1))
        argmax = int(np.argmax(z))
        conf.append(p[argmax])
        correct.append(argmax == true)
        feats.append((length, p[cand] if length else 0.0, cand == true, cand == argmax, p[true]))
        hint = (cand, lookup.lambdas[length - 1]) if length else None
        c = greedy.choose(z, (), hint)
        want.append((c.token == true, c.confidence))
    cols = list(zip(*feats))
    stats = ExitStats(confidence=np.asarray(conf), correct=np.asarray(correct), lengths=[n],
                      lookup=LookupFeatures(np.asarray(cols[0]), np.asarray(cols[1]), np.asarray(cols[2], dtype=bool),
                                            np.asarray(cols[3], dtype=bool), np.asarray(cols[4])))
    got = with_lookup(stats, lookup)
    assert list(got.correct) == [w[0] for w in want]
    assert got.confidence == pytest.approx([w[1] for w in want], rel=1e-4)
    assert got.correct.sum() != stats.correct.sum()  # the mixture did change tokens in this draw


def test_mix_is_the_argmax_of_the_mixture():
    for p_a, p_c, lam in ((0.6, 0.1, 0.3), (0.3, 0.25, 0.3), (0.5, 0.0, 0.5), (0.9, 0.05, 0.7)):
        tok, q = mix(1, p_a, (2, lam), p_c)
        qa, qc = (1 - lam) * p_a, (1 - lam) * p_c + lam
        assert (tok, q) == ((2, qc) if qc > qa else (1, qa))
