"""Device-budget estimates against real files and a measured RSS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fogline.arch import ArchSpec
from fogline.errors import BudgetError, ConfigError
from fogline.manifest import load_manifest
from quantize import budget


@pytest.fixture(scope="module")
def spec(demo_source) -> ArchSpec:
    return demo_source.spec


@pytest.mark.parametrize("bundle_name", ["demo_bundle", "demo_bundle_k10_q4"])
def test_file_size_estimate_matches_the_real_gguf(request, spec, bundle_name):
    root = request.getfixturevalue(bundle_name)
    m = load_manifest(root / "edge")
    actual = (root / "edge" / "edge.gguf").stat().st_size
    est = budget.gguf_bytes(spec, m.split, m.quant)
    assert abs(est - actual) / actual < 0.10, (est, actual)


_RSS_PROBE = r"""
import json, sys, psutil
from edge_runtime.llama_backend import LlamaModel, LlamaContext, BatchRow
from quantize.budget import RuntimeShape
shape = RuntimeShape()
m = LlamaModel(sys.argv[1])
ctx = LlamaContext(m, n_ctx=shape.n_ctx, n_batch=shape.n_batch, n_seq=shape.n_seq, tap_layer=m.n_layer - 1)
ctx.decode([BatchRow(100 + i, i, 0, i == shape.n_batch - 1) for i in range(shape.n_batch)], capture_hidden=True)
for s in range(1, shape.n_seq):
    ctx.decode([BatchRow(100, 0, s, True)])
print(json.dumps({"rss": psutil.Process().memory_info().rss}))
"""


@pytest.mark.parametrize("bundle_name", ["demo_bundle", "demo_bundle_k10_q4"])
def test_resident_estimate_matches_measured_rss(request, spec, bundle_name, subprocess_env):
    root = request.getfixturevalue(bundle_name)
    m = load_manifest(root / "edge")
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(root / "edge" / "edge.gguf")],
                         capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])["rss"]
    est = budget.resident_bytes(spec, m.split, m.quant)
    assert 0.7 < est / rss < 1.3, f"estimate {est / budget.MiB:.0f} MiB vs measured {rss / budget.MiB:.0f} MiB"


def test_choice_prefers_deep_split_at_good_precision(spec):
    big = budget.choose(spec, 4 * budget.GiB, None, None)
    assert big.split == max(budget.split_grid(spec)) and big.quant == "F16"
    tight = budget.choose(spec, 400 * budget.MiB, None, None)
    chosen = next(c for c in tight.table if (c.split, c.quant) == (tight.split, tight.quant))
    assert chosen.fits and chosen.resident_bytes <= 400 * budget.MiB
    assert "MiB" in tight.reason and "<- chosen" in budget.format_table(tight)


def test_nothing_fits_is_a_budget_error(spec):
    with pytest.raises(BudgetError, match="nothing fits"):
        budget.choose(spec, 30 * budget.MiB, None, None)


@pytest.mark.parametrize("text,value", [("1.5GiB", int(1.5 * 2**30)), ("800MiB", 800 * 2**20),
                                        ("2GB", 2 * 10**9), ("512M", 512 * 10**6)])
def test_parse_size(text, value):
    assert budget.parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ConfigError):
        budget.parse_size("lots")


@pytest.mark.slow
def test_cli_device_preset_prints_table_and_reason(demo_hf_dir, tmp_path, capsys):
    from fogline.cli import main

    out = tmp_path / "pi"
    assert main(["export", "--source", str(demo_hf_dir), "--device", "rpi-zero-2w", "--split", "auto",
                 "--out", str(out), "--no-progress", "--exit-adapter", "0"]) == 0
    text = capsys.readouterr().out
    assert "resident MiB" in text and "<- chosen" in text and "chose K=" in text
    m = load_manifest(out / "edge")
    assert m.budget is not None and m.budget["estimated_resident_bytes"] <= m.budget["budget_bytes"]


def test_small_board_falls_back_to_a_smaller_runtime_shape(spec):
    """256 MiB holds no candidate at the daemon's defaults; one sequence with small batches does."""
    with pytest.raises(BudgetError):
        budget._choose(spec, 256 * budget.MiB, None, None, 0, budget.DEFAULT_SHAPE)
    c = budget.choose(spec, 256 * budget.MiB, None, None)
    assert c.shape == budget.SMALL_BOARD_SHAPE and "parallel=1" in c.reason
