"""The exit adapter: a few transformer blocks after layer K that make the edge's own tokens good.

Model: N blocks with the source architecture, initialised from source layers
(by default K..K+N-1), plus a trainable copy of the final norm; the LM head is
shared with the model and frozen (the edge GGUF keeps the tied embedding).
Input: h_K, read out of llama.cpp running the *quantized* edge GGUF, i.e.
exactly what the adapter sees at run time. Target: the full model's
distribution at every generated position of the calibration answers (the
teacher's top-k log-probabilities cached at generation time, so the full model
never runs twice), as KL over the top-k plus a "rest" bucket, plus a
cross-entropy on the teacher's argmax (agreement is a top-1 quantity).

Training runs in bfloat16 autocast (this CPU has AVX512-BF16: ~3.5x fp32 for
the 49k-row LM head, which dominates the cost; the loss never materialises the
[positions, vocabulary] log-softmax, see `_TopkLogSoftmax`), AdamW with warmup + cosine,
deterministic for a seed. Trained adapters are cached by (fingerprint, K, edge
quant type, adapter config, calibration data, seed) in `cache_dir()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fogline.arch import ArchSpec
from fogline.errors import ConfigError, ExportError
from quantize.calibration_data import CalibrationSet, Sample

ADAPTER_VERSION = 3  # bump when training's numerics change (v3: chunked top-k log-softmax)
VAL_EVERY = 16  # early stop: every 16th training answer is validation (sets of >= 4 * 16 answers only)
TRAIN_RUNS = 0  # trainings performed in this process (tests check the cache path does not train)


def cache_dir() -> Path:
    """`FOGLINE_CACHE_DIR`, else ~/.cache/fogline."""
    return Path(os.environ.get("FOGLINE_CACHE_DIR") or Path.home() / ".cache" / "fogline")


# ---- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterConfig:
    """The training recipe. Every field is part of the cache key."""

    blocks: int = 1
    init: str = "next"  # "next": copy layers K..K+N-1; "last": copy layers L-N..L-1 (worse: 0.38 vs 0.43)
    epochs: float = 4.0  # 5 on 44k tokens of the template-only set: data beats epochs at equal time
    lr: float = 6e-3  # high for a fine-tune: 4e-4 -> 0.43, 1e-3 -> 0.49, 2e-3 -> 0.53, 4e-3 -> 0.56 (K=20, 3 ep)
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of steps
    batch_tokens: int = 1536  # padded input tokens per step (~1100 target positions)
    ce_weight: float = 1.0  # weight of the hard cross-entropy on the teacher's argmax (raises the exit rate)
    weight_decay: float = 0.0
    train_seconds: float | None = None  # time cap: the schedule shrinks to fit (not deterministic)
    # early stop: after each epoch from `min_epochs` on, the teacher-argmax agreement on a
    # validation slice of the training answers (every VAL_EVERY-th, not trained on); training
    # stops, keeping the best epoch's weights, once an epoch adds less than this. None: off.
    stop_min_gain: float | None = 0.002
    min_epochs: int = 2

    def key_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Budget:
    """--calib-budget: calibration tokens to generate and/or a training time cap."""

    tokens: int | None = None
    seconds: float | None = None


def parse_budget(text: str | None) -> Budget:
    """'60k' (training tokens), '8m' / '8min' / '300s' (training time), or both: '40k,5m'."""
    if not text:
        return Budget()
    tokens, seconds = None, None
    for part in text.replace(" ", "").lower().split(","):
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)(k|m|min|s|sec|h|tok|tokens)?", part)
        if not m:
            raise ConfigError(f"--calib-budget {text!r}: write tokens (60k, 20000) or a time (8m, 300s), "
                              "or both separated by a comma")
        value, unit = float(m.group(1)), m.group(2) or ""
        if unit in ("", "tok", "tokens", "k"):
            tokens = int(value * (1000 if unit == "k" else 1))
            if tokens < 64:
                raise ConfigError(f"--calib-budget {text!r}: at least 64 training tokens")
        else:
            seconds = value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]
            if seconds <= 0:
                raise ConfigError(f"--calib-budget {text!r}: the time must be positive")
    return Budget(tokens=tokens, seconds=seconds)


# ---- the model ----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.nh, self.nkv, self.hd = spec.n_heads, spec.n_kv_heads, hd
        self.q_proj = nn.Linear(d, spec.n_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: [B, T, D]; cos, sin: [T, hd] -> [B, T, D], causal."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.nh * self.hd))


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """HF parameter names, so the state dict maps 1:1 onto `adapter.layers.{j}.*` for the GGUF writer."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class ExitAdapter(nn.Module):
    def __init__(self, spec: ArchSpec, blocks: int, head: Tensor) -> None:
        super().__init__()
        from cloud_runtime.deep_model import rope_inv_freq  # the cloud's rope math (llama3 scaling too)

        self.layers = nn.ModuleList(Block(spec) for _ in range(blocks))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("head", head.detach().clone(), persistent=False)  # [V, D], frozen
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)
        self._head_bf16: Tensor | None = None

    def rope(self, t: int) -> tuple[Tensor, Tensor]:
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, h: Tensor) -> Tensor:
        """h: [B, T, D] h_K of sequences starting at position 0 -> final-normed [B, T, D]."""
        cos, sin = self.rope(h.shape[1])
        x = h
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def logits(self, normed: Tensor) -> Tensor:
        """normed @ head.T. Under CPU bf16 autocast this uses a bf16 copy of the frozen head made
        once: autocast would otherwise cast all 49k rows again at every call."""
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            if self._head_bf16 is None:
                self._head_bf16 = self.head.to(torch.bfloat16)
            return normed.to(torch.bfloat16) @ self._head_bf16.T
        return normed @ self.head.to(normed.dtype).T

    def export_state(self) -> dict[str, Tensor]:
        """HF-named tensors for quantize.edge_gguf.write_edge_gguf(adapter_state=...)."""
        out = {f"adapter.{k}": v.detach().float().contiguous() for k, v in self.state_dict().items()}
        return out


def init_layers(spec: ArchSpec, split: int, cfg: AdapterConfig) -> list[int]:
    n, L = cfg.blocks, spec.n_layers
    if cfg.init == "next":
        return [min(split + j, L - 1) for j in range(n)]
    if cfg.init == "last":
        return [max(L - n + j, 0) for j in range(n)]
    raise ConfigError(f"unknown adapter init {cfg.init!r} (next or last)")


def build_adapter(src: Any, split: int, cfg: AdapterConfig) -> ExitAdapter:
    spec = src.spec
    model = ExitAdapter(spec, cfg.blocks, src.lm_head().float())
    state = {}
    for j, li in enumerate(init_layers(spec, split, cfg)):
        prefix = f"model.layers.{li}."
        for name, t in src.state.items():
            if name.startswith(prefix):
                state[f"layers.{j}.{name[len(prefix):]}"] = t.float()
    state["norm.weight"] = src.state["model.norm.weight"].float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"cannot initialise the exit adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


# ---- h_K from llama.cpp -------------------------------------------------------------------------

def edge_hidden_states(edge_gguf: Path, split: int, samples: list[Sample], threads: int | None = None,
                       progress: bool = True, desc: str = "h_K (llama.cpp)",
                       hidden_via: str = "callback") -> list[np.ndarray]:
    """h_K of tokens[:-1] of every sample, from llama.cpp running the (quantized) edge GGUF: float16.
    hidden_via: as `LlamaContext`'s ("auto" for a GGUF with a block after K-1, see `hk_probe_gguf`)."""
    from tqdm import tqdm

    from edge_runtime.llama_backend import LlamaContext, LlamaModel, prefill

    model = LlamaModel(edge_gguf)
    out: list[np.ndarray] = []
    try:
        longest = max(len(s.tokens) for s in samples)
        ctx = LlamaContext(model, n_ctx=max(256, longest + 8), n_batch=512, n_threads=threads, tap_layer=split - 1,
                           hidden_via=hidden_via)
        try:
            for s in tqdm(samples, desc=desc, unit="seq", disable=not progress, leave=False):
                ctx.remove(0)
                res = prefill(ctx, s.tokens[:-1], capture_hidden=True)
                assert res.hidden is not None
                out.append(res.hidden.astype(np.float16))
        finally:
            ctx.close()
    finally:
        model.close()
    return out


# ---- training -----------------------------------------------------------------------------------

@dataclass
class Batch:
    h: Tensor  # [B, T, D] float32 (padded at the end)
    rows: Tensor  # [N] flat indices (b * T + t) of the target positions
    ids: Tensor  # [N, k] teacher top-k token ids
    logp: Tensor  # [N, k] teacher top-k log-probabilities


def make_batches(samples: list[Sample], hidden: list[np.ndarray], batch_tokens: int,
                 rng: np.random.Generator | None) -> list[Batch]:
    order = np.arange(len(samples)) if rng is None else rng.permutation(len(samples))
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = hidden[i].shape[0]
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    batches = []
    for g in groups:
        t = max(hidden[i].shape[0] for i in g)
        d = hidden[g[0]].shape[1]
        h = torch.zeros(len(g), t, d)
        rows, ids, logp = [], [], []
        for b, i in enumerate(g):
            s, hi = samples[i], hidden[i]
            h[b, : hi.shape[0]] = torch.from_numpy(hi.astype(np.float32))
            start = s.first_target
            n_t = len(s.answer)
            rows.append(torch.arange(start, start + n_t) + b * t)
            ids.append(torch.from_numpy(s.topk_ids.astype(np.int64)))
            logp.append(torch.from_numpy(s.topk_logp.astype(np.float32)))
        batches.append(Batch(h=h, rows=torch.cat(rows), ids=torch.cat(ids), logp=torch.cat(logp)))
    return batches


LOSS_CHUNK_ROWS = 32  # rows of [N, V] logits handled at a time: a chunk stays in the CPU cache


class _TopkLogSoftmax(torch.autograd.Function):
    """(log_softmax(z) gathered at ids, whether argmax(z) is ids[:, 0]) for logits z [N, V].

    Same values and gradient as `torch.log_softmax(z.float(), -1).gather(1, ids)`, but the
    [N, V] float32 log-probabilities are never materialised: the forward keeps one
    log-sum-exp per row and the backward writes dL/dz = scatter(g) - softmax(z) * sum(g) chunk
    by chunk. With a 49k vocabulary the full-width softmax, its backward, the dtype copies
    and an argmax took more than half of a training step (the LM-head matmuls a quarter).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        n = z.shape[0]
        lse = torch.empty(n, dtype=torch.float32)
        zmax = torch.empty(n, dtype=torch.float32)
        for a in range(0, n, LOSS_CHUNK_ROWS):
            zf = z[a: a + LOSS_CHUNK_ROWS].to(torch.float32, copy=True)  # (exp_ below works in place)
            m = zf.amax(-1)
            zmax[a: a + LOSS_CHUNK_ROWS] = m
            lse[a: a + LOSS_CHUNK_ROWS] = m + zf.sub_(m[:, None]).exp_().sum(-1).log_()
        top = z.gather(1, ids).float()
        ctx.save_for_backward(z, ids, lse)
        hit = top[:, 0] >= zmax
        ctx.mark_non_differentiable(hit)
        return top - lse[:, None], hit

    @staticmethod
    def backward(ctx: Any, g: Tensor, _hit: Tensor | None) -> tuple[Tensor, None]:  # type: ignore[override]
        z, ids, lse = ctx.saved_tensors
        g = g.float()
        gsum = g.sum(-1)
        grad = torch.empty_like(z)
        for a in range(0, z.shape[0], LOSS_CHUNK_ROWS):
            b = a + LOSS_CHUNK_ROWS
            p = z[a:b].to(torch.float32, copy=True).sub_(lse[a:b, None]).exp_().mul_(-gsum[a:b, None])
            grad[a:b] = p.scatter_add_(1, ids[a:b], g[a:b])
        return grad, None


def distill_loss(logits: Tensor, ids: Tensor, t_logp: Tensor, ce_weight: float) -> tuple[Tensor, Tensor]:
    """KL(teacher || student) over the teacher's top-k + one 'rest' bucket, + CE on the teacher argmax.

    logits: [N, V]; ids, t_logp: [N, k] (sorted, ids[:, 0] is the teacher's argmax). Returns
    (loss, number of rows whose student argmax is the teacher's argmax; a tie counts as one).
    """
    s_top, hit = _TopkLogSoftmax.apply(logits, ids)
    t_p = t_logp.exp()
    t_rest = (1 - t_p.sum(-1)).clamp_min(1e-6)
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (t_p * (t_logp - s_top)).sum(-1) + t_rest * (t_rest.log() - s_rest)
    loss = kl.mean() - ce_weight * s_top[:, 0].mean()
    return loss, hit.sum()


@dataclass
class TrainResult:
    state: dict[str, Tensor]  # HF-named `adapter.*` tensors
    info: dict[str, Any]


def train_adapter(src: Any, split: int, cfg: AdapterConfig, data: CalibrationSet, hidden_train: list[np.ndarray],
                  hidden_heldout: list[np.ndarray] | None, seed: int, log: Callable[[str], None] = print,
                  progress: bool = True, torch_threads: int | None = None) -> TrainResult:
    """Distil the adapter (see the module docstring); torch runs on `torch_threads` (default:
    every core, `export_threads`)."""
    global TRAIN_RUNS

    TRAIN_RUNS += 1
    threads_before = torch.get_num_threads()
    torch.set_num_threads(export_threads(torch_threads))
    try:
        return _train(src, split, cfg, data, hidden_train, hidden_heldout, seed, log, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(src: Any, split: int, cfg: AdapterConfig, data: CalibrationSet, hidden_train: list[np.ndarray],
           hidden_heldout: list[np.ndarray] | None, seed: int, log: Callable[[str], None],
           progress: bool) -> TrainResult:
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_adapter(src, split, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    samples, hidden = data.train, hidden_train
    val: list[int] = []
    if cfg.stop_min_gain is not None and len(samples) >= 4 * VAL_EVERY:
        val = list(range(VAL_EVERY - 1, len(samples), VAL_EVERY))
        held = set(val)
        samples = [x for i, x in enumerate(data.train) if i not in held]
        hidden = [x for i, x in enumerate(hidden_train) if i not in held]
    val_s, val_h = [data.train[i] for i in val], [hidden_train[i] for i in val]
    best: tuple[float, int, dict[str, Tensor]] | None = None  # (agreement, epoch, weights)
    by_epoch: list[float] = []
    stopped, epoch = False, 0
    n_batches = len(make_batches(samples, hidden, cfg.batch_tokens, None))
    total = max(1, round(n_batches * cfg.epochs))
    warm = max(1, round(total * cfg.warmup))
    time_cap = cfg.train_seconds
    t0, c0 = time.time(), time.process_time()
    step = 0
    losses: list[float] = []
    bar = tqdm(total=total, desc=f"exit adapter K={split}", unit="step", disable=not progress, leave=False)
    model.train()
    try:
        while step < total and not stopped:
            for batch in make_batches(samples, hidden, cfg.batch_tokens, rng):
                if step >= total:
                    break
                lr = _lr(step, total, warm, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    normed = model(batch.h)
                    sel = normed.reshape(-1, normed.shape[-1])[batch.rows]
                    logits = model.logits(sel)
                loss, agree = distill_loss(logits, batch.ids, batch.logp, cfg.ce_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", agree=f"{int(agree) / len(batch.rows):.2f}")
                if step == 3:  # the schedule's time, measured; re-planned to fit a time cap
                    per_step = (time.time() - t0) / step
                    fit = max(step + 1, int(time_cap / per_step)) if time_cap is not None else total
                    if fit < total:
                        total, warm = fit, min(warm, max(1, fit // 20))
                        bar.total = total
                    log(f"exit adapter: {total} steps ({total / n_batches:.1f} epochs of {n_batches}) at "
                        f"{per_step:.2f} s/step on {torch.get_num_threads()} thread(s): estimated "
                        f"~{total * per_step:.0f} s" + (", less if validation agreement stops rising"
                                                        if val_s else ""))
            epoch += 1
            if val_s:  # an epoch ended: did it still help?
                model.eval()
                a = _teacher_agreement(model, val_s, val_h)
                model.train()
                by_epoch.append(round(a, 4))
                if best is None or a >= best[0] + cfg.stop_min_gain:  # type: ignore[operator]
                    # only what training changes (the frozen 49k-row LM head is not copied)
                    best = (a, epoch, {k: v.detach().clone() for k, v in model.named_parameters()
                                       if v.requires_grad})
                elif epoch >= cfg.min_epochs and step < total:
                    stopped = True
    finally:
        bar.close()
    if best is not None and by_epoch and by_epoch[-1] < best[0]:
        with torch.no_grad():  # the last epoch made it worse: keep the best one
            for k, v in model.named_parameters():
                if k in best[2]:
                    v.copy_(best[2][k])
    model.eval()
    info: dict[str, Any] = {
        "val_agreement_by_epoch": by_epoch, "early_stopped": stopped,
        "best_epoch": None if best is None else best[1],
        "steps": step, "epochs": round(step / n_batches, 2), "train_positions": data.train_tokens,
        "final_loss": round(float(np.mean(losses[-max(1, n_batches // 4):])), 4),
        "train_seconds": round(time.time() - t0, 1), "train_cpu_seconds": round(time.process_time() - c0, 1),
    }
    if hidden_heldout is not None:
        info.update(evaluate(model, data.heldout, hidden_heldout))
    log(f"exit adapter K={split}: {step} steps in {info['train_seconds']} s "
        f"({info['train_cpu_seconds']} CPU-s), loss {info['final_loss']}"
        + (f", validation agreement by epoch {by_epoch}" + (" (stopped: no longer rising)" if stopped else "")
           if by_epoch else "")
        + (f", held-out agreement {info['heldout_agreement_torch']:.3f} (torch)" if hidden_heldout else ""))
    return TrainResult(state=model.export_state(), info=info)


def _lr(step: int, total: int, warm: int, cfg: AdapterConfig) -> float:
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def _teacher_agreement(model: ExitAdapter, samples: list[Sample], hidden: list[np.ndarray]) -> float:
    """Share of generated positions where the adapter's argmax is the teacher's (training answers
    are sampled, so the target is the teacher's top-1, not the sampled token)."""
    hit = n = 0
    for s, h in zip(samples, hidden):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            normed = model(torch.from_numpy(h.astype(np.float32))[None])[0]
            logits = model.logits(normed[s.first_target:])
        hit += int((logits.argmax(-1) == torch.from_numpy(s.topk_ids[:, 0].astype(np.int64))).sum())
        n += len(s.answer)
    return hit / max(1, n)


@torch.no_grad()
def evaluate(model: ExitAdapter, samples: list[Sample], hidden: list[np.ndarray]) -> dict[str, Any]:
    """Held-out figures in torch (bf16), a quick proxy; the manifest's figures come from llama.cpp
    running the quantized GGUF (quantize.calibrate)."""
    from quantize.calibrate import ExitStats, summarize

    conf, correct = [], []
    for s, h in zip(samples, hidden):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            normed = model(torch.from_numpy(h.astype(np.float32))[None])[0]
            logits = model.logits(normed[s.first_target:]).float()
        conf.append(torch.softmax(logits, -1).max(-1).values.double().numpy())
        correct.append((logits.argmax(-1) == torch.tensor(s.answer)).numpy())
    stats = ExitStats(confidence=np.concatenate(conf), correct=np.concatenate(correct),
                      lengths=[len(s.answer) for s in samples])
    summary = summarize(stats, 0.95)
    return {"heldout_agreement_torch": summary["agreement_top1"],
            "heldout_exit_rate_torch": summary["exit_rate_at_target"],
            "heldout_spec_torch": summary["spec_mean_accepted"]}


# ---- cache ---------------------------------------------------------------------------------------

def adapter_key(fingerprint: str, split: int, quant: str, cfg: AdapterConfig, data_key: str, seed: int) -> str:
    blob = json.dumps({"v": ADAPTER_VERSION, "fp": fingerprint, "K": split, "quant": quant, "cfg": cfg.key_dict(),
                       "data": data_key, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_cached(key: str, root: Path | None = None) -> TrainResult | None:
    from safetensors.torch import load_file

    d = (root or cache_dir()) / "adapters"
    st, meta = d / f"{key}.safetensors", d / f"{key}.json"
    if not (st.is_file() and meta.is_file()):
        return None
    try:
        return TrainResult(state=load_file(str(st)), info=json.loads(meta.read_text()))
    except Exception:  # a torn cache entry is retrained, never trusted
        return None


def save_cached(key: str, result: TrainResult, root: Path | None = None) -> Path:
    from safetensors.torch import save_file

    d = (root or cache_dir()) / "adapters"
    d.mkdir(parents=True, exist_ok=True)
    st = d / f"{key}.safetensors"
    tmp = d / f".{key}.safetensors.tmp"
    save_file(result.state, str(tmp))
    os.replace(tmp, st)
    meta_tmp = d / f".{key}.json.tmp"
    meta_tmp.write_text(json.dumps(result.info, indent=1, sort_keys=True))
    os.replace(meta_tmp, d / f"{key}.json")
    return st


# ---- the export step -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterRequest:
    """What `fogline export` asks of this module."""

    blocks: int = 1
    calib_text: str | None = None
    budget: Budget = Budget()
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    recipe: AdapterConfig = AdapterConfig()
    self_instruct: int | None = None  # requests the full model writes; None: SELF_INSTRUCT_DEFAULT without calib_text

    def self_instruct_requests(self) -> int:
        from quantize.self_instruct import SELF_INSTRUCT_DEFAULT

        if self.self_instruct is not None:
            return self.self_instruct
        return 0 if self.calib_text else SELF_INSTRUCT_DEFAULT

    def config(self) -> AdapterConfig:
        return dataclasses.replace(self.recipe, blocks=self.blocks, train_seconds=self.budget.seconds)

    def data_config(self) -> Any:
        from quantize.calibration_data import DataConfig

        base = DataConfig(seed=self.seed, workers=min(8, export_threads(self.threads)))
        return dataclasses.replace(base, train_tokens=self.budget.tokens) if self.budget.tokens else base


def export_threads(requested: int | None) -> int:
    """Cores the export uses (`--threads`, else every core this process may run on): an export
    is a batch job on an otherwise quiet machine. Measured on 2 idle cores: torch training 1.72x
    and llama.cpp answer generation 1.53x faster on 2 threads than on 1 (and 1.87x as two
    1-thread worker processes, which is how answers are generated)."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def load_prompts(calib_text: str | None, self_instruct: int = 0) -> tuple[list[Any], str]:
    """The user's prompts, or the built-in templated ones: DEFAULT_PROMPTS less the self-instruct
    requests that will join them (`calibration_set`)."""
    from quantize.calibration_data import DEFAULT_PROMPTS, builtin_prompts, read_calib_text

    if calib_text:
        return read_calib_text(calib_text), f"file:{Path(calib_text).name}"
    n = max(DEFAULT_PROMPTS - self_instruct, DEFAULT_PROMPTS // 2)
    return builtin_prompts(n), f"builtin:{n}"


def full_model_gguf(src: Any, source_arg: str, threads: int | None, log: Callable[[str], None]) -> Path:
    """A full-depth GGUF of the source for llama.cpp to write the calibration answers with."""
    from quantize.edge_gguf import write_edge_gguf
    from quantize.llama_quant import quantize_gguf
    from quantize.source import demo_gguf_path

    if source_arg == "demo":
        return demo_gguf_path()
    p = Path(source_arg)
    if p.is_file() and p.suffix == ".gguf":
        return p
    fp = src.fingerprint()
    out = cache_dir() / "full" / f"{fp[:24]}.Q8_0.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log("calibration data: writing a full-depth Q8_0 GGUF of the source for generation (cached)")
    tmp_f16 = out.with_name(f".{out.name}.f16.tmp")
    tmp_q = out.with_name(f".{out.name}.tmp")
    try:
        write_edge_gguf(src, src.spec.n_layers, tmp_f16, "F16", fingerprint=fp, progress=False)
        quantize_gguf(tmp_f16, tmp_q, "Q8_0", threads)
        os.replace(tmp_q, out)
    finally:
        tmp_f16.unlink(missing_ok=True)
        tmp_q.unlink(missing_ok=True)
    return out


def calibration_set(src: Any, source_arg: str, tokenizer: Any, areq: AdapterRequest,
                    log: Callable[[str], None]) -> tuple[CalibrationSet, str]:
    from quantize.calibration_data import build_calibration_set

    from quantize.self_instruct import SelfInstructConfig, as_prompts, cached_requests, interleave

    n_si = areq.self_instruct_requests()
    prompts, origin = load_prompts(areq.calib_text, n_si)
    threads = export_threads(areq.threads)
    full = full_model_gguf(src, source_arg, threads, log)
    dcfg = areq.data_config()
    if n_si:
        reqs = cached_requests(full, src.fingerprint(), SelfInstructConfig(requests=n_si, seed=areq.seed),
                               cache_dir(), workers=dcfg.workers, n_parallel=dcfg.n_parallel, log=log,
                               progress=areq.progress, threads=threads)
        prompts = interleave(prompts, as_prompts(reqs, areq.seed))
        origin += f"+self-instruct:{len(reqs)}"
    cs = build_calibration_set(full, tokenizer, src.fingerprint(), prompts, dcfg, cache_dir(),
                               log=log, progress=areq.progress, threads=threads)
    return cs, origin


def trained_adapter(src: Any, split: int, quant: str, base_gguf: Path, data: CalibrationSet, areq: AdapterRequest,
                    log: Callable[[str], None]) -> tuple[TrainResult, bool]:
    """The adapter for this (model, K, quant, recipe, data, seed): from the cache, or trained now."""
    cfg = areq.config()
    key = adapter_key(src.fingerprint(), split, quant, cfg, data.key, areq.seed)
    cached = load_cached(key)
    if cached is not None:
        log(f"exit adapter: cache hit {key} (trained in {cached.info.get('train_seconds')} s; not retraining)")
        return cached, True
    threads = export_threads(areq.threads)
    t0 = time.time()
    probe = hk_probe_gguf(src, split, cfg, base_gguf, base_gguf.with_name("edge.hk-probe.gguf"))
    try:
        first = data.heldout[:1]
        if not np.array_equal(edge_hidden_states(probe, split, first, threads, False, hidden_via="auto")[0],
                              edge_hidden_states(base_gguf, split, first, threads, False)[0]):
            raise ExportError("h_K read from the probe GGUF differs from the edge GGUF's (a llama.cpp or "
                              "gguf-writer change?); the adapter would train on other inputs than the edge's")
        hidden_train = edge_hidden_states(probe, split, data.train, threads, areq.progress, "h_K of training text",
                                          hidden_via="auto")
        hidden_held = edge_hidden_states(probe, split, data.heldout, threads, areq.progress,
                                         "h_K of held-out text", hidden_via="auto")
    finally:
        probe.unlink(missing_ok=True)
    hk_seconds = round(time.time() - t0, 1)
    result = train_adapter(src, split, cfg, data, hidden_train, hidden_held, areq.seed, log=log,
                           progress=areq.progress, torch_threads=areq.threads)
    result.info.update({"hidden_seconds": hk_seconds, "cache_key": key, "blocks": cfg.blocks,
                        "init_layers": init_layers(src.spec, split, cfg), "seed": areq.seed,
                        "recipe": cfg.key_dict(), "data_key": data.key})
    save_cached(key, result)
    return result, False


def hk_probe_gguf(src: Any, split: int, cfg: AdapterConfig, base: Path, out: Path) -> Path:
    """The file h_K of the calibration text is read from: the base edge GGUF's tensors byte for
    byte, plus the untrained adapter block(s) after block K-1 (F16).

    With the base file alone, block K-1 is the GGUF's last; llama.cpp keeps only output rows
    there, so reading h_K of every row makes every row an output row, each paying the 49k-row
    LM head (about 30% of the work at K=20). Here h_K is the input of block K, which llama.cpp
    hands over for every row (`LayerInputTap`), while no row needs logits. Same bytes for
    blocks [0, K), so the same h_K; the caller checks that on one sample."""
    from quantize.edge_gguf import write_edge_gguf

    float_path = out.with_name(out.name + ".float.tmp")
    try:
        write_edge_gguf(src, split, float_path, "F16", fingerprint=src.fingerprint(),
                        adapter_state=build_adapter(src, split, cfg).export_state(), adapter_blocks=cfg.blocks,
                        progress=False)
        splice_adapter_gguf(base, float_path, out)
    finally:
        float_path.unlink(missing_ok=True)
    return out


def splice_adapter_gguf(base: Path, with_adapter: Path, out: Path) -> None:
    """`with_adapter`'s metadata and adapter blocks, with every tensor the base file has
    (blocks [0, K), embeddings) taken byte for byte from the base: llama.cpp's mixed quant types
    (Q4_K_M, ...) choose per-layer types from the block count, and h_K must not change."""
    import gguf

    ra, rb = gguf.GGUFReader(with_adapter), gguf.GGUFReader(base)
    from_base = {t.name: t for t in rb.tensors if t.name != "output_norm.weight"}
    arch = str(ra.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(out), arch)
    for f in ra.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    tensors = [from_base.get(t.name, t) for t in ra.tensors]
    for t in tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        w.write_tensor_data(t.data)
    w.close()
