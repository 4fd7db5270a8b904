"""Turning deep-layer logits into answers: pick a token, or judge a draft.

Runs in the model worker thread, on the rows the batcher returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fogline.wire.protocol import Sampling

_MASK64 = (1 << 63) - 1


def allowed_tokens(bitmasks: list[bytes], vocab: int) -> Tensor:
    """Structured output: the edge's bitmasks (one bit per token, fogline/constraint.py) -> bool [n, vocab]."""
    bits = np.unpackbits(np.frombuffer(b"".join(bitmasks), np.uint8).reshape(len(bitmasks), -1), axis=1,
                         bitorder="little")[:, :vocab]
    return torch.from_numpy(bits.astype(bool))


def masked(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """[n, V] logits with the tokens a grammar forbids at -inf (before any choice or judgement),
    so the cloud picks, and judges each drafted prefix, among the same tokens the edge could."""
    if allowed is None:
        return logits
    return logits.float().masked_fill(~allowed[:, :logits.shape[-1]], float("-inf"))


def _generator(sampling: Sampling, position: int) -> torch.Generator | None:
    """A seeded request gives the same pick at the same position, whatever the batch."""
    if sampling.seed is None:
        return None
    g = torch.Generator()
    g.manual_seed((sampling.seed * 0x9E3779B97F4A7C15 + position) & _MASK64)
    return g


def target_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """[V] logits -> the distribution sampling draws from (temperature, top-k, top-p applied)."""
    z = logits.float() / max(sampling.temperature, 1e-6)
    if 0 < sampling.top_k < z.shape[-1]:
        kth = torch.topk(z, sampling.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if sampling.top_p < 1.0:
        sp, idx = torch.sort(p, descending=True)
        keep = torch.cumsum(sp, 0) - sp < sampling.top_p  # always keeps the top token
        p = torch.zeros_like(p).scatter_(0, idx[keep], sp[keep])
        p = p / p.sum()
    return p


def pick(logits: Tensor, sampling: Sampling, position: int) -> int:
    """The token for `position` from its [V] logits."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(target_probs(logits, sampling), 1, generator=_generator(sampling, position)))


def top_probs(logits: Tensor, n: int) -> tuple[tuple[int, float], ...]:
    """The model's own n most likely tokens (temperature 1), as (id, prob)."""
    if n <= 0:
        return ()
    p = torch.softmax(logits.float(), dim=-1)
    v, i = torch.topk(p, min(n, p.shape[-1]))
    return tuple((int(a), float(b)) for a, b in zip(i.tolist(), v.tolist()))


def token_logprobs(logits: Tensor, tokens: list[int], n: int
                   ) -> tuple[tuple[float, ...], tuple[tuple[tuple[int, float], ...], ...]]:
    """Rows [m, V] and the m tokens they chose -> each token's log-probability and each row's n
    most likely (id, logprob), under the model's own distribution (temperature 1, no cuts):
    the cloud's own numbers for OpenAI's `logprobs` / `top_logprobs`."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
    chosen = tuple(float(x) for x in lp.gather(1, idx).squeeze(1).tolist())
    if n <= 0:
        return chosen, tuple(() for _ in tokens)
    v, i = torch.topk(lp, min(n, lp.shape[-1]), dim=-1)
    tops = tuple(tuple((int(a), float(b)) for a, b in zip(ri, rv)) for ri, rv in zip(i.tolist(), v.tolist()))
    return chosen, tops


@dataclass(frozen=True)
class Judgement:
    accepted: int  # leading drafts kept
    token: int  # the cloud's token for the position after them


def judge(logits: Tensor, draft: tuple[int, ...], sampling: Sampling, start: int,
          draft_probs: tuple[tuple[tuple[int, float], ...], ...] | None = None) -> Judgement:
    """Verify drafts. logits: [n, V], row i predicts position start+i+1; len(draft) == n-1.

    Greedy: accept while the draft equals the argmax. Sampled: standard speculative
    sampling (accept d with prob min(1, p(d)/q(d)); on rejection draw from
    norm(max(0, p - q))). `draft_probs[i]` is the whole support of the q the edge drew
    draft[i] from (the edge draws from exactly that sparse q, see edge_runtime/sampling.py
    `Sampler.draft`), so q is 0 elsewhere and both rules are exact; the protocol guarantees
    it holds the draft token itself. Without it q is a point mass on the draft (a
    deterministic drafter), which is exact too.
    """
    n = logits.shape[0]
    if sampling.greedy:
        choice = torch.argmax(logits, dim=-1).tolist()
        a = 0
        while a < n - 1 and draft[a] == choice[a]:
            a += 1
        return Judgement(a, int(choice[a]))
    for i, d in enumerate(draft):
        p = target_probs(logits[i], sampling)
        if d >= p.shape[0]:  # not even a token of this vocabulary: reject, sample from p
            return Judgement(i, pick(logits[i], sampling, start + i + 1))
        q = torch.zeros_like(p)
        if draft_probs is not None:
            for tok, prob in draft_probs[i]:
                if tok < q.shape[0]:
                    q[tok] = prob
        else:
            q[d] = 1.0
        qd = float(q[d])
        g = _generator(sampling, start + i + 1)
        u = float(torch.rand((), generator=g)) if g is not None else float(torch.rand(()))
        if qd > 0 and u < min(1.0, float(p[d]) / qd):
            continue
        residual = torch.clamp(p - q, min=0.0)
        residual = residual / residual.sum() if float(residual.sum()) > 0 else p
        return Judgement(i, int(torch.multinomial(residual, 1, generator=g)))
    return Judgement(n - 1, pick(logits[n - 1], sampling, start + n))
