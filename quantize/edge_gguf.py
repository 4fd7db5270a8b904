"""Write the edge half as an F32/F16 GGUF with the `gguf` package.

Layers [0, K) (+ optional exit-adapter blocks after them), the token
embedding, final norm and LM head, and the tokenizer + chat template, so that
llama.cpp can tokenize, template and run it on its own. Quantized types are
made from this file by llama.cpp's own quantizer (quantize/llama_quant.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fogline.arch import ArchSpec
from fogline.errors import ExportError
from quantize.source import SourceModel

FOGLINE_SPLIT_KEY = "fogline.split"
FOGLINE_FINGERPRINT_KEY = "fogline.fingerprint"
FOGLINE_ADAPTER_KEY = "fogline.exit_adapter_blocks"

_LAYER_MAP = {  # HF suffix -> GGUF suffix
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_for_llama_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF stores q/k rows in rotate-half order; llama.cpp's llama arch wants them interleaved."""
    out = w.shape[0]
    return (w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(spec: ArchSpec) -> np.ndarray | None:
    """Per-frequency divisors llama.cpp reads from `rope_freqs.weight` for llama3 scaling."""
    if spec.rope_scaling is None:
        return None
    from cloud_runtime.deep_model import rope_inv_freq  # same math as the cloud

    import dataclasses
    base = rope_inv_freq(dataclasses.replace(spec, rope_scaling=None))
    scaled = rope_inv_freq(spec)
    return (base / scaled).numpy().astype(np.float32)


def layer_tensors(spec: ArchSpec, state: dict[str, torch.Tensor], src_layer: int, dst_layer: int,
                  prefix: str = "model.layers.") -> list[tuple[str, np.ndarray]]:
    out = []
    for hf_suffix, gg_suffix in _LAYER_MAP.items():
        key = f"{prefix}{src_layer}.{hf_suffix}"
        if key not in state:
            if hf_suffix.endswith(".bias"):
                continue
            raise ExportError(f"source lacks {key}")
        w = state[key].float().numpy()
        if spec.gguf_arch == "llama" and hf_suffix.startswith("self_attn.q_proj"):
            w = permute_for_llama_rope(w, spec.n_heads)
        elif spec.gguf_arch == "llama" and hf_suffix.startswith("self_attn.k_proj"):
            w = permute_for_llama_rope(w, spec.n_kv_heads)
        out.append((f"blk.{dst_layer}.{gg_suffix}", w))
    return out


def write_edge_gguf(src: SourceModel, split: int, path: Path, ftype: str = "F16", *,
                    fingerprint: str, adapter_state: dict[str, torch.Tensor] | None = None,
                    adapter_blocks: int = 0, progress: bool = True) -> None:
    """Write blocks [0, K) + `adapter_blocks` adapter blocks as one GGUF.

    `adapter_state` holds HF-named tensors `adapter.layers.{j}.*`, `adapter.norm.weight`.
    """
    import gguf

    spec = src.spec
    if ftype not in ("F32", "F16"):
        raise ExportError(f"the gguf writer writes F32 or F16, not {ftype}")
    float_dtype = np.float16 if ftype == "F16" else np.float32
    n_blocks = split + adapter_blocks
    w = gguf.GGUFWriter(str(path), spec.gguf_arch)
    w.add_name(f"fogline edge K={split}")
    w.add_block_count(n_blocks)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim * spec.n_heads != spec.hidden_size:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "F16" else gguf.LlamaFileType.ALL_F32)
    w.add_uint32(FOGLINE_SPLIT_KEY, split)
    w.add_uint32(FOGLINE_ADAPTER_KEY, adapter_blocks)
    w.add_string(FOGLINE_FINGERPRINT_KEY, fingerprint)
    _add_tokenizer(w, src)

    def put(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        w.add_tensor(name, arr.astype(np.float32 if arr.ndim == 1 else float_dtype))

    put("token_embd.weight", src.state["model.embed_tokens.weight"].numpy())
    for i in range(split):
        for name, arr in layer_tensors(spec, src.state, i, i):
            put(name, arr)
    if adapter_blocks:
        assert adapter_state is not None
        for j in range(adapter_blocks):
            for name, arr in layer_tensors(spec, adapter_state, j, split + j, prefix="adapter.layers."):
                put(name, arr)
        put("output_norm.weight", adapter_state["adapter.norm.weight"].numpy())
    else:
        put("output_norm.weight", src.state["model.norm.weight"].numpy())
    if not spec.tie_word_embeddings:
        put("output.weight", src.lm_head().numpy())
    if (factors := llama3_rope_factors(spec)) is not None:
        put("rope_freqs.weight", factors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()


def _add_tokenizer(w: Any, src: SourceModel) -> None:
    if src.gguf_tokenizer_fields:
        for key, (value, types) in src.gguf_tokenizer_fields.items():
            w.add_key_value(key, value, types[0], types[-1] if len(types) > 1 else None)
        return
    _add_hf_tokenizer(w, src)


def detect_bpe_pre(src: SourceModel, tokenizer_json: dict[str, Any]) -> str:
    """Pick llama.cpp's pre-tokenizer name; export verifies it against HF tokenization."""
    if src.spec.model_type == "qwen2":
        return "qwen2"
    vocab = tokenizer_json.get("model", {}).get("vocab", {})
    if "<|begin_of_text|>" in vocab or any(t.get("content") == "<|begin_of_text|>"
                                          for t in tokenizer_json.get("added_tokens", [])):
        return "llama-bpe"
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if '"individual_digits": true' in pre:
        return "smollm"
    return "gpt-2"


def _add_hf_tokenizer(w: Any, src: SourceModel) -> None:
    import gguf

    tdir = src.tokenizer_dir
    tj_path = tdir / "tokenizer.json"
    if not tj_path.is_file():
        raise ExportError(f"{tdir} has no tokenizer.json (SentencePiece-only tokenizers are not supported)")
    tj = json.loads(tj_path.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer type {model.get('type')!r} is not supported (BPE only)")
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    n = max(src.spec.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = gguf.TokenType.NORMAL
    for content, t in added.items():
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(getattr(src, "tokenizer_pre", None) or detect_bpe_pre(src, tj))
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tdir, load_merges=True, n_vocab=n)
    special.add_to_gguf(w, quiet=True)
    cfg_path = tdir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "add_bos_token" in cfg:
            w.add_add_bos_token(bool(cfg["add_bos_token"]))
