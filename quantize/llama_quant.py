"""Quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`).

No home-made quantizer: the exact kernels the edge will run decide the format.
"""

from __future__ import annotations

import os
from pathlib import Path

from fogline.errors import ExportError

# Quant types offered to users, highest precision first (used by the budget chooser).
QUANT_TYPES = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K")


def ftype_of(name: str) -> int:
    import gguf

    key = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
    try:
        return int(gguf.LlamaFileType[key])
    except KeyError:
        raise ExportError(f"unknown quantization type {name!r}; choose one of {', '.join(QUANT_TYPES)}") from None


def quantize_gguf(src: Path, dst: Path, qtype: str, threads: int | None = None) -> None:
    """Write `dst` as `qtype` from an F32/F16 GGUF `src`."""
    import llama_cpp

    from edge_runtime.llama_backend import _init_backend

    _init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(qtype)
    params.nthread = threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama_model_quantize to {qtype} failed (code {rc})")
