"""Architecture facts shared by the export pipeline and the cloud's deep model.

Reads a Hugging Face `config.json` dict (transformers 4.x `rope_theta` /
`rope_scaling`, or 5.x `rope_parameters`) into one frozen dataclass, and
rejects what fogline cannot split correctly. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fogline.errors import ExportError

# HF model_type -> (GGUF architecture, has q/k/v biases)
SUPPORTED = {
    "llama": ("llama", False),
    "mistral": ("llama", False),
    "qwen2": ("qwen2", True),
}


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # HF model_type
    gguf_arch: str  # llama.cpp architecture name
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None or the llama3 parameters
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ArchSpec":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise ExportError(f"unsupported architecture {mt!r}; fogline splits "
                              f"{', '.join(sorted(SUPPORTED))} models")
        gguf_arch, bias = SUPPORTED[mt]
        if mt in ("mistral", "qwen2"):
            sliding = cfg.get("sliding_window") if mt == "mistral" else (
                cfg.get("sliding_window") if cfg.get("use_sliding_window") else None)
            if sliding is not None and sliding < cfg.get("max_position_embeddings", 0):
                raise ExportError(f"{mt} with sliding-window attention ({sliding}) is not supported")
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind != "llama3":
                raise ExportError(f"rope scaling {kind!r} is not supported (only llama3)")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        spec = cls(
            model_type=mt,
            gguf_arch=gguf_arch,
            n_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bias or bool(cfg.get("attention_bias", False)),
        )
        if spec.hidden_act(cfg) != "silu":
            raise ExportError(f"activation {cfg.get('hidden_act')!r} is not supported (silu only)")
        return spec

    @property
    def block_macs(self) -> int:
        """Weight multiply-accumulates of one transformer block per token (attention over the context,
        which grows with it, not counted)."""
        d, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd
        return d * (q_out + 2 * kv_out) + q_out * d + 3 * d * i

    @property
    def head_macs(self) -> int:
        """The LM head's multiply-accumulates per row it scores."""
        return self.vocab_size * self.hidden_size

    @staticmethod
    def hidden_act(cfg: dict[str, Any]) -> str:
        return str(cfg.get("hidden_act", "silu"))

    def check_split(self, k: int) -> None:
        if not 1 <= k <= self.n_layers - 1:
            raise ExportError(f"split K={k} is outside [1, {self.n_layers - 1}] for a "
                              f"{self.n_layers}-layer model")
