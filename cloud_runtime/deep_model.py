"""The deep layers [K, L) + final norm + LM head, in plain PyTorch (gpt-fast style).

Weights keep Hugging Face names and layout (`model.layers.{i}.self_attn.q_proj`
...), so the cloud shard is an ordinary safetensors file. The model owns no KV
cache: each session brings its own `KVCache` (from the session store's
allocator), and one forward pass can serve several sessions at once
(`forward_ragged`): projections and MLP run on all their tokens together,
attention runs per session against that session's cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fogline.arch import ArchSpec


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.n_heads, self.n_kv, self.hd = spec.n_heads, spec.n_kv_heads, hd
        self.q_proj = nn.Linear(d, spec.n_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.n_heads * hd, d, bias=False)


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class KVCache:
    """One session's keys/values for the deep layers, grown in chunks.

    k, v: [n_deep_layers, n_kv_heads, capacity, head_dim]; `length` positions valid.
    """

    CHUNK = 256

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = CHUNK) -> None:
        self.k = torch.zeros(n_layers, n_kv, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = ((needed + self.CHUNK - 1) // self.CHUNK) * self.CHUNK
        pad = new_cap - self.capacity
        self.k = F.pad(self.k, (0, 0, 0, pad))
        self.v = F.pad(self.v, (0, 0, 0, pad))

    def truncate(self, length: int) -> None:
        self.length = min(self.length, max(0, length))


@dataclass
class Segment:
    """A run of consecutive positions of one session: h_K rows to push through."""

    hidden: Tensor  # [T, D]
    cache: KVCache
    start: int  # position of hidden[0]; must equal cache.length


class DeepModel(nn.Module):
    def __init__(self, spec: ArchSpec, split: int) -> None:
        super().__init__()
        spec.check_split(split)
        self.spec, self.split = spec, split
        self.layers = nn.ModuleList(Block(spec) for _ in range(split, spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)

    @property
    def n_deep(self) -> int:
        return len(self.layers)

    def new_cache(self, capacity: int = KVCache.CHUNK) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.n_deep, self.spec.n_kv_heads, self.spec.head_dim, p.dtype, p.device, capacity)

    def load_shard(self, tensors: dict[str, Tensor]) -> None:
        """Load HF-named tensors (`model.layers.{i}...` with the source's layer index)."""
        mapped: dict[str, Tensor] = {}
        for name, t in tensors.items():
            if name.startswith("model.layers."):
                idx, rest = name[len("model.layers."):].split(".", 1)
                mapped[f"layers.{int(idx) - self.split}.{rest}"] = t
            elif name == "model.norm.weight":
                mapped["norm.weight"] = t
            elif name == "lm_head.weight":
                mapped["lm_head.weight"] = t
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(f"cloud shard mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.lm_head.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def forward_ragged(self, segments: list[Segment]) -> Tensor:
        """Push each segment through the deep layers, extending its cache.

        Returns the final-normed hidden states [sum T, D] in segment order; apply
        `logits()` to the rows you need (usually the last of each segment).
        """
        dtype = self.lm_head.weight.dtype
        lens = [s.hidden.shape[0] for s in segments]
        x = torch.cat([s.hidden.to(dtype) for s in segments], dim=0)  # [N, D]
        positions = torch.cat([torch.arange(s.start, s.start + n, device=x.device)
                               for s, n in zip(segments, lens)])
        cos, sin = self._rope(positions)  # [N, hd]
        for s, n in zip(segments, lens):
            s.cache.reserve(s.start + n)
        hd, nh, nkv = self.spec.head_dim, self.spec.n_heads, self.spec.n_kv_heads
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(-1, nh, hd)
            k = attn.k_proj(h).view(-1, nkv, hd)
            v = attn.v_proj(h).view(-1, nkv, hd)
            q = q * cos[:, None] + rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + rotate_half(k) * sin[:, None]
            outs = []
            off = 0
            for s, n in zip(segments, lens):
                c, end = s.cache, s.start + n
                c.k[li, :, s.start:end] = k[off:off + n].transpose(0, 1)
                c.v[li, :, s.start:end] = v[off:off + n].transpose(0, 1)
                outs.append(_attend(q[off:off + n], c.k[li, :, :end], c.v[li, :, :end], s.start))
                off += n
            x = x + attn.o_proj(torch.cat(outs, dim=0))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for s, n in zip(segments, lens):
            s.cache.length = s.start + n
        return self.norm(x)

    def logits(self, normed: Tensor) -> Tensor:
        return self.lm_head(normed).float()


def _attend(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Causal attention of T new queries at positions [start, start+T) over S=start+T keys.

    q: [T, H, hd]; k, v: [Hkv, S, hd] -> [T, H*hd]
    """
    t, nh, hd = q.shape
    nkv = k.shape[0]
    qh = q.transpose(0, 1)  # [H, T, hd]
    if nkv != nh:
        k = k.repeat_interleave(nh // nkv, dim=0)
        v = v.repeat_interleave(nh // nkv, dim=0)
    if t == 1:
        out = F.scaled_dot_product_attention(qh, k, v)  # a single query sees every key
    else:
        s = k.shape[1]
        mask = torch.arange(s, device=q.device)[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask)
    return out.transpose(0, 1).reshape(t, nh * hd)


def load_deep_model(spec: ArchSpec, split: int, tensors: dict[str, Tensor],
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DeepModel:
    with torch.device("meta"):
        model = DeepModel(spec, split)
    model = model.to_empty(device=device)
    model.load_shard({k: v.to(dtype) for k, v in tensors.items()})
    model = model.to(dtype=dtype).eval()
    model.inv_freq = rope_inv_freq(spec).to(device)  # rope angles stay float32 under bf16
    return model


def describe(model: DeepModel) -> dict[str, Any]:
    return {"layers": [model.split, model.spec.n_layers], "dtype": str(model.lm_head.weight.dtype),
            "params": sum(p.numel() for p in model.parameters())}
