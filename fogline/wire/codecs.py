"""Hidden-state codecs: how h_K rows travel (numpy in, numpy out; no torch).

* fp32 — the reference, 4 bytes/value.
* fp16 — the default, 2 bytes/value; values beyond ±65504 are clipped.
* int8 — blockwise absmax (Petals-style): each row is cut into blocks of
  `block` values, each block sends one float32 scale (absmax/127) and int8
  codes; ~1.06 bytes/value at block 64.

A `HiddenFrame` is what goes on the wire; every frame names its codec, so the
two sides never have to agree on it in advance (the handshake only says which
codecs a server accepts).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fogline.wire.errors import BadFrame

FP16_MAX = 65504.0
INT8_BLOCK_DEFAULT = 64
MAX_BLOCK = 1 << 16


class Codec(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True, slots=True)
class HiddenFrame:
    """rows x dim hidden states in one codec; `scales` and `block` only for int8."""

    codec: Codec
    rows: int
    dim: int
    data: bytes
    scales: bytes = b""
    block: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.scales)


def encode_hidden(x: np.ndarray, codec: Codec | str = Codec.FP16, block: int = INT8_BLOCK_DEFAULT) -> HiddenFrame:
    """x: [rows, dim] (any float dtype) -> HiddenFrame. Raises ValueError on non-finite input."""
    codec = Codec(codec)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"hidden states must be [rows, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("hidden states contain NaN or inf")
    rows, dim = x.shape
    if codec is Codec.FP32:
        return HiddenFrame(codec, rows, dim, x.astype("<f4").tobytes())
    if codec is Codec.FP16:
        return HiddenFrame(codec, rows, dim, np.clip(x, -FP16_MAX, FP16_MAX).astype("<f2").tobytes())
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"int8 block size {block} is outside [1, {MAX_BLOCK}]")
    nb = -(-dim // block)
    padded = np.zeros((rows, nb * block), dtype=np.float32)
    padded[:, :dim] = x
    blocks = padded.reshape(rows, nb, block)
    scale = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float32)  # [rows, nb]
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(blocks / safe[..., None]), -127, 127).astype(np.int8)
    codes = q.reshape(rows, nb * block)[:, :dim]
    return HiddenFrame(codec, rows, dim, np.ascontiguousarray(codes).tobytes(), scale.astype("<f4").tobytes(), block)


def expected_sizes(codec: Codec, rows: int, dim: int, block: int) -> tuple[int, int]:
    """(data bytes, scale bytes) a valid frame of this shape must carry."""
    if codec is Codec.FP32:
        return rows * dim * 4, 0
    if codec is Codec.FP16:
        return rows * dim * 2, 0
    return rows * dim, rows * (-(-dim // block)) * 4


def decode_hidden(f: HiddenFrame) -> np.ndarray:
    """HiddenFrame -> float32 [rows, dim]. Raises BadFrame for any inconsistency."""
    try:
        codec = Codec(f.codec)
    except ValueError:
        raise BadFrame(f"unknown hidden-state codec {f.codec!r}") from None
    if codec is Codec.INT8 and not 1 <= f.block <= MAX_BLOCK:
        raise BadFrame(f"int8 block size {f.block} is outside [1, {MAX_BLOCK}]")
    want_data, want_scales = expected_sizes(codec, f.rows, f.dim, f.block)
    if len(f.data) != want_data or len(f.scales) != want_scales:
        raise BadFrame(f"{codec} payload of {len(f.data)}+{len(f.scales)} bytes does not hold "
                       f"{f.rows}x{f.dim} values (expected {want_data}+{want_scales})")
    if codec is Codec.FP32:
        x = np.frombuffer(f.data, dtype="<f4").reshape(f.rows, f.dim).astype(np.float32)
    elif codec is Codec.FP16:
        x = np.frombuffer(f.data, dtype="<f2").reshape(f.rows, f.dim).astype(np.float32)
    else:
        nb = -(-f.dim // f.block)
        codes = np.zeros((f.rows, nb * f.block), dtype=np.float32)
        codes[:, :f.dim] = np.frombuffer(f.data, dtype=np.int8).reshape(f.rows, f.dim)
        scale = np.frombuffer(f.scales, dtype="<f4").reshape(f.rows, nb)
        x = (codes.reshape(f.rows, nb, f.block) * scale[..., None]).reshape(f.rows, nb * f.block)[:, :f.dim]
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise BadFrame("hidden states contain NaN or inf")
    return x
