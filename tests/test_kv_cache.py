"""The KV block pool and the batched attention over it (cloud_runtime/kv_cache.py,
DeepModel.forward_ragged), on a small random Llama (real torch, no checkpoint needed):
a pass over many sessions with mixed query lengths must give each session what it gets
alone, whatever blocks it was handed; prepacked oneDNN linears must agree with dense."""

from __future__ import annotations

import pytest

import torch

from cloud_runtime.deep_model import DeepModel, Segment
from cloud_runtime.kv_cache import KVPool, PoolExhausted
from fogline.arch import ArchSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_spec() -> ArchSpec:
    return ArchSpec(model_type="llama", gguf_arch="llama", n_layers=3, hidden_size=64, intermediate_size=128,
                    n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=97, rms_norm_eps=1e-5, rope_theta=10000.0,
                    rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=False, qkv_bias=False)


@pytest.fixture(scope="module")
def model() -> DeepModel:
    torch.manual_seed(0)
    m = DeepModel(tiny_spec(), 0).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def alone(model: DeepModel, h: torch.Tensor) -> torch.Tensor:
    """Every row of one session fed from position 0, in its own fresh pool."""
    pool = KVPool(model.n_deep, model.spec.n_kv_heads, model.spec.head_dim, model.dtype, model.device, n_blocks=1)
    return model.forward_ragged([Segment(h, pool.new_cache(), 0)])


def test_pool_hands_out_blocks_grows_and_takes_them_back():
    pool = KVPool(2, 1, 4, torch.float32, "cpu", block_size=4, n_blocks=2)
    a, b = pool.new_cache(), pool.new_cache()
    a.reserve(5)  # 2 blocks
    assert a.blocks == [0, 1] and a.capacity == 8 and a.nbytes() == 2 * pool.block_bytes
    assert a.bytes_for(9) == 3 * pool.block_bytes and a.bytes_for(3) == a.nbytes()
    pool.k[:, :8] = 7.0
    b.reserve(1)  # pool full: doubles, keeping a's contents
    assert pool.n_blocks == 4 and b.blocks == [2] and bool((pool.k[:, :8] == 7.0).all())
    assert a.contiguous_from(8) == 0 and a.slots(3, 6).tolist() == [3, 4, 5]
    a.release()
    assert a.blocks == [] and pool.free_blocks == 3
    c = pool.new_cache()
    c.reserve(4)
    assert c.blocks == [0]  # freed blocks come back lowest first
    fixed = KVPool(1, 1, 4, torch.float32, "cpu", block_size=4, n_blocks=1, growable=False)
    fixed.new_cache().reserve(4)
    with pytest.raises(PoolExhausted):
        fixed.new_cache().reserve(1)


def test_batched_pass_over_mixed_sessions_matches_each_alone(model):
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(20 + 3 * i, 64, generator=g) for i in range(6)]
    want = [alone(model, h) for h in hs]
    pool = KVPool(model.n_deep, model.spec.n_kv_heads, model.spec.head_dim, model.dtype, model.device,
                  block_size=4, n_blocks=2)
    caches = [pool.new_cache() for _ in hs]
    # prefills of different lengths, interleaved so that no session's blocks are consecutive
    for start, stop in ((0, 5), (5, 9)):
        out = model.forward_ragged([Segment(h[start:stop], c, start) for h, c in zip(hs, caches)])
        for i, w in enumerate(want):
            torch.testing.assert_close(out[i * (stop - start):(i + 1) * (stop - start)], w[start:stop])
    assert any(c.contiguous_from(9) is None for c in caches)
    # one pass: decode steps (T=1), a 3-row verify, a long tail, and two segments of one session
    segs = [Segment(hs[0][9:10], caches[0], 9), Segment(hs[1][9:10], caches[1], 9),
            Segment(hs[2][9:12], caches[2], 9), Segment(hs[3][9:], caches[3], 9),
            Segment(hs[4][9:10], caches[4], 9), Segment(hs[4][10:13], caches[4], 10),
            Segment(hs[5][9:10], caches[5], 9)]
    out = model.forward_ragged(segs)
    expect = torch.cat([want[0][9:10], want[1][9:10], want[2][9:12], want[3][9:], want[4][9:10],
                        want[4][10:13], want[5][9:10]])
    torch.testing.assert_close(out, expect)
    assert [c.length for c in caches] == [10, 10, 12, len(hs[3]), 13, 10]
    # a rolled-back draft is overwritten in place
    caches[2].truncate(10)
    out = model.forward_ragged([Segment(hs[2][10:11], caches[2], 10)])
    torch.testing.assert_close(out, want[2][10:11])


def test_prepacked_linears_agree_with_dense(model):
    import copy

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    packed = copy.deepcopy(model)
    assert packed.prepack_linears()
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    dense_logits = model.logits(alone(model, h))
    packed_logits = packed.logits(alone(packed, h))
    torch.testing.assert_close(packed_logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert packed.dtype == torch.float32 and not isinstance(packed.lm_head, torch.nn.Linear)


def test_fast_gemv_on_prepacked_linears_agrees_with_dense(model):
    """`--fast-gemv` on the float32 CPU default (prepacked oneDNN linears): single-row steps go
    through the compiled loop over the dense weights (the LM head's rebuilt), batches stay on
    oneDNN, and both agree with the dense model. It used to refuse here and serve eager."""
    import copy
    import shutil

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler for inductor")
    fast = copy.deepcopy(model)
    assert fast.prepack_linears() and fast.enable_fast_gemv()
    assert fast.lm_head.dense_weight is not None and not isinstance(fast.lm_head, torch.nn.Linear)
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast.logits(alone(fast, h)), model.logits(alone(model, h)), rtol=1e-4, atol=1e-4)
    pool = KVPool(fast.n_deep, fast.spec.n_kv_heads, fast.spec.head_dim, fast.dtype, fast.device, n_blocks=1)
    cache, rows = pool.new_cache(), []
    for i in range(h.shape[0]):  # one row at a time: the compiled path
        rows.append(fast.logits(fast.forward_ragged([Segment(h[i:i + 1], cache, i)])))
    torch.testing.assert_close(torch.cat(rows), model.logits(alone(model, h)), rtol=1e-4, atol=1e-4)
