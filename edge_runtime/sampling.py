"""Token choice with OpenAI's sampling semantics, plus the text-side stop rules.

A `Sampler` belongs to one request: it owns the request's random generator
(so `seed` reproduces a completion whatever else is batched with it) and the
counts the presence/frequency penalties need. It turns one row of logits into a
`TokenChoice` that also carries what every token source needs to decide and
report: the chosen token's log-probability and the distribution's confidence.

Log-probabilities (`logprobs`, `top_logprobs`, `confidence`) are those of the
model's own distribution, before penalties, logit_bias, temperature and
truncation (what vLLM reports by default): they describe the model, not the
dice. With a prompt-lookup hint (greedy only, `fogline.prompt_lookup`), the token
and its `confidence` are the lookup mixture's; the log-probabilities stay the
exit head's.
"""

from __future__ import annotations

import codecs
import collections
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from fogline.prompt_lookup import mix

MAX_TOP_LOGPROBS = 20
# top_p first looks at this many best tokens; only if they hold less than top_p
# of the mass does it sort the whole vocabulary.
_TOP_P_PREFILTER = 256


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding parameters, already validated by the API layer."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off (an extension; OpenAI has no top_k)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # llama.cpp's repeat penalty (the Ollama API's `repeat_penalty`): a token among the last
    # `repeat_last_n` completion tokens has its logit divided by it (multiplied when negative)
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    max_tokens: int | None = None  # None: until the context is full
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # an extension for benchmarks: never stop on end-of-generation tokens


@dataclass(frozen=True)
class TokenChoice:
    """A token picked for one position, and by whom."""

    token: int
    # log p(token) under the distribution of whoever produced it (edge exit head, or the
    # cloud's deep layers); None where no value is known (reported as null, never 0.0)
    logprob: float | None
    confidence: float  # max probability of that distribution
    top_logprobs: tuple[tuple[int, float], ...] = ()
    origin: str = "edge"  # "edge" (exit head), "cloud" (deep layers), "draft" (an edge draft the cloud accepted)
    lookup: bool = False  # the edge's greedy token is the prompt-lookup candidate, not the exit head's argmax


def log_normalizer(logits: np.ndarray) -> tuple[float, float]:
    """(max logit, log-sum-exp) of one row: enough for any log-probability and the confidence."""
    m = float(logits.max())
    return m, m + float(np.log(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64)))


class Sampler:
    """Stateful per-request sampler (penalty counts and random generator)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.params = params
        self.n_vocab = n_vocab
        self.rng = np.random.default_rng(params.seed)
        self._counts: dict[int, int] = {}
        self._recent: collections.deque[int] = collections.deque(maxlen=max(params.repeat_last_n, 0))
        self._bias_idx = np.fromiter((int(k) for k in params.logit_bias), dtype=np.int64)
        self._bias_val = np.fromiter((float(v) for v in params.logit_bias.values()), dtype=np.float32)

    @property
    def takes_lookup(self) -> bool:
        """Whether a prompt-lookup hint applies: plain greedy decoding only. Sampling draws from the
        exit head, and penalties and logit_bias are a request to steer the tokens (a repeat penalty
        asks for the opposite of copying the context), which the fitted mixture does not model."""
        p = self.params
        return ((p.temperature == 0.0 or p.top_k == 1) and not p.presence_penalty and not p.frequency_penalty
                and p.repeat_penalty == 1.0 and not p.logit_bias)

    def observe(self, token: int) -> None:
        """Record a token of the completion (penalties count completion tokens only)."""
        self._counts[token] = self._counts.get(token, 0) + 1
        self._recent.append(token)

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """Logits after logit_bias, presence/frequency and repeat penalties (a copy only when needed)."""
        p = self.params
        penal = (p.presence_penalty or p.frequency_penalty) and self._counts
        repeat = p.repeat_penalty != 1.0 and self._recent
        if not len(self._bias_idx) and not penal and not repeat:
            return logits
        out = logits.astype(np.float32, copy=True)
        if len(self._bias_idx):
            out[self._bias_idx] += self._bias_val
        if repeat:
            idx = np.fromiter(set(self._recent), dtype=np.int64)
            v = out[idx]
            out[idx] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if penal:
            idx = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
            cnt = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            out[idx] -= cnt * p.frequency_penalty + p.presence_penalty
        return out

    def _allowed(self, logits: np.ndarray, banned: tuple[int, ...]) -> np.ndarray:
        """The adjusted logits with `banned` ids at -inf (never writes into `logits`)."""
        z = self.adjusted(logits)
        if banned:
            z = z if z is not logits else z.copy()
            z[list(banned)] = -np.inf
        return z

    def choose(self, logits: np.ndarray, banned: tuple[int, ...] = (),
               hint: tuple[int, float] | None = None) -> TokenChoice:
        """Pick the next token from one row of logits [n_vocab].

        hint: the prompt-lookup candidate and its weight λ (`fogline.prompt_lookup`); greedy
        decoding then takes argmax of (1 - λ) p + λ δ_candidate, whose probability becomes the
        confidence. Ignored unless `takes_lookup`, and where the candidate is masked or banned."""
        p = self.params
        m, lse = log_normalizer(logits)
        z = self._allowed(logits, banned)
        if p.temperature == 0.0 or p.top_k == 1:
            token = int(np.argmax(z))
            if hint is not None and self.takes_lookup and 0 <= hint[0] < len(z) and np.isfinite(z[hint[0]]):
                argmax = token
                token, conf = mix(argmax, float(np.exp(m - lse)), hint, float(np.exp(float(logits[hint[0]]) - lse)))
                return replace(self._choice(logits, token, m, lse, conf), lookup=token != argmax)
        else:
            token = self._draw(z / np.float32(p.temperature))
        return self._choice(logits, token, m, lse)

    def _choice(self, logits: np.ndarray, token: int, m: float, lse: float,
                confidence: float | None = None) -> TokenChoice:
        p = self.params
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs and p.top_logprobs:
            k = p.top_logprobs
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            top = tuple((int(i), float(logits[i]) - lse) for i in idx)
        return TokenChoice(token=token, logprob=float(logits[token]) - lse,
                           confidence=float(np.exp(m - lse)) if confidence is None else confidence, top_logprobs=top)

    def draft(self, logits: np.ndarray, banned: tuple[int, ...] = (), width: int = 32
              ) -> tuple[TokenChoice, tuple[tuple[int, float], ...]]:
        """A spec-mode draft for a sampled request: (the choice, q) where q is the *whole*
        distribution the token was drawn from, as (id, prob) over at most `width` ids.

        Speculative sampling is exact for any draft distribution the verifier knows exactly,
        so the edge draws from a sparse q it can ship whole rather than from its full
        distribution, of which only the top entries would travel: q is the sampler's own
        distribution (logit_bias, penalties, banned ids, temperature, top-k, top-p) cut to its
        `width` most likely ids and renormalised. The cloud then computes min(1, p/q) and
        norm(max(0, p - q)) with the true q (0 off its support)."""
        p = self.params
        m, lse = log_normalizer(logits)
        z = self._allowed(logits, banned)
        z = z.astype(np.float64) / max(p.temperature, 1e-6)
        n = z.shape[0]
        zmax = float(z.max())
        k = min(width, n, p.top_k) if p.top_k > 0 else min(width, n)
        pool = np.argpartition(-z, k - 1)[:k] if k < n else np.arange(n)
        pool = pool[np.argsort(-z[pool], kind="stable")]
        w = np.exp(z[pool] - zmax)
        if p.top_p < 1.0:  # the nucleus as _draw cuts it: mass relative to the top-k pool, or to all ids
            total = float(w.sum()) if 0 < p.top_k <= width else float(np.exp(z - zmax).sum())
            keep = min(int(np.searchsorted(np.cumsum(w) / total, p.top_p, side="left")) + 1, len(pool))
            pool, w = pool[:keep], w[:keep]
        live = w > 0
        pool, w = pool[live], w[live]
        q = w / w.sum()
        i = int(np.searchsorted(np.cumsum(q), self.rng.random(), side="right"))
        token = int(pool[min(i, len(pool) - 1)])
        return self._choice(logits, token, m, lse), tuple((int(t), float(x)) for t, x in zip(pool, q))

    def _draw(self, z: np.ndarray) -> int:
        """Sample from softmax(z) restricted by top_k, then by top_p (nucleus)."""
        p = self.params
        n = z.shape[0]
        zmax = float(z.max())
        pool = np.argpartition(-z, p.top_k - 1)[:p.top_k] if 0 < p.top_k < n else None
        if p.top_p < 1.0:
            if pool is None:
                total = float(np.exp((z - zmax).astype(np.float64)).sum())
                k = min(_TOP_P_PREFILTER, n)
                pool = np.argpartition(-z, k - 1)[:k] if k < n else np.arange(n)
                may_widen = True
            else:
                total = float(np.exp((z[pool] - zmax).astype(np.float64)).sum())
                may_widen = False
            pool = pool[np.argsort(-z[pool], kind="stable")]
            w = np.exp((z[pool] - zmax).astype(np.float64))
            cum = np.cumsum(w) / total
            if may_widen and cum[-1] < p.top_p and len(pool) < n:
                pool = np.argsort(-z, kind="stable")  # the prefilter held too little mass
                w = np.exp((z[pool] - zmax).astype(np.float64))
                cum = np.cumsum(w) / total
            keep = min(int(np.searchsorted(cum, p.top_p, side="left")) + 1, len(pool))
            pool, w = pool[:keep], w[:keep]
        else:
            if pool is None:
                pool = np.arange(n)
            w = np.exp((z[pool] - zmax).astype(np.float64))
        cum = np.cumsum(w)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(pool[min(i, len(pool) - 1)])


class StopMatcher:
    """Stop strings over streamed text: never emits a stop string, even one split across tokens.

    `push` returns the text that is safe to emit now; text that might be the
    start of a stop string is held back until the next piece decides it.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        hold = 0
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                hold = k
                break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of a generation that stopped for another reason."""
        out, self._held = self._held, ""
        return out


class Utf8Stream:
    """Token bytes to text: a multi-byte character split across tokens is emitted once whole."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._dec.decode(data)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
