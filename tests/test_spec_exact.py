"""Spec-mode sampling is distributed as the exported split model, as cloud-mode sampling is.

Real parts, driven in-process: llama.cpp runs the edge GGUF (exit-head logits, h_K), the
cloud's deep shard runs in torch (`load_bundle_model`), drafts come from the edge sampler's
`Sampler.draft` (the q that travels in the verify frame) and the cloud's own `judge` settles
them. The reference p is the deep model's own distribution (`target_probs`), computed exactly.
Thousands of seeded draws per case; the fit is a chi-square over bins with >= 5 expected
draws (the rest pooled), bounded at df + 5·sqrt(2·df) (about p < 1e-4), and spec must fit
about as well as cloud mode's draws do.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest

from tests.conftest import DEMO_SPLIT

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

N_ONE = 4000  # draws at one position
N_SEQ = 3000  # draws of 2-token sequences


def chi2(counts: dict, probs: dict, n: int) -> tuple[float, int, float]:
    """(chi-square, degrees of freedom, total variation) of draws against exact probabilities."""
    keys = set(probs) | set(counts)
    big = [k for k in keys if probs.get(k, 0.0) * n >= 5]
    stat, obs_rest, exp_rest = 0.0, 0, 0.0
    for k in keys:
        o, e = counts.get(k, 0), probs.get(k, 0.0) * n
        if k in big:
            stat += (o - e) ** 2 / e
        else:
            obs_rest, exp_rest = obs_rest + o, exp_rest + e
    df = len(big) - 1
    if exp_rest >= 5:
        stat += (obs_rest - exp_rest) ** 2 / exp_rest
        df += 1
    elif obs_rest > 0:
        stat += obs_rest ** 2 / max(exp_rest, 1.0)  # draws where almost none were expected
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in keys)
    return stat, max(df, 1), tv


def bound(df: int) -> float:
    return df + 5 * math.sqrt(2 * df)


class Split:
    """The exported split model at one prompt: edge exit-head logits and cloud p per prefix."""

    def __init__(self, bundle, prompt: list[int]) -> None:
        import torch

        from cloud_runtime.config import CloudConfig
        from cloud_runtime.server import load_bundle_model
        from edge_runtime.llama_backend import LlamaContext, LlamaModel

        self.torch = torch
        self.prompt = prompt
        self.model = LlamaModel(bundle / "edge" / "edge.gguf")
        self.ctx = LlamaContext(self.model, n_ctx=256, n_batch=128, n_seq=1, n_threads=1, tap_layer=DEMO_SPLIT - 1)
        _, self.deep = load_bundle_model(CloudConfig(bundle=bundle / "cloud", threads=1))
        self.edge_logits = lru_cache(maxsize=None)(self._edge)
        self.deep_logits = lru_cache(maxsize=None)(self._deep)
        self._h: dict[tuple[int, ...], np.ndarray] = {}

    def _run_edge(self, prefix: tuple[int, ...]) -> None:
        from edge_runtime.llama_backend import prefill

        self.ctx.remove(0)
        res = prefill(self.ctx, self.prompt + list(prefix), seq=0, start=0, capture_hidden=True)
        self._h[prefix] = res.hidden.copy()
        self._last = (prefix, res.logits[-1].astype(np.float32).copy())

    def _edge(self, prefix: tuple[int, ...]) -> np.ndarray:
        self._run_edge(prefix)
        return self._last[1]

    def _deep(self, prefix: tuple[int, ...]):
        """[V] deep logits predicting the token after prompt + prefix (h_K from the edge)."""
        from cloud_runtime.deep_model import Segment

        if prefix not in self._h:
            self._run_edge(prefix)
        cache = self.deep.new_cache()
        normed = self.deep.forward_ragged([Segment(self.torch.from_numpy(self._h[prefix]), cache, 0)])
        return self.deep.logits(normed[-1:])[0]

    @property
    def position(self) -> int:
        return len(self.prompt)  # the first generated token's position


def _spec_tokens(split: Split, n_tokens: int, seed: int, temperature: float, top_k: int,
                 width: int | None = None) -> tuple[int, ...]:
    """The first `n_tokens` of a spec-mode generation: blocks of drafts verified by `judge`.
    width=None: the shipped scheme (Sampler.draft, DRAFT_TOP); an int: the old scheme (draft
    from the full exit-head distribution, send only its top `width`, not renormalised)."""
    import torch

    from cloud_runtime.sampling import judge
    from edge_runtime.cloud_modes import DRAFT_TOP
    from edge_runtime.sampling import Sampler, SamplingParams
    from fogline.wire.protocol import Sampling

    params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
    sampler = Sampler(params, split.model.n_vocab)
    sampling = Sampling(temperature=temperature, top_k=top_k, seed=seed)
    out: list[int] = []
    while len(out) < n_tokens:
        prefix = tuple(out)
        drafts: list[int] = []
        qs = []
        for _ in range(n_tokens - len(out)):
            lg = split.edge_logits(prefix + tuple(drafts))
            if width is None:
                choice, q = sampler.draft(lg, (), DRAFT_TOP)
                drafts.append(choice.token)
            else:
                drafts.append(sampler.choose(lg).token)
                z = sampler.adjusted(lg).astype(np.float64) / temperature
                top = np.argpartition(-z, width)[:width]
                e = np.exp(z - z.max())
                q = tuple((int(t), float(x)) for t, x in zip(top, e[top] / e.sum()))
                if drafts[-1] not in dict(q):
                    q = q + ((drafts[-1], 0.0),)  # the old cloud: q(d) = 0, always rejected
            qs.append(q)
        rows = [split.deep_logits(prefix + tuple(drafts[:j])) for j in range(len(drafts))]
        rows.append(rows[-1])  # the bonus row: its token lies past n_tokens
        j = judge(torch.stack(rows), tuple(drafts), sampling, split.position + len(prefix) - 1, tuple(qs))
        out += drafts[:j.accepted] + [j.token]
    return tuple(out[:n_tokens])


def _cloud_tokens(split: Split, n_tokens: int, seed: int, temperature: float, top_k: int) -> tuple[int, ...]:
    from cloud_runtime.sampling import pick
    from fogline.wire.protocol import Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, seed=seed)
    out: list[int] = []
    for i in range(n_tokens):
        out.append(pick(split.deep_logits(tuple(out)), sampling, split.position + i))
    return tuple(out)


def _exact(split: Split, n_tokens: int, temperature: float, top_k: int, floor: float = 1e-7) -> dict:
    """The split model's exact distribution over the first n_tokens (support above `floor`)."""
    from cloud_runtime.sampling import target_probs
    from fogline.wire.protocol import Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k)
    dist = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for prefix, pr in dist.items():
            p = target_probs(split.deep_logits(prefix), sampling).numpy()
            for t in np.nonzero(p * pr > floor)[0]:
                nxt[prefix + (int(t),)] = pr * float(p[t])
        dist = nxt
    return dist


@pytest.fixture(scope="module")
def split(demo_bundle, chat_prompts):
    """The default (Q8_0) export: spec must be exact against *its* split model."""
    return Split(demo_bundle, chat_prompts[1])


def _counts(draws) -> dict:
    out: dict = {}
    for d in draws:
        out[d] = out.get(d, 0) + 1
    return out


def test_spec_sampling_matches_the_split_model_at_one_position(split):
    T, k = 1.0, 0
    exact = _exact(split, 1, T, k)
    spec = _counts(_spec_tokens(split, 1, s, T, k) for s in range(N_ONE))
    cloud = _counts(_cloud_tokens(split, 1, s, T, k) for s in range(N_ONE))
    (c_s, df_s, tv_s), (c_c, df_c, tv_c) = chi2(spec, exact, N_ONE), chi2(cloud, exact, N_ONE)
    print(f"one position, T={T}: spec chi2={c_s:.1f} df={df_s} tv={tv_s:.4f}; "
          f"cloud chi2={c_c:.1f} df={df_c} tv={tv_c:.4f}")
    assert c_c < bound(df_c)
    assert c_s < bound(df_s)
    assert tv_s < tv_c + 0.03


def test_spec_sampling_matches_the_split_model_over_two_token_sequences(split):
    T, k = 0.8, 4
    exact = _exact(split, 2, T, k)
    spec = _counts(_spec_tokens(split, 2, s, T, k) for s in range(N_SEQ))
    cloud = _counts(_cloud_tokens(split, 2, s, T, k) for s in range(N_SEQ))
    (c_s, df_s, tv_s), (c_c, df_c, tv_c) = chi2(spec, exact, N_SEQ), chi2(cloud, exact, N_SEQ)
    print(f"2-token sequences, T={T} top_k={k}: spec chi2={c_s:.1f} df={df_s} tv={tv_s:.4f}; "
          f"cloud chi2={c_c:.1f} df={df_c} tv={tv_c:.4f}")
    assert c_c < bound(df_c)
    assert c_s < bound(df_s)
    assert tv_s < tv_c + 0.03
