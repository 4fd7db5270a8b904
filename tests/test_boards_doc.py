"""docs/boards.md quotes quantize/budget.py; these checks keep the quotes true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fogline.arch import ArchSpec
from quantize import budget as B

DOC = Path(__file__).resolve().parent.parent / "docs" / "boards.md"

# SmolLM2-135M-Instruct's architecture (the demo model), as its config.json gives it
DEMO = ArchSpec(model_type="llama", gguf_arch="llama", n_layers=30, hidden_size=576, intermediate_size=1536,
                n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                rope_scaling=None, max_position_embeddings=8192, tie_word_embeddings=True, qkv_bias=False)


def _rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            for preset in re.findall(r"`([a-z0-9-]+)`", line.split("|")[1]):
                rows[preset] = line
    return rows


@pytest.mark.parametrize("preset", list(B.DEVICES))
def test_demo_column_matches_the_budget(preset: str) -> None:
    row = _rows()[preset]
    budget, _ = B.device_budget(preset, None)
    choice = B.choose(DEMO, budget, None, None)
    resident = next(c.resident_bytes for c in choice.table if (c.split, c.quant) == (choice.split, choice.quant))
    demo_cell = row.split("|")[4].strip()
    small = "" if choice.shape == B.DEFAULT_SHAPE else " (parallel=1, batch 128)"
    assert demo_cell == f"K={choice.split} {choice.quant}, {resident / B.MiB:.0f} MiB{small}"


def test_demo_default_export_size_quoted() -> None:
    text = DOC.read_text()
    assert f"about **{round(B.resident_bytes(DEMO, 20, 'Q8_0') / B.MiB, -1):.0f} MiB resident**" in text
    assert f"{B.gguf_bytes(DEMO, 20, 'Q8_0') / B.MiB:.0f} MiB GGUF" in text
    kv_per_token = 20 * 2 * DEMO.n_kv_heads * DEMO.head_dim * 2
    assert f"{kv_per_token // 1024} KiB at the demo's K=20" in text
