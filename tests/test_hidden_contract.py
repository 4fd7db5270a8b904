"""The contract with llama.cpp's compute graph that the edge reads h_K through.

If a llama-cpp-python upgrade renames `l_out-<i>`, changes its type or shape, or
stops offering it to the eval callback, these tests fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.llama_backend import BatchRow, LlamaContext, LlamaModel, prefill
from fogline.errors import HiddenStateContractError
from quantize.verify import compute_reference, relative_error, verification_prompt_tokens

REPO = Path(__file__).resolve().parent.parent


def test_installed_llama_cpp_is_the_pinned_version():
    import llama_cpp

    pins = set(re.findall(r'"llama-cpp-python==([0-9.]+)"', (REPO / "pyproject.toml").read_text()))
    assert pins == {llama_cpp.__version__}, f"pyproject pins {pins}, installed {llama_cpp.__version__}"


@pytest.fixture(scope="module")
def reference(demo_source):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_source.tokenizer_dir)
    tokens = verification_prompt_tokens(tok)
    return compute_reference(demo_source, tokens)


@pytest.fixture(scope="module")
def edge_model(demo_bundle):
    m = LlamaModel(demo_bundle / "edge" / "edge.gguf")
    yield m
    m.close()


@pytest.mark.parametrize("layer", [19, 12])  # the GGUF's last block, and a middle one
def test_tap_reads_the_residual_stream_after_layer(edge_model, reference, layer):
    ctx = LlamaContext(edge_model, n_ctx=256, n_batch=128, tap_layer=layer)
    try:
        res = prefill(ctx, reference.tokens, capture_hidden=True)
    finally:
        ctx.close()
    assert res.hidden is not None
    assert res.hidden.shape == (len(reference.tokens), 576) and res.hidden.dtype == np.float32
    # hidden[i] of the reference is the stream after i blocks; Q8_0 noise stays ~1 %.
    err = relative_error(res.hidden, reference.hidden[layer + 1].numpy())
    assert err < 0.05, err
    # and it is this layer's output, not a neighbour's: every other depth is further away
    others = {j: relative_error(res.hidden, h.numpy()) for j, h in enumerate(reference.hidden) if j != layer + 1}
    assert err < min(others.values()), others


def test_tap_across_several_decodes_and_sequences(edge_model, reference):
    """Rows come back in batch order, also when two sequences share one decode."""
    toks = reference.tokens[:24]
    ctx = LlamaContext(edge_model, n_ctx=256, n_batch=64, n_seq=2, tap_layer=19)
    try:
        rows = [BatchRow(t, i, 0, False) for i, t in enumerate(toks[:12])] + \
               [BatchRow(t, i, 1, i == 11) for i, t in enumerate(toks[:12])]
        both = ctx.decode(rows, capture_hidden=True)
        nxt = ctx.decode([BatchRow(toks[12], 12, 0, True)], capture_hidden=True)
    finally:
        ctx.close()
    assert both.hidden.shape == (24, 576) and both.logits.shape == (1, edge_model.n_vocab)
    np.testing.assert_allclose(both.hidden[:12], both.hidden[12:], rtol=1e-4, atol=1e-4)
    ref = reference.hidden[20].numpy()
    assert relative_error(both.hidden[:12], ref[:12]) < 0.05
    assert relative_error(nxt.hidden, ref[12:13]) < 0.05


def test_missing_graph_tensor_is_a_contract_error(edge_model, reference):
    ctx = LlamaContext(edge_model, n_ctx=128, n_batch=64, tap_layer=19)
    try:
        ctx.tap.name = b"l_out_renamed-19"  # what a renaming upgrade would look like
        with pytest.raises(HiddenStateContractError, match="never offered"):
            prefill(ctx, reference.tokens[:8], capture_hidden=True)
    finally:
        ctx.close()
