"""Prompt lookup on the edge: the exit head's distribution mixed with a copy of the context.

Answers repeat their context: a rewrite or a translation copies names and phrases from the
prompt, code repeats identifiers, lists repeat their own structure, and a small model's
greedy text repeats itself. Prompt lookup decoding (Saxena 2023; REST, He et al. 2024)
drafts such tokens for free: find the most recent earlier occurrence of the longest suffix
(1..MAX_N tokens) of the text so far and propose the token that followed it.

fogline does not let the copy override the exit head; it mixes them. With the candidate c
found at match length n, the edge's greedy distribution is

    q = (1 - λ_n) · p_exit + λ_n · δ_c

where λ_n is fitted at export by maximum likelihood of the full model's tokens on the
export's held-out answers (`fit_lambdas`), and stored in the edge manifest
(`calibration.prompt_lookup`). The edge emits / drafts argmax q, and q's max probability is
the token's confidence — what collab's τ and spec's confidence stop compare against, and
what the export's τ calibration measures. Where nothing matches, q is p_exit.

Only greedy decoding uses it (a deterministic argmax over q); sampled requests draw from the
exit head's own distribution as before. No model runs for it: one vectorised scan of the
token ids per position, and h_K is untouched.

Torch-free: the edge imports it, and so does the export's calibration (one implementation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_N = 4  # longest suffix matched; longer matches share λ_MAX_N


def continuation(tokens: Sequence[int] | np.ndarray, max_n: int = MAX_N) -> tuple[int, int] | None:
    """(token that followed the most recent earlier occurrence of the longest suffix of `tokens`,
    that suffix's length n in 1..max_n), or None when even the last token never occurred before."""
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    if size < 2:
        return None
    ends = np.flatnonzero(arr[:-1] == arr[-1])  # j: arr[j] == last and arr[j + 1] exists
    if not len(ends):
        return None
    n, best = 1, int(ends[-1])
    for k in range(1, max_n):  # extend the match one token further back
        ends = ends[ends >= k]
        ends = ends[arr[ends - k] == arr[size - 1 - k]]
        if not len(ends):
            break
        n, best = k + 1, int(ends[-1])
    return int(arr[best + 1]), n


@dataclass(frozen=True)
class PromptLookup:
    """The fitted mixture weights: lambdas[n - 1] is λ_n for a match of length n (1..MAX_N)."""

    lambdas: tuple[float, ...]

    @property
    def max_n(self) -> int:
        return len(self.lambdas)

    def hint(self, tokens: Sequence[int] | np.ndarray) -> tuple[int, float] | None:
        """(candidate token, λ) for the position after `tokens`; None when nothing matches or λ = 0."""
        found = continuation(tokens, self.max_n)
        if found is None:
            return None
        lam = self.lambdas[found[1] - 1]
        return (found[0], lam) if lam > 0 else None

    def to_manifest(self) -> dict[str, object]:
        return {"max_n": self.max_n, "lambdas": [round(x, 4) for x in self.lambdas]}

    @staticmethod
    def from_manifest(entry: object) -> PromptLookup | None:
        """The manifest's `calibration.prompt_lookup`, or None where the bundle has none (an
        older export) or it is malformed (the caller logs that)."""
        if not isinstance(entry, dict):
            return None
        lams = entry.get("lambdas")
        if not isinstance(lams, list) or not lams or not all(isinstance(x, (int, float)) and 0 <= x < 1
                                                              and math.isfinite(x) for x in lams):
            return None
        return PromptLookup(tuple(float(x) for x in lams))


def mix(argmax: int, p_argmax: float, hint: tuple[int, float] | None, p_candidate: float) -> tuple[int, float]:
    """argmax of q = (1 - λ) p_exit + λ δ_c and its probability (the token's confidence).
    `p_candidate` is p_exit(c); a candidate the caller may not emit (masked, banned) is no hint."""
    if hint is None:
        return argmax, p_argmax
    c, lam = hint
    if c == argmax:
        return argmax, (1 - lam) * p_argmax + lam
    q_c, q_a = (1 - lam) * p_candidate + lam, (1 - lam) * p_argmax
    return (c, q_c) if q_c > q_a else (argmax, q_a)


def fit_lambdas(match_len: np.ndarray, p_true: np.ndarray, candidate_true: np.ndarray,
                max_n: int = MAX_N) -> PromptLookup:
    """λ_n maximising the mean log q(true token) over the positions whose match length is n.

    match_len[i]: n at position i (0: no match); p_true[i]: p_exit(true token);
    candidate_true[i]: whether the candidate is the true token. A grid of step 0.01 (the
    objective is concave in λ, one maximum), λ_n = 0 where no position has that length."""
    grid = np.arange(0, 96) / 100.0
    lams = []
    for n in range(1, max_n + 1):
        sel = match_len == n
        if not sel.any():
            lams.append(0.0)
            continue
        p, hit = p_true[sel][:, None], candidate_true[sel][:, None].astype(np.float64)
        ll = np.log((1 - grid[None, :]) * p + grid[None, :] * hit + 1e-12).mean(0)
        lams.append(float(grid[int(np.argmax(ll))]))
    return PromptLookup(tuple(lams))
