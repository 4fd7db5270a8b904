"""Confidence calibration of the edge's exit head, measured through llama.cpp on the quantized edge GGUF.

On the held-out calibration answers (the full model's *greedy* answers to
prompts never trained on), every generated position is teacher-forced through
the edge GGUF exactly as the edge runs it (exit adapter blocks, final norm, LM
head). For each position we keep the exit distribution's confidence (max
probability, as the edge engine computes it) and whether its argmax equals the
full model's token. Positions inside prompts are never counted.

From that:
* the curve: for each τ in a grid, the exit rate (share of positions with
  confidence ≥ τ) and the agreement of those exited tokens with the full model;
* the default τ: the smallest grid τ whose agreement meets the target;
* greedy `spec` drafting at γ: the edge drafts γ tokens, the cloud accepts the
  longest matching prefix and adds its own token (the correction, or a bonus
  after γ accepted), so a round yields accepted + 1 tokens. Replayed exactly on
  greedy text: drafts condition only on accepted (hence true) tokens.
* the prompt-lookup mixture (`fit_lookup`, `with_lookup`; fogline/prompt_lookup.py): at each
  position, the continuation of the longest earlier match in the true text so far, the λ per
  match length fitted by likelihood, and the mixture's token and confidence as the edge's
  greedy decoding computes them; the export calibrates τ on that confidence;
* greedy drafting of a tree (`tree_tokens_per_round`): with the rank of the full
  model's token under each exit distribution, a tree that drafts the top-w_i
  tokens at depth i is replayed exactly too, since the accepted path is the
  true text and its drafts are the teacher-forced ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fogline.arch import ArchSpec
from fogline.prompt_lookup import MAX_N, PromptLookup, continuation, fit_lambdas, mix
from quantize.calibration_data import Sample

TAU_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95,
            0.96, 0.97, 0.98, 0.99, 0.995)
SPEC_GAMMA = 4


@dataclass
class ExitStats:
    """Per generated position, in sample order."""

    confidence: np.ndarray  # [N] float64: max probability of the exit distribution
    correct: np.ndarray  # [N] bool: exit argmax == the full model's token
    lengths: list[int]  # positions per sample
    rank: np.ndarray | None = None  # [N] int: the full model's token's rank under the exit distribution (0: argmax)
    lookup: LookupFeatures | None = None  # prompt lookup at each position (`with_lookup`)


@dataclass
class LookupFeatures:
    """What the prompt-lookup mixture (fogline.prompt_lookup) needs per generated position."""

    match_len: np.ndarray  # [N] int: length of the context match (0: no candidate)
    p_candidate: np.ndarray  # [N] float64: p_exit(candidate) (0 without one)
    candidate_true: np.ndarray  # [N] bool: the candidate is the full model's token
    candidate_is_argmax: np.ndarray  # [N] bool
    p_true: np.ndarray  # [N] float64: p_exit(the full model's token), for the λ fit


def measure(edge_gguf: Path, samples: list[Sample], threads: int | None = None, progress: bool = False,
            ranks: bool = False) -> ExitStats:
    """Teacher-force every held-out answer through llama.cpp on `edge_gguf` (one sample per decode).
    ranks: also record the full model's token's rank per position (tree replay; bench_exit)."""
    from tqdm import tqdm

    from edge_runtime.llama_backend import BatchRow, LlamaContext, LlamaModel

    model = LlamaModel(edge_gguf)
    conf: list[np.ndarray] = []
    correct: list[np.ndarray] = []
    rank: list[np.ndarray] = []
    lk: list[tuple[int, float, bool, bool, float]] = []
    try:
        longest = max(len(s.tokens) for s in samples)
        ctx = LlamaContext(model, n_ctx=max(256, longest + 8), n_batch=512, n_threads=threads)
        try:
            for s in tqdm(samples, desc="calibrating (llama.cpp)", unit="seq", disable=not progress, leave=False):
                ctx.remove(0)
                inputs = s.tokens[:-1]
                logits = []
                for off in range(0, len(inputs), ctx.n_batch):
                    chunk = inputs[off: off + ctx.n_batch]
                    rows = [BatchRow(t, off + i, 0, off + i >= s.first_target) for i, t in enumerate(chunk)]
                    logits.append(ctx.decode(rows).logits)
                z = np.concatenate(logits).astype(np.float64)  # [len(answer), V]
                m = z.max(-1, keepdims=True)
                sum_exp = np.exp(z - m).sum(-1)
                conf.append(1.0 / sum_exp)  # max probability
                lse = m[:, 0] + np.log(sum_exp)
                answer = np.asarray(s.answer)
                argmax = z.argmax(-1)
                hit = argmax == answer
                correct.append(hit)
                text = np.asarray(s.tokens, dtype=np.int64)
                for i, t in enumerate(s.answer):  # the candidate the edge would see: true text before i
                    found = continuation(text[: s.first_target + 1 + i], MAX_N)
                    c, n = found if found is not None else (-1, 0)
                    lk.append((n, float(np.exp(z[i, c] - lse[i])) if n else 0.0, c == t, c == int(argmax[i]),
                               float(np.exp(z[i, t] - lse[i]))))
                if ranks:
                    above = (z > z[np.arange(len(answer)), answer][:, None]).sum(-1)
                    rank.append(np.where(hit, 0, np.maximum(above, 1)))  # a tie at the top is argmax only if picked
        finally:
            ctx.close()
    finally:
        model.close()
    cols = list(zip(*lk)) or [()] * 5
    features = LookupFeatures(match_len=np.asarray(cols[0], dtype=np.int64), p_candidate=np.asarray(cols[1]),
                              candidate_true=np.asarray(cols[2], dtype=bool),
                              candidate_is_argmax=np.asarray(cols[3], dtype=bool), p_true=np.asarray(cols[4]))
    return ExitStats(confidence=np.concatenate(conf), correct=np.concatenate(correct),
                     lengths=[len(s.answer) for s in samples], rank=np.concatenate(rank) if ranks else None,
                     lookup=features)


def fit_lookup(stats: ExitStats) -> PromptLookup:
    """λ per match length by likelihood of the full model's tokens on these positions."""
    f = _features(stats)
    return fit_lambdas(f.match_len, f.p_true, f.candidate_true)


def with_lookup(stats: ExitStats, lookup: PromptLookup) -> ExitStats:
    """The same positions as the edge decodes them greedily with the mixture: per position the
    token and confidence `fogline.prompt_lookup.mix` gives (the edge's Sampler calls the same
    function), and whether that token is the full model's. Exact for chains, as `_replay` is:
    the context a candidate comes from is the true text. Ranks stay the exit head's."""
    f = _features(stats)
    conf = stats.confidence.copy()
    correct = stats.correct.copy()
    for i in np.flatnonzero(f.match_len > 0):
        lam = lookup.lambdas[min(int(f.match_len[i]), lookup.max_n) - 1]
        if lam <= 0:
            continue
        argmax = 0 if f.candidate_is_argmax[i] else 1  # stand-in ids: only "is it the candidate" matters
        token, conf[i] = mix(argmax, float(stats.confidence[i]), (0, lam), float(f.p_candidate[i]))
        if token == 0 and not f.candidate_is_argmax[i]:
            correct[i] = f.candidate_true[i]
    return ExitStats(confidence=conf, correct=correct, lengths=stats.lengths, rank=stats.rank, lookup=stats.lookup)


def _features(stats: ExitStats) -> LookupFeatures:
    if stats.lookup is None:
        raise ValueError("prompt lookup needs ExitStats.lookup (quantize.calibrate.measure records it)")
    return stats.lookup


def curve(stats: ExitStats, grid: tuple[float, ...] = TAU_GRID) -> list[dict[str, float]]:
    out = []
    n = len(stats.confidence)
    for tau in grid:
        exited = stats.confidence >= tau
        k = int(exited.sum())
        out.append({"tau": tau, "exit_rate": round(k / n, 4),
                    "agreement": round(float(stats.correct[exited].mean()), 4) if k else None})
    return out


def choose_tau(points: list[dict[str, float]], target: float) -> dict[str, float]:
    """The smallest τ whose exited tokens agree with the full model at least `target` of the time."""
    for p in points:
        if p["agreement"] is not None and p["agreement"] >= target and p["exit_rate"] > 0:
            return p
    return {"tau": 1.0, "exit_rate": 0.0, "agreement": None}  # never exit: every token from the cloud


def spec_accepted_length(stats: ExitStats, gamma: int = SPEC_GAMMA) -> float:
    """Mean tokens per greedy spec round (accepted drafts + the cloud's token)."""
    return _replay(stats.correct[:, None], None, stats.lengths, gamma)[0]


def confidence_stop_replay(stats: ExitStats, c: float, gamma: int = SPEC_GAMMA) -> dict[str, float]:
    """Greedy spec with a confidence stop (edge_runtime's `spec_stop`): a block drafts while the exit
    head's max prob ≥ `c`, at most `gamma`; an empty block is the cloud picking the token. Tokens per
    round trip, and the rows the cloud runs per kept token (each round: its drafts, accepted or not,
    plus the row before them). c = 0 is the plain γ chain."""
    tokens_per_round, rows_per_token = _replay(stats.correct[:, None], stats.confidence >= c, stats.lengths, gamma)
    return {"tokens_per_round": tokens_per_round, "cloud_rows_per_token": rows_per_token}


def tree_nodes(widths: tuple[int, ...]) -> int:
    """Drafted tokens (h_K rows for the cloud to verify) of a tree with `widths[i]` children per node at depth i."""
    nodes, level = 0, 1
    for w in widths:
        level *= w
        nodes += level
    return nodes


def tree_tokens_per_round(stats: ExitStats, widths: tuple[int, ...]) -> float:
    """Mean tokens per greedy spec round when the edge drafts a tree: every node at depth i gets the exit
    head's top-`widths[i]` tokens as children, the cloud verifies all nodes in one pass and keeps the
    longest path that matches its own greedy tokens, plus its own next token. (1, 1, 1, 1) is the γ=4
    chain. Exact on greedy text: the path that can be accepted is the true one, and at each of its
    nodes the exit distribution is the teacher-forced one, so a depth-i draft is accepted iff the
    true token's rank there is below widths[i]."""
    if stats.rank is None:
        raise ValueError("tree replay needs ExitStats.rank (quantize.calibrate.measure(..., ranks=True))")
    ok = stats.rank[:, None] < np.asarray(widths)[None, :]  # [N, depth]: would depth i accept this position
    return _replay(ok, None, stats.lengths, len(widths))[0]


def _replay(ok: np.ndarray, sure: np.ndarray | None, lengths: list[int], depth: int) -> tuple[float, float]:
    """The one greedy spec replay: ok[pos, i] says a draft at depth i would be accepted at text position
    pos (one column: any depth); sure[pos] says the edge drafts there at all (None: always). A round
    drafts up to `depth` positions while sure, keeps the accepted prefix and the cloud's token. Returns
    tokens per round and, for a chain, the cloud's rows per kept token (drafts + the row before them)."""
    tokens = rounds = rows = off = 0
    per_depth = ok.shape[1] > 1
    for n in lengths:
        match = ok[off: off + n]
        drafts = sure[off: off + n] if sure is not None else None
        off += n
        p = 0
        while p < n:
            d = 0
            while d < depth and p + d < n and (drafts is None or drafts[p + d]):
                d += 1
            a = 0
            while a < d and match[p + a, a if per_depth else 0]:
                a += 1
            tokens += min(a + 1, n - p)
            rounds += 1
            rows += d + 1
            p += a + 1
    return tokens / max(1, rounds), rows / max(1, tokens)


def summarize(stats: ExitStats, target: float) -> dict[str, Any]:
    points = curve(stats)
    chosen = choose_tau(points, target)
    return {
        "target_agreement": target,
        "default_tau": chosen["tau"],
        "exit_rate_at_target": chosen["exit_rate"],
        "agreement_at_default_tau": chosen["agreement"],
        "agreement_top1": round(float(stats.correct.mean()), 4),
        "spec_gamma": SPEC_GAMMA,
        "spec_mean_accepted": round(spec_accepted_length(stats), 4),
        "positions": int(len(stats.confidence)),
        "answers": len(stats.lengths),
        "curve": points,
    }


HEAD_ONLY_KEYS = ("agreement_top1", "default_tau", "exit_rate_at_target", "spec_mean_accepted")


def calibrate(edge_gguf: Path, samples: list[Sample], target: float, threads: int | None = None,
              progress: bool = False, lookup: bool = True) -> dict[str, Any]:
    """The calibration summary of what the edge runs. lookup: fit the prompt-lookup mixture on
    these positions, and calibrate τ on the mixture's confidence (the edge's greedy tokens and
    their confidence come from it); the exit head alone is kept beside it (`head_only`)."""
    stats = measure(edge_gguf, samples, threads, progress)
    if not lookup:
        return summarize(stats, target)
    fitted = fit_lookup(stats)
    head = summarize(stats, target)
    out = summarize(with_lookup(stats, fitted), target)
    out["prompt_lookup"] = fitted.to_manifest()
    out["head_only"] = {k: head[k] for k in HEAD_ONLY_KEYS}
    return out


# ---- measurements across splits: what a deeper edge buys ------------------------------------------

MEASUREMENTS = "measurements.jsonl"


def record_measurement(src: Any, split: int, quant: str, areq: Any, data_key: str, summary: dict[str, Any],
                       bare: dict[str, Any], train_info: dict[str, Any]) -> None:
    """Append this export's figures to the cache's measurement log (read by split advice)."""
    import json

    from quantize.exit_adapter import cache_dir

    row = {"fingerprint": src.fingerprint(), "K": split, "quant": quant, "blocks": areq.blocks,
           "data_key": data_key, "seed": areq.seed, "target_agreement": summary["target_agreement"],
           "agreement_top1": summary["agreement_top1"], "default_tau": summary["default_tau"],
           "exit_rate_at_target": summary["exit_rate_at_target"],
           "spec_mean_accepted": summary["spec_mean_accepted"], "bare": bare,
           "train_seconds": train_info.get("train_seconds"), "train_cpu_seconds": train_info.get("train_cpu_seconds"),
           "drafter": drafter(summary)}
    path = cache_dir() / MEASUREMENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def drafter(summary: dict[str, Any]) -> str:
    """What produced a summary's figures: "exit+lookup" (the mixture) or "exit" (the head alone;
    also every row logged before prompt lookup existed)."""
    return "exit+lookup" if summary.get("prompt_lookup") else "exit"


def load_measurements(fingerprint: str) -> list[dict[str, Any]]:
    import json

    from quantize.exit_adapter import cache_dir

    path = cache_dir() / MEASUREMENTS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("fingerprint") == fingerprint:
            rows.append(row)
    return rows


def edge_cost_fraction(spec: ArchSpec, split: int, blocks: int) -> float:
    """Edge multiply-accumulates per token (K + N blocks + LM head) over the full model's (L blocks + head)."""
    return ((split + blocks) * spec.block_macs + spec.head_macs) / (spec.n_layers * spec.block_macs + spec.head_macs)


def split_advice(spec: Any, fingerprint: str, quant: str, areq: Any, data_key: str, split: int,
                 choice: Any = None) -> list[dict[str, Any]]:
    """One row per candidate split: edge cost (compute, memory) against exit quality where measured.

    Quality comes from this machine's measurement log (exports and tools/bench_exit.py append to
    it); splits never measured show None rather than a guess."""
    from quantize import budget as budget_mod

    measured: dict[int, dict[str, Any]] = {}
    for row in load_measurements(fingerprint):
        if row.get("blocks") != areq.blocks or row.get("data_key") != data_key or row.get("drafter", "exit") != "exit+lookup":
            continue  # figures of another recipe, data or drafter do not compare
        prev = measured.get(row["K"])
        if prev is None or row["quant"] == quant or prev["quant"] != quant:
            measured[row["K"]] = row  # latest wins, same quant preferred
    if choice is not None:
        candidates = sorted({c.split for c in choice.table} | {split})
    else:
        candidates = sorted(set(budget_mod.split_grid(spec)) | {split} | set(measured))
    rows = []
    for k in candidates:
        m = measured.get(k)
        fits = None
        if choice is not None:
            fits = any(c.fits for c in choice.table if c.split == k and c.quant == quant)
        rows.append({
            "K": k, "chosen": k == split, "quant": quant,
            "edge_compute_fraction": round(edge_cost_fraction(spec, k, areq.blocks), 3),
            "edge_resident_mib": round(budget_mod.resident_bytes(spec, k + areq.blocks, quant) / budget_mod.MiB, 1),
            "fits_budget": fits,
            "agreement_top1": m["agreement_top1"] if m else None,
            "exit_rate_at_target": m["exit_rate_at_target"] if m else None,
            "spec_mean_accepted": m["spec_mean_accepted"] if m else None,
            "bare_agreement_top1": m["bare"]["agreement_top1"] if m else None,
            "measured_quant": m["quant"] if m else None,
        })
    return rows
