"""Device-budget choice of quantization type and split (Edge-LLM's adaptive quantization).

Estimates the edge's resident memory for each (K, quant type) candidate from
the architecture alone — GGUF bytes per tensor (with llama.cpp's K-quant
fallbacks for rows not divisible by 256), KV cache, compute buffers and the
runtime itself — and picks the candidate a device can hold. The estimates are
checked against a measured RSS in tests/test_budget.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fogline.arch import ArchSpec
from fogline.errors import BudgetError, ConfigError

MiB = 1 << 20
GiB = 1 << 30

# GGML type -> (block size, bytes per block)
_TYPE_SIZE = {
    "F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_K": (256, 176),
    "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_K": (256, 144), "Q4_1": (32, 20), "Q4_0": (32, 18),
    "Q3_K": (256, 110), "Q2_K": (256, 84), "IQ4_NL": (32, 18),
}
# llama.cpp falls back when a row length is not a multiple of 256.
_K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# file type -> (base tensor type, type for attn_v / ffn_down "more bits" half, output type)
_FTYPE_MIX = {
    "F32": ("F32", "F32", "F32"), "F16": ("F16", "F16", "F16"), "Q8_0": ("Q8_0", "Q8_0", "Q8_0"),
    "Q6_K": ("Q6_K", "Q6_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K", "Q6_K"), "Q5_0": ("Q5_0", "Q5_0", "Q6_K"),
    "Q4_K_M": ("Q4_K", "Q6_K", "Q6_K"), "Q4_1": ("Q4_1", "Q4_1", "Q6_K"), "Q4_0": ("Q4_0", "Q4_0", "Q6_K"),
    "Q3_K_M": ("Q3_K", "Q4_K", "Q6_K"), "Q2_K": ("Q2_K", "Q3_K", "Q6_K"),
}
PRECISION_ORDER = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K")
MIN_GOOD = "Q4_K_M"  # below this, prefer a shallower split over a coarser type

# Resident memory of the edge process without any model: Python, numpy, aiohttp,
# llama.cpp's libraries (measured on x86-64 with tools/measure; ARM is similar).
RUNTIME_OVERHEAD = 90 * MiB

# name -> (total RAM, note). The edge is allowed half of it: the OS, the app using
# the assistant and the page cache need the rest.
DEVICES = {
    "rpi-zero-2w": (512 * MiB, "Raspberry Pi Zero 2 W, 512 MiB"),
    "rpi4-1gb": (1 * GiB, "Raspberry Pi 4, 1 GiB"),
    "rpi4-2gb": (2 * GiB, "Raspberry Pi 4, 2 GiB"),
    "rpi4-4gb": (4 * GiB, "Raspberry Pi 4, 4 GiB"),
    "rpi4-8gb": (8 * GiB, "Raspberry Pi 4, 8 GiB"),
    "rpi5-4gb": (4 * GiB, "Raspberry Pi 5, 4 GiB"),
    "rpi5-8gb": (8 * GiB, "Raspberry Pi 5, 8 GiB"),
    "jetson-nano-4gb": (4 * GiB, "Jetson Nano, 4 GiB shared CPU/GPU"),
    "jetson-orin-nano-8gb": (8 * GiB, "Jetson Orin Nano, 8 GiB shared CPU/GPU"),
    "jetson-agx-orin-64gb": (64 * GiB, "Jetson AGX Orin, 64 GiB shared CPU/GPU"),
}
DEVICE_SHARE = 0.5


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 1.5GiB or 800MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(value * base ** " KMGT".index(unit or " "))


def device_budget(device: str | None, device_memory: str | None) -> tuple[int, str] | None:
    if device_memory:
        return parse_size(device_memory), f"--device-memory {device_memory}"
    if device:
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
        total, note = DEVICES[device]
        return int(total * DEVICE_SHARE), f"{note}; fogline may use {DEVICE_SHARE:.0%}"
    return None


def _tensor_bytes(n_rows: int, row_len: int, ggml_type: str) -> int:
    if ggml_type in _K_FALLBACK and row_len % 256:
        ggml_type = _K_FALLBACK[ggml_type]
    block, size = _TYPE_SIZE[ggml_type]
    if row_len % block:
        block, size = _TYPE_SIZE["F16"]
    return n_rows * (row_len // block) * size


def gguf_bytes(spec: ArchSpec, n_blocks: int, quant: str) -> int:
    """Estimated size of an edge GGUF with `n_blocks` blocks quantized as `quant`."""
    base, more, out_t = _FTYPE_MIX[quant]
    d, hd, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_out, kv_out = spec.n_heads * hd, spec.n_kv_heads * hd
    total = 0
    for layer in range(n_blocks):
        # llama.cpp's *_M mixes give attn_v/ffn_down more bits in about half the layers
        vd = more if (layer < n_blocks / 8 or layer >= 7 * n_blocks / 8 or layer % 3 == 2) else base
        total += _tensor_bytes(q_out, d, base) + 2 * _tensor_bytes(kv_out, d, base)
        total += _tensor_bytes(kv_out, d, vd) - _tensor_bytes(kv_out, d, base)
        total += _tensor_bytes(d, q_out, base)
        total += 2 * _tensor_bytes(i, d, base) + _tensor_bytes(d, i, vd)
        total += 2 * d * 4
        if spec.qkv_bias:
            total += (q_out + 2 * kv_out) * 4
    total += _tensor_bytes(spec.vocab_size, d, out_t if spec.tie_word_embeddings else base)
    if not spec.tie_word_embeddings:
        total += _tensor_bytes(spec.vocab_size, d, out_t)
    total += d * 4 + 2 * MiB  # output norm, metadata and tokenizer
    return total


@dataclass(frozen=True)
class RuntimeShape:
    """The edge runtime settings the memory estimate assumes: the edge daemon's defaults.

    llama.cpp holds one KV cache of parallel x ctx_size cells and sizes its compute
    buffers for a full batch, so these three numbers move the estimate most.
    """

    n_ctx: int = 4 * 2048  # EdgeConfig.parallel x EdgeConfig.ctx_size
    n_seq: int = 4  # EdgeConfig.parallel
    n_batch: int = 512  # EdgeConfig.batch_size

    def describe(self) -> str:
        return f"parallel={self.n_seq} ctx_size={self.n_ctx // self.n_seq} batch_size={self.n_batch}"


DEFAULT_SHAPE = RuntimeShape()
# Tried when nothing fits at the defaults: one conversation at a time, small batches.
SMALL_BOARD_SHAPE = RuntimeShape(n_ctx=2048, n_seq=1, n_batch=128)


def resident_bytes(spec: ArchSpec, n_blocks: int, quant: str, shape: RuntimeShape = RuntimeShape()) -> int:
    weights = gguf_bytes(spec, n_blocks, quant)
    kv = shape.n_ctx * n_blocks * 2 * spec.n_kv_heads * spec.head_dim * 2  # f16 K and V
    # worst-case graph: a full ubatch of logits, activations and attention scores
    compute = shape.n_batch * (spec.vocab_size + 4 * spec.hidden_size + 2 * spec.intermediate_size
                               + spec.n_heads * min(shape.n_ctx, 4096)) * 4
    outputs = shape.n_seq * spec.vocab_size * 4
    return RUNTIME_OVERHEAD + weights + kv + compute + outputs


@dataclass(frozen=True)
class Candidate:
    split: int
    quant: str
    file_bytes: int
    resident_bytes: int
    fits: bool


@dataclass(frozen=True)
class Choice:
    split: int
    quant: str
    reason: str
    table: list[Candidate]
    shape: RuntimeShape = DEFAULT_SHAPE  # the edge settings the choice assumes


def split_grid(spec: ArchSpec) -> list[int]:
    L = spec.n_layers
    return sorted({max(1, round(L * f)) for f in (0.25, 1 / 3, 0.5, 0.6, 2 / 3)})


def choose(spec: ArchSpec, budget: int, split: int | None, quant: str | None,
           extra_blocks: int = 0) -> Choice:
    """Pick (K, quant) for a budget. Fixed values from the user are respected.

    Tries the edge daemon's default runtime shape first; if nothing fits, a
    small-board shape (one sequence, small batches) whose settings the reason names.
    """
    try:
        return _choose(spec, budget, split, quant, extra_blocks, DEFAULT_SHAPE)
    except BudgetError:
        return _choose(spec, budget, split, quant, extra_blocks, SMALL_BOARD_SHAPE)


def _choose(spec: ArchSpec, budget: int, split: int | None, quant: str | None, extra_blocks: int,
            shape: RuntimeShape) -> Choice:
    splits = [split] if split is not None else split_grid(spec)
    quants = [quant] if quant is not None else list(PRECISION_ORDER)
    table = []
    for k in splits:
        for q in quants:
            res = resident_bytes(spec, k + extra_blocks, q, shape)
            table.append(Candidate(k, q, gguf_bytes(spec, k + extra_blocks, q), res, res <= budget))
    fitting = [c for c in table if c.fits]
    if not fitting:
        smallest = min(table, key=lambda c: c.resident_bytes)
        raise BudgetError(f"nothing fits {budget / MiB:.0f} MiB: the smallest candidate (K={smallest.split}, "
                          f"{smallest.quant}) needs {smallest.resident_bytes / MiB:.0f} MiB "
                          f"even with {shape.describe()}")
    rank = {q: i for i, q in enumerate(PRECISION_ORDER)}
    good = [c for c in fitting if rank.get(c.quant, 0) <= rank[MIN_GOOD]] or fitting
    best = max(good, key=lambda c: (c.split, -rank.get(c.quant, 0)))
    why = (f"deepest split that fits at {MIN_GOOD} or better, then the highest precision"
           if best in good and good is not fitting else "highest precision that fits")
    if split is not None and quant is None:
        why = f"K={split} fixed; highest precision that fits"
    if quant is not None and split is None:
        why = f"{quant} fixed; deepest split that fits"
    if shape != DEFAULT_SHAPE:
        why += f"; only with edge settings {shape.describe()}"
    reason = (f"K={best.split} {best.quant}: {best.resident_bytes / MiB:.0f} MiB of "
              f"{budget / MiB:.0f} MiB budget ({why})")
    return Choice(best.split, best.quant, reason, table, shape)


def format_table(choice: Choice) -> str:
    lines = [f"{'K':>4} {'type':<8} {'file MiB':>9} {'resident MiB':>13}  fits"]
    for c in choice.table:
        mark = "  <- chosen" if (c.split, c.quant) == (choice.split, choice.quant) else ""
        lines.append(f"{c.split:>4} {c.quant:<8} {c.file_bytes / MiB:>9.1f} {c.resident_bytes / MiB:>13.1f}  "
                     f"{'yes' if c.fits else 'no'}{mark}")
    return "\n".join(lines)
