"""The deep layers [K, L) + final norm + LM head, in plain PyTorch (gpt-fast style).

The cloud shard keeps Hugging Face names and layout (`model.layers.{i}.self_attn.q_proj`
...), so it is an ordinary safetensors file; at load time q/k/v are fused into
one projection and gate/up into another (fewer, larger matmuls — on a small
model each op's fixed cost matters as much as its FLOPs).

The model owns no KV cache: each session brings its own `KVCache` (a block table
into a shared `KVPool`, cloud_runtime/kv_cache.py), and one forward pass can serve
several sessions at once (`forward_ragged`): norms, projections and the MLP run on
all their tokens together; the new keys of all sessions go into the pool with one
`index_copy_` per layer, and attention runs once per group of sessions with the
same query length (all decoding sessions together) as one masked SDPA, with
grouped-query attention done by SDPA itself (no repeat_interleave copies). The
plan of a pass (slots, masks, groups) is built once, not per layer.

`split=0` builds the whole model (with the token embedding): the benchmark's
K=0 case, and a handy reference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cloud_runtime.kv_cache import KVCache, KVPool
from fogline.arch import ArchSpec

log = logging.getLogger("fogline.cloud.model")


def rope_inv_freq(spec: ArchSpec) -> Tensor:
    """Inverse frequencies, with Llama-3 long-context scaling when configured."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = spec.rope_scaling
    if sc is None:
        return inv.float()
    factor = float(sc["factor"])
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Exactly Hugging Face's LlamaRMSNorm: normalise in float32, scale in the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class Block(nn.Module):
    """One decoder layer with fused projections.

    wqkv: [(H + 2*Hkv) * hd, D] = cat(q_proj, k_proj, v_proj); w13: [2*I, D] = cat(gate, up).
    """

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        d, hd, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
        self.wqkv = nn.Linear(d, (spec.n_heads + 2 * spec.n_kv_heads) * hd, bias=spec.qkv_bias)
        self.wo = nn.Linear(spec.n_heads * hd, d, bias=False)
        self.w13 = nn.Linear(d, 2 * i, bias=False)
        self.w2 = nn.Linear(i, d, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.mlp_norm = nn.Parameter(torch.ones(d))


class PackedLinear(nn.Module):
    """nn.Linear with its weight in oneDNN's blocked layout (see DeepModel.prepack_linears).

    Calls the oneDNN linear op directly (torch.utils.mkldnn.MkldnnLinear is a deprecated
    TorchScript module with more per-call overhead); inputs are dense 2-D rows.
    keep_dense_gemv: also keep the dense weight and use it for single-row inputs. Measured
    (tools/bench_cloud.py part c, 1 thread): for the deep layers' shapes MKL's single-row
    F.linear runs at ~31-36 GFLOP/s and oneDNN's at ~13-29, while from 16 rows up oneDNN
    wins 1.3-2x; for the LM head oneDNN wins at every row count. Costs a second copy of
    that weight."""

    def __init__(self, dense: nn.Linear, keep_dense_gemv: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        bias = dense.bias.detach() if dense.bias is not None else torch.zeros(dense.out_features)
        self.register_buffer("weight", dense.weight.detach().float().to_mkldnn())
        self.register_buffer("bias", bias.float().to_mkldnn())
        self.dense_weight = dense.weight.detach() if keep_dense_gemv else None
        self.dense_bias = dense.bias.detach() if dense.bias is not None else None  # small: always kept

    def forward(self, x: Tensor) -> Tensor:  # [N, I] -> [N, O]
        if self.dense_weight is not None and x.shape[0] == 1:
            return F.linear(x, self.dense_weight, self.dense_bias)
        return torch._C._nn.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias).to_dense()

    def keep_dense(self) -> Tensor:
        """The dense weight for single-row steps, rebuilt from the oneDNN copy if it was dropped
        (the LM head's, when `DeepModel.enable_fast_gemv` needs it)."""
        if self.dense_weight is None:
            self.dense_weight = self.weight.to_dense()
        return self.dense_weight


@dataclass
class Segment:
    """A run of consecutive positions of one session: h_K rows to push through."""

    hidden: Tensor  # [T, D]
    cache: KVCache
    start: int  # position of hidden[0]; equals cache.length (or a later segment of the same cache)


class DeepModel(nn.Module):
    def __init__(self, spec: ArchSpec, split: int) -> None:
        super().__init__()
        if split != 0:
            spec.check_split(split)
        self.spec, self.split = spec, split
        self.layers = nn.ModuleList(Block(spec) for _ in range(split, spec.n_layers))
        self.norm = nn.Parameter(torch.ones(spec.hidden_size))
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # split=0: the whole model, so it also needs the token embedding.
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size) if split == 0 else None
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)
        self._gemv: Any = None  # compiled single-row matmul, see enable_fast_gemv()
        self._kv_pool: KVPool | None = None

    @property
    def n_deep(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype  # a plain tensor even when the linears are prepacked

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def prepack_linears(self) -> bool:
        """Swap every linear for oneDNN's with its weight prepacked in oneDNN's blocked layout.

        Measured on this project's 2-core EPYC (1 thread): the LM head's single-row matmul
        [1, 576] x [576, 49152] takes 15.0 ms through F.linear (MKL) and 4.8 ms prepacked;
        64 rows 75 -> 47 ms; the deep layers' matmuls gain up to 2x at 8-64 rows. CPU and
        float32 only; checked against F.linear first, returns False (dense stays) if it
        disagrees or oneDNN is missing. The deep layers keep their dense weights too, for
        single-row steps (see PackedLinear); the LM head's are dropped.
        """
        if self.device.type != "cpu" or self.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return False
        try:
            with torch.no_grad():
                probe = self.lm_head
                packed = PackedLinear(probe)
                x = torch.randn(3, probe.in_features)
                ref = F.linear(x, probe.weight)
                if not torch.allclose(packed(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
                    log.warning("oneDNN linear disagrees with F.linear; keeping dense weights")
                    return False
                for layer in self.layers:
                    for name in ("wqkv", "wo", "w13", "w2"):
                        setattr(layer, name, PackedLinear(getattr(layer, name), keep_dense_gemv=True))
                self.lm_head = packed
        except (RuntimeError, TypeError) as e:  # a torch built without oneDNN kernels for this CPU
            log.warning("oneDNN prepacking unavailable: %s", str(e).splitlines()[0][:200])
            return False
        self._gemv = None
        return True

    @property
    def kv_pool(self) -> KVPool:
        """The pool every `new_cache()` draws from (made on first use, grows on demand)."""
        if self._kv_pool is None:
            self._kv_pool = KVPool(self.n_deep, self.spec.n_kv_heads, self.spec.head_dim, self.dtype, self.device)
        return self._kv_pool

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty session cache from the model's pool, with room for `capacity` positions."""
        cache = self.kv_pool.new_cache()
        cache.reserve(capacity)
        return cache

    def kv_bytes_per_position(self) -> int:
        return 2 * self.n_deep * self.spec.n_kv_heads * self.spec.head_dim * torch.finfo(self.dtype).bits // 8

    def load_shard(self, tensors: dict[str, Tensor]) -> None:
        """Load HF-named tensors (`model.layers.{i}...` with the source's layer index)."""
        spec = self.spec
        mapped: dict[str, Tensor] = {}
        per_layer: dict[int, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            if name.startswith("model.layers."):
                idx, rest = name[len("model.layers."):].split(".", 1)
                if int(idx) >= self.split:
                    per_layer.setdefault(int(idx) - self.split, {})[rest] = t
            elif name == "model.norm.weight":
                mapped["norm"] = t
            elif name == "lm_head.weight":
                mapped["lm_head.weight"] = t
            elif name == "model.embed_tokens.weight" and self.embed_tokens is not None:
                mapped["embed_tokens.weight"] = t
        if self.embed_tokens is not None and "lm_head.weight" not in mapped and "embed_tokens.weight" in mapped:
            mapped["lm_head.weight"] = mapped["embed_tokens.weight"]  # tied embeddings
        for li, w in per_layer.items():
            try:
                mapped[f"layers.{li}.wqkv.weight"] = torch.cat(
                    [w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]])
                if spec.qkv_bias:
                    mapped[f"layers.{li}.wqkv.bias"] = torch.cat(
                        [w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"]])
                mapped[f"layers.{li}.wo.weight"] = w["self_attn.o_proj.weight"]
                mapped[f"layers.{li}.w13.weight"] = torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]])
                mapped[f"layers.{li}.w2.weight"] = w["mlp.down_proj.weight"]
                mapped[f"layers.{li}.attn_norm"] = w["input_layernorm.weight"]
                mapped[f"layers.{li}.mlp_norm"] = w["post_attention_layernorm.weight"]
            except KeyError as e:
                raise ValueError(f"cloud shard mismatch: layer {li + self.split} lacks {e.args[0]}") from None
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(f"cloud shard mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")

    def _linears(self) -> list[nn.Linear | PackedLinear]:
        return [m for m in self.modules() if isinstance(m, (nn.Linear, PackedLinear))]

    def enable_fast_gemv(self) -> bool:
        """Single-row matmuls (one session decoding one token) as a compiled fused multiply-reduce.

        MKL's sgemv streams the weights at roughly half the memory bandwidth an inductor
        reduction loop reaches on CPUs like this one, and single-token decode is bound
        by exactly that stream. One compile per distinct weight shape (5 for a Llama),
        checked against F.linear; returns False (eager stays) when compiling fails.
        With prepacked linears (the float32 CPU default) steps of two rows or more keep
        oneDNN; single rows use the dense weights, the LM head's rebuilt from its oneDNN copy
        (a second copy of it, 113 MB for SmolLM2-135M).
        """
        if self.device.type != "cpu":
            return False  # on GPUs cuBLAS' gemv is already at memory speed
        try:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            fn = torch.compile(_gemv, dynamic=False, fullgraph=True)
            weights = [_dense_weight_bias(m)[0] for m in self._linears()]
            shapes = {(tuple(w.shape), w.dtype): w for w in weights}
            with torch.inference_mode():
                for w in shapes.values():
                    x = torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)
                    ref = F.linear(x, w)
                    if not torch.allclose(fn(x, w).float(), ref.float(), rtol=1e-2, atol=1e-3 * float(ref.abs().max())):
                        log.warning("compiled gemv disagrees with F.linear for %s; not using it", tuple(w.shape))
                        return False
        except Exception as e:  # no C++ compiler, unsupported device, ...
            log.warning("fast gemv unavailable: %s", str(e).splitlines()[0][:200])
            return False
        self._gemv = fn
        return True

    @property
    def fast_gemv(self) -> bool:
        """Whether single-row steps use the compiled matmul (`enable_fast_gemv` succeeded)."""
        return self._gemv is not None

    def _lin(self, x: Tensor, lin: nn.Linear | PackedLinear) -> Tensor:
        if self._gemv is not None and x.shape[0] == 1:
            w, b = _dense_weight_bias(lin)
            y = self._gemv(x, w)
            return y if b is None else y + b
        return lin(x if isinstance(lin, nn.Linear) else x.contiguous())  # oneDNN wants dense rows

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]  # [N, 1, hd]

    @torch.inference_mode()
    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids [T] -> h_0 [T, D] (whole model only)."""
        if self.embed_tokens is None:
            raise RuntimeError("embed() needs a whole model (split=0)")
        return self.embed_tokens(tokens)

    @torch.inference_mode()
    def forward_ragged(self, segments: list[Segment]) -> Tensor:
        """Push each segment through the deep layers, extending its cache.

        Returns the final-normed hidden states [sum T, D] in segment order; apply
        `logits()` to the rows you need (usually the last of each segment).
        Norms, projections and the MLP run on all rows at once; attention runs once per
        group of segments with the same query length (and pool), as one masked SDPA over
        the group's keys read from the pool. Segments of the same cache must come in
        position order (a later one sees the earlier one's keys).
        """
        spec = self.spec
        hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        eps = spec.rms_norm_eps
        plan = _plan(segments, self.device)
        x = torch.cat([s.hidden.to(self.device, self.dtype) for s in segments], dim=0)  # [N, D]
        if plan.perm is not None:
            x = x.index_select(0, plan.perm)  # rows of one group next to each other
        cos, sin = self._rope(plan.positions)  # [N, 1, hd]
        n_qk = (nh + nkv) * hd
        for li, layer in enumerate(self.layers):
            qkv = self._lin(rms_norm(x, layer.attn_norm, eps), layer.wqkv)  # [N, (H+2Hkv)*hd]
            qk = qkv[:, :n_qk].view(-1, nh + nkv, hd)
            qk = qk * cos + rotate_half(qk) * sin  # rope on q and k in one go
            q = qk[:, :nh]  # [N, H, hd]
            for g in plan.groups:  # every group's new keys first: a later segment of a cache sees them
                g.pool.k[li].index_copy_(0, g.write, qk[g.rows, nh:])
                g.pool.v[li].index_copy_(0, g.write, qkv[g.rows, n_qk:].view(-1, nkv, hd))
            outs = []
            for g in plan.groups:
                pk, pv = g.pool.k[li], g.pool.v[li]  # [slots, Hkv, hd]
                if isinstance(g.read, int):  # one session in consecutive slots: a view, no gather
                    k = pk[g.read:g.read + g.kv_len].unsqueeze(0)
                    v = pv[g.read:g.read + g.kv_len].unsqueeze(0)
                else:
                    k = pk.index_select(0, g.read).view(g.b, g.kv_len, nkv, hd)
                    v = pv.index_select(0, g.read).view(g.b, g.kv_len, nkv, hd)
                o = F.scaled_dot_product_attention(q[g.rows].view(g.b, g.t, nh, hd).transpose(1, 2),
                                                   k.transpose(1, 2), v.transpose(1, 2), attn_mask=g.mask,
                                                   enable_gqa=nkv != nh)  # [B, H, T, hd]
                outs.append(o.transpose(1, 2).reshape(g.b * g.t, nh * hd))
            x = x + self._lin(outs[0] if len(outs) == 1 else torch.cat(outs, dim=0), layer.wo)
            gate, up = self._lin(rms_norm(x, layer.mlp_norm, eps), layer.w13).chunk(2, dim=-1)
            x = x + self._lin(F.silu(gate) * up, layer.w2)
        for s in segments:
            s.cache.length = max(s.cache.length, s.start + s.hidden.shape[0])
        out = rms_norm(x, self.norm, eps)
        if plan.perm is not None:
            out = torch.empty_like(out).index_copy_(0, plan.perm, out)  # back to segment order
        return out

    @torch.inference_mode()
    def logits(self, normed: Tensor) -> Tensor:
        """[R, D] -> float32 [R, V]."""
        return self._lin(normed, self.lm_head).float()


def _dense_weight_bias(lin: nn.Linear | PackedLinear) -> tuple[Tensor, Tensor | None]:
    """The dense [O, I] weight (and bias) a single-row step multiplies by."""
    if isinstance(lin, PackedLinear):
        return lin.keep_dense(), lin.dense_bias
    return lin.weight, lin.bias


def _gemv(x: Tensor, w: Tensor) -> Tensor:
    """[1, I] x [O, I] -> [1, O], written as a reduction so inductor streams w once."""
    return (x[:, None, :] * w[None]).sum(-1)


@dataclass
class _Group:
    """Segments of one pool with the same query length T, attended to in one SDPA call."""

    pool: KVPool
    rows: slice  # their rows in the (permuted) pass
    b: int  # segments
    t: int  # query rows per segment
    kv_len: int  # keys per segment, padded to the longest
    write: Tensor  # [B*T] pool slots of the new rows
    read: Tensor | int  # [B*kv_len] pool slots to gather, or the first slot of one contiguous session
    mask: Tensor | None  # [B, 1, T, kv_len] bool (True: attend), None when every key counts


@dataclass
class _Plan:
    positions: Tensor  # [N] position of each (permuted) row
    perm: Tensor | None  # permuted row -> original row, None when the order is unchanged
    groups: list[_Group]


def _plan(segments: list[Segment], device: torch.device) -> _Plan:
    """Once per pass (not per layer): reserve blocks, group segments, build slots and masks."""
    by_key: dict[tuple[int, int], list[int]] = {}
    starts: list[int] = []
    off = 0
    for i, s in enumerate(segments):
        n = s.hidden.shape[0]
        s.cache.reserve(s.start + n)
        by_key.setdefault((id(s.cache.pool), n), []).append(i)
        starts.append(off)
        off += n
    order: list[int] = []
    groups: list[_Group] = []
    positions: list[Tensor] = []
    row = 0
    for (_pool, t), members in by_key.items():
        segs = [segments[i] for i in members]
        ends = [s.start + t for s in segs]
        kv_len = max(ends)
        write = torch.cat([s.cache.slots(s.start, s.start + t) for s in segs])
        read: Tensor | int | None = None
        if len(segs) == 1:
            read = segs[0].cache.contiguous_from(kv_len)
        if read is None:
            # positions past a segment's end read its own position 0: valid data, masked out
            # (the pool is uninitialised memory, and 0 x NaN would leak through the mask)
            read = torch.cat([s.cache.slots(0, e) if e == kv_len else
                              torch.cat([s.cache.slots(0, e), s.cache.slots(0, 1).expand(kv_len - e)])
                              for s, e in zip(segs, ends)]).to(device)
        mask = None
        if t > 1 or len(segs) > 1:
            q_pos = torch.tensor([s.start for s in segs])[:, None] + torch.arange(t)[None, :]  # [B, T]
            mask = (torch.arange(kv_len)[None, None, :] <= q_pos[:, :, None])[:, None].to(device)
        groups.append(_Group(segs[0].cache.pool, slice(row, row + len(segs) * t), len(segs), t, kv_len,
                             write.to(device), read, mask))
        for i, s in zip(members, segs):
            order.extend(range(starts[i], starts[i] + t))
            positions.append(torch.arange(s.start, s.start + t))
        row += len(segs) * t
    perm = None if order == list(range(row)) else torch.tensor(order, device=device)
    return _Plan(torch.cat(positions).to(device), perm, groups)


def load_deep_model(spec: ArchSpec, split: int, tensors: dict[str, Tensor],
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    prepack: bool = True) -> DeepModel:
    """Build the model for layers [split, L) from HF-named tensors (split=0: the whole model).

    prepack: on CPU in float32, use oneDNN prepacked linears (`DeepModel.prepack_linears`)."""
    with torch.device("meta"):
        model = DeepModel(spec, split)
    model = model.to_empty(device=device)
    model.load_shard({k: v.to(dtype) for k, v in tensors.items()})
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    model.inv_freq = rope_inv_freq(spec).to(device)  # rope angles stay float32 under bf16
    if prepack:
        model.prepack_linears()
    return model


def describe(model: DeepModel) -> dict[str, Any]:
    return {"layers": [model.split, model.spec.n_layers], "dtype": str(model.dtype),
            "params": sum(p.numel() for p in model.parameters())}
