"""Shared fixtures: the demo model is exported once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The split the shared demo bundle uses; runtime tests build on it.
DEMO_SPLIT = 20


@pytest.fixture(scope="session")
def demo_source():
    """The demo model, dequantized once (about 15 s)."""
    from quantize.source import load_source

    src = load_source("demo")
    yield src
    src.close()


def export_demo(tmp_root: Path, source, split: int, quant: str, name: str | None = None) -> Path:
    from quantize.export import ExportRequest, run_export

    out = tmp_root / (name or f"demo-k{split}-{quant.lower()}")
    run_export(ExportRequest(source="demo", out=out, split=split, quant=quant, progress=False),
               log=lambda *_: None, source=source)
    return out


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory, demo_source) -> Path:
    """Export dir of the demo model at K=20, Q8_0 (has edge/ and cloud/)."""
    return export_demo(tmp_path_factory.mktemp("bundles"), demo_source, DEMO_SPLIT, "Q8_0")


@pytest.fixture(scope="session")
def demo_bundle_k10_q4(tmp_path_factory, demo_source) -> Path:
    """A second split and quant type: K=10, Q4_0."""
    return export_demo(tmp_path_factory.mktemp("bundles"), demo_source, 10, "Q4_0")


@pytest.fixture(scope="session")
def demo_bundle_f32(tmp_path_factory, demo_source) -> Path:
    """K=20 with an F32 edge: the split whose cloud/spec output must equal the full model's."""
    return export_demo(tmp_path_factory.mktemp("bundles"), demo_source, DEMO_SPLIT, "F32")


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture()
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def demo_hf_dir(tmp_path_factory, demo_source) -> Path:
    """The demo model saved as a normal Hugging Face directory (config.json + safetensors + tokenizer)."""
    from transformers import AutoTokenizer

    from quantize.verify import build_reference_model

    out = tmp_path_factory.mktemp("hf") / "smollm2-hf"
    build_reference_model(demo_source).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(demo_source.tokenizer_dir).save_pretrained(out)
    return out
