"""Check an export against the source model before it is allowed to exist.

1. Tokenization: llama.cpp (edge GGUF) and the HF tokenizer (cloud files) give
   the same ids for a text with digits, punctuation, whitespace and unicode.
2. h_K: llama.cpp on the quantized edge GGUF, read through the same eval-callback
   tap the edge runtime uses, against the PyTorch reference on the float weights.
3. Cloud: the deep model loaded from the written shard, fed the reference h_K,
   reproduces the full model's next-token argmax at every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fogline.errors import VerificationError
from quantize.source import SourceModel

VERIFY_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "List three facts about the Moon, in 2 sentences or fewer. "
                                "Include its distance (384,400 km) and café-style trivia!"},
]
TOKENIZER_PROBE = ("Hello world!  It's 2026-11-21, 3.14159 × 42 = 131.95; naïve café, "
                   "日本語, emojis 🚀🔥, tabs\tand\nnewlines.  <|im_start|>user\nhi<|im_end|>")

# Tolerated relative error of h_K per edge quant type (quantization noise grows with depth).
H_TOLERANCE = {"F32": 0.01, "F16": 0.01, "Q8_0": 0.05, "Q6_K": 0.10, "Q5_K_M": 0.15, "Q5_0": 0.15,
               "Q4_K_M": 0.25, "Q4_1": 0.25, "Q4_0": 0.30, "Q3_K_M": 0.45, "Q2_K": 0.70}


@dataclass(frozen=True)
class Reference:
    """The full model's view of the verification prompt."""

    tokens: list[int]
    hidden: list[torch.Tensor]  # hidden[i]: residual stream after i blocks, [T, D]
    logits: torch.Tensor  # [T, V]


def build_reference_model(src: SourceModel) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(src.config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **cfg)
    # Built on the CPU (not the meta device) so non-persistent buffers such as the
    # rotary inv_freq are computed by transformers itself.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(src.state)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def verification_prompt_tokens(tokenizer: Any) -> list[int]:
    text = tokenizer.apply_chat_template(VERIFY_MESSAGES, tokenize=False, add_generation_prompt=True)
    text += "The Moon orbits Earth at about 384,400 km."
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@torch.inference_mode()
def compute_reference(src: SourceModel, tokens: list[int]) -> Reference:
    model = build_reference_model(src)
    out = model(torch.tensor([tokens]), output_hidden_states=True)
    return Reference(tokens=tokens, hidden=[h[0].float() for h in out.hidden_states],
                     logits=out.logits[0].float())


def check_tokenizer(edge_gguf: Path, tokenizer: Any) -> dict[str, Any]:
    from edge_runtime.llama_backend import LlamaModel

    model = LlamaModel(edge_gguf)
    try:
        ours = model.tokenize(TOKENIZER_PROBE, add_special=False, parse_special=True)
    finally:
        model.close()
    theirs = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids)
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise VerificationError(
            f"llama.cpp tokenizes differently from the HF tokenizer from token {first} on "
            f"({ours[first:first + 4]} vs {theirs[first:first + 4]}); the GGUF pre-tokenizer is wrong "
            "(try --tokenizer-pre)")
    return {"tokenizer_probe_tokens": len(ours), "tokenizer_match": True}


def edge_hidden(edge_gguf: Path, split: int, tokens: list[int], threads: int | None = None) -> np.ndarray:
    from edge_runtime.llama_backend import LlamaContext, LlamaModel, prefill

    model = LlamaModel(edge_gguf)
    try:
        ctx = LlamaContext(model, n_ctx=max(256, len(tokens) + 8), n_batch=max(64, len(tokens)),
                           n_threads=threads, tap_layer=split - 1)
        try:
            res = prefill(ctx, tokens, capture_hidden=True)
        finally:
            ctx.close()
    finally:
        model.close()
    assert res.hidden is not None
    return res.hidden


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@torch.inference_mode()
def check_cloud(spec: Any, split: int, shard: dict[str, torch.Tensor], ref: Reference) -> dict[str, Any]:
    from cloud_runtime.deep_model import Segment, load_deep_model

    deep = load_deep_model(spec, split, shard)
    cache = deep.new_cache()
    normed = deep.forward_ragged([Segment(hidden=ref.hidden[split], cache=cache, start=0)])
    logits = deep.logits(normed)
    ours, theirs = logits.argmax(-1), ref.logits.argmax(-1)
    agree = float((ours == theirs).float().mean())
    max_diff = float((logits - ref.logits).abs().max())
    if agree < 1.0:
        bad = int((ours != theirs).nonzero()[0, 0])
        raise VerificationError(f"cloud shard argmax differs from the full model at position {bad} "
                                f"({agree:.1%} agree, max |Δlogit| {max_diff:.3g})")
    return {"cloud_argmax_agreement": agree, "cloud_max_abs_logit_diff": max_diff,
            "positions": len(ref.tokens)}


def verify_export(src: SourceModel, split: int, quant: str, edge_gguf: Path,
                  shard: dict[str, torch.Tensor], tokenizer: Any, threads: int | None = None) -> dict[str, Any]:
    tokens = verification_prompt_tokens(tokenizer)
    ref = compute_reference(src, tokens)
    figures: dict[str, Any] = {"prompt_tokens": len(tokens)}
    figures.update(check_tokenizer(edge_gguf, tokenizer))
    h_edge = edge_hidden(edge_gguf, split, tokens, threads)
    h_ref = ref.hidden[split].numpy()
    if h_edge.shape != h_ref.shape:
        raise VerificationError(f"edge h_K has shape {h_edge.shape}, reference {h_ref.shape}")
    err = relative_error(h_edge, h_ref)
    tol = H_TOLERANCE.get(quant, 0.5)
    figures.update({"h_k_relative_error": err, "h_k_tolerance": tol})
    if not err <= tol:
        raise VerificationError(f"edge h_K relative error {err:.4f} exceeds the {quant} tolerance {tol}")
    figures.update(check_cloud(src.spec, split, shard, ref))
    return figures
