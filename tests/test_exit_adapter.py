"""Exit adapter + calibration in `fogline export`, on the real demo model.

Training uses a tiny budget (a few hundred positions) so the suite stays fast;
the quality targets are measured by tools/bench_exit.py, not here.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from fogline.cli import main as cli_main
from fogline.manifest import load_manifest, sha256_file
from tests.conftest import ADAPTER_BUDGET, ADAPTER_PROMPTS, ADAPTER_SELF_INSTRUCT, DEMO_SPLIT, export_adapter

BUDGET = ADAPTER_BUDGET


@pytest.fixture(scope="session")
def adapter_bundle(demo_bundle_adapter_run):
    """The production-path bundle from conftest (trained once per session), with its export log."""
    return demo_bundle_adapter_run


def _export(root: Path, source, calib: Path, name: str, log: list[str]) -> Path:
    return export_adapter(root, source, calib, name, log)


def _tensors(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def _run(gguf_path: Path, tokens: list[int], split: int) -> tuple[np.ndarray, np.ndarray]:
    """(h_K, logits) for every token, from llama.cpp."""
    from edge_runtime.llama_backend import LlamaContext, LlamaModel, prefill

    model = LlamaModel(gguf_path)
    try:
        ctx = LlamaContext(model, n_ctx=256, n_batch=128, tap_layer=split - 1)
        try:
            res = prefill(ctx, tokens, capture_hidden=True, all_logits=True)
        finally:
            ctx.close()
    finally:
        model.close()
    return res.hidden, res.logits


def test_adapter_changes_the_exit_but_not_h_k(adapter_bundle, demo_bundle):
    root, _ = adapter_bundle
    edge = load_manifest(root / "edge", role="edge")
    plain = load_manifest(demo_bundle / "edge", role="edge")
    assert edge.exit_adapter["blocks"] == 1 and edge.exit_adapter["gguf_blocks"] == DEMO_SPLIT + 1
    with_adapter, without = root / "edge" / "edge.gguf", demo_bundle / "edge" / "edge.gguf"
    r = gguf.GGUFReader(with_adapter)
    assert int(r.fields["llama.block_count"].contents()) == DEMO_SPLIT + 1
    assert int(r.fields["fogline.exit_adapter_blocks"].contents()) == 1
    # Blocks [0, K) and the embedding are byte-identical to the export without adapter.
    a, b = _tensors(with_adapter), _tensors(without)
    shared = [n for n in b if n != "output_norm.weight"]
    assert shared and all(a[n] == b[n] for n in shared)
    assert f"blk.{DEMO_SPLIT}.ffn_down.weight" in a and a["output_norm.weight"] != b["output_norm.weight"]
    # h_K read at l_out-{K-1} is identical; the exit distribution is not.
    from edge_runtime.llama_backend import LlamaModel

    m = LlamaModel(without)
    tokens = m.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
                        "The capital of France is Paris, a city on the Seine.", add_special=False)
    m.close()
    h_a, z_a = _run(with_adapter, tokens, DEMO_SPLIT)
    h_b, z_b = _run(without, tokens, DEMO_SPLIT)
    assert np.array_equal(h_a, h_b)
    assert edge.verification["h_k_identical_to_export_without_adapter"] is True
    assert edge.verification["h_k_relative_error"] == plain.verification["h_k_relative_error"]
    p_a = np.exp(z_a - z_a.max(-1, keepdims=True))
    p_a /= p_a.sum(-1, keepdims=True)
    p_b = np.exp(z_b - z_b.max(-1, keepdims=True))
    p_b /= p_b.sum(-1, keepdims=True)
    tv = 0.5 * np.abs(p_a - p_b).sum(-1)  # total variation per position
    assert tv.mean() > 0.1, tv


def test_manifest_calibration_is_reproduced_by_remeasuring(adapter_bundle, demo_source, calib_jsonl):
    from transformers import AutoTokenizer

    from quantize import calibrate as cal
    from quantize import exit_adapter as ea

    root, _ = adapter_bundle
    edge = load_manifest(root / "edge", role="edge")
    c = edge.calibration
    assert c is not None and c["positions"] > 0 and c["data"]["heldout_answers"] == 4  # 1 in 8 of 21 + 12
    assert c["data"]["prompt_source"] == f"file:{calib_jsonl.name}+self-instruct:{ADAPTER_SELF_INSTRUCT}"
    assert c["data"]["prompts"] == len(ADAPTER_PROMPTS) + ADAPTER_SELF_INSTRUCT
    tok = AutoTokenizer.from_pretrained(root / "cloud")
    areq = ea.AdapterRequest(blocks=1, calib_text=str(calib_jsonl), budget=ea.parse_budget(BUDGET), seed=0,
                             progress=False, threads=1, self_instruct=ADAPTER_SELF_INSTRUCT)  # as export_adapter
    data, _ = ea.calibration_set(demo_source, "demo", tok, areq, log=lambda *_: None)  # cache hit
    assert data.key == c["data"]["key"]
    again = cal.calibrate(root / "edge" / "edge.gguf", data.heldout, c["target_agreement"])
    for k in ("curve", "default_tau", "exit_rate_at_target", "agreement_top1", "spec_mean_accepted", "positions",
              "prompt_lookup", "head_only"):
        assert again[k] == c[k], k
    # the τ and figures are the lookup mixture's, what the edge decodes; the head alone is beside them
    alone = cal.calibrate(root / "edge" / "edge.gguf", data.heldout, c["target_agreement"], lookup=False)
    assert {k: alone[k] for k in c["head_only"]} == c["head_only"] and "prompt_lookup" not in alone
    # The curve is self-consistent: τ=0 exits everything at the top-1 agreement; rates fall with τ.
    assert c["curve"][0]["exit_rate"] == 1.0 and c["curve"][0]["agreement"] == c["agreement_top1"]
    rates = [p["exit_rate"] for p in c["curve"]]
    assert rates == sorted(rates, reverse=True)
    assert c["default_tau"] == 1.0 or c["agreement_at_default_tau"] >= c["target_agreement"]
    assert 1.0 <= c["spec_mean_accepted"] <= 5.0
    # The bare head on the same held-out text, for comparison.
    assert 0 <= c["bare_head"]["agreement_top1"] <= 1


def test_trained_adapter_beats_the_bare_head_on_held_out_agreement(adapter_bundle):
    """Even the test budget's adapter must agree with the full model more often than layer K's
    bare head on the held-out answers (the manifest figures measured with llama.cpp); a broken
    trainer, loss or GGUF writer leaves it at or below the bare head."""
    c = load_manifest(adapter_bundle[0] / "edge", role="edge").calibration
    adapter, bare = c["head_only"]["agreement_top1"], c["bare_head"]["agreement_top1"]  # heads alone, no lookup
    assert c["positions"] > 0 and c["bare_head"].get("positions", c["positions"]) == c["positions"]
    assert adapter > bare + 0.05, (adapter, bare)


def test_cache_hit_does_not_retrain(adapter_bundle, demo_source, calib_jsonl, tmp_path):
    from quantize import exit_adapter as ea

    root, first_log = adapter_bundle
    first = load_manifest(root / "edge")
    key = first.exit_adapter["cache_key"]
    cached_file = ea.cache_dir() / "adapters" / f"{key}.safetensors"
    assert cached_file.is_file()
    mtime, runs = cached_file.stat().st_mtime_ns, ea.TRAIN_RUNS
    log: list[str] = []
    again = _export(tmp_path, demo_source, calib_jsonl, "again", log)
    second = load_manifest(again / "edge")
    assert ea.TRAIN_RUNS == runs, "the cache hit path trained again"
    assert cached_file.stat().st_mtime_ns == mtime
    assert any("exit adapter: cache hit" in line for line in log), log
    assert any("calibration data: cache hit" in line for line in log), log
    assert second.exit_adapter["cached"] is True and second.exit_adapter["cache_key"] == key
    # Same adapter, same GGUF, same figures.
    assert sha256_file(again / "edge" / "edge.gguf") == sha256_file(root / "edge" / "edge.gguf")
    assert second.calibration["curve"] == first.calibration["curve"]


def test_inspect_prints_curve_spec_and_advice(adapter_bundle, capsys):
    root, _ = adapter_bundle
    assert cli_main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "exit adapter 1 block(s) after layer 19" in out
    assert "<- default" in out and "spec drafting γ=4: mean accepted length" in out
    assert "split advice" in out and f"*{DEMO_SPLIT:>3}" in out


def _bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    cases = {
        "empty": ("empty.txt", "", "0 prompt(s)"),
        "bad-json": ("bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n',
                     "line 2: not valid JSON"),
        "no-user": ("nouser.jsonl", '{"messages": [{"role": "system", "content": "x"}]}\n', "no user message"),
        "bad-role": ("role.jsonl", '[{"role": "robot", "content": "x"}]\n', "role system/user/assistant"),
        "extension": ("prompts.csv", "a,b\n", "expected a .txt"),
        "binary": ("bin.txt", b"\xff\xfe\x00bad", "not UTF-8"),
    }
    out = {}
    for name, (fname, body, msg) in cases.items():
        p = d / fname
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
        out[name] = (p, msg)
    out["missing"] = (d / "nope.txt", "no such file")
    return out


@pytest.mark.parametrize("case", ["empty", "bad-json", "no-user", "bad-role", "extension", "binary", "missing"])
def test_bad_calib_text_is_one_clear_error(tmp_path, capsys, case):
    path, expected = _bad_files(tmp_path)[case]
    out = tmp_path / "o"
    rc = cli_main(["export", "--source", "demo", "--split", "20", "--out", str(out), "--calib-text", str(path),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fogline export: error: --calib-text"), lines
    assert expected in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("text,tokens,seconds", [("60k", 60000, None), ("8m", None, 480.0),
                                                 ("30k,300s", 30000, 300.0), (None, None, None)])
def test_parse_budget(text, tokens, seconds):
    from quantize.exit_adapter import parse_budget

    b = parse_budget(text)
    assert (b.tokens, b.seconds) == (tokens, seconds)


@pytest.mark.parametrize("bad", ["lots", "5 parsecs", "10"])
def test_parse_budget_rejects(bad):
    from fogline.errors import ConfigError
    from quantize.exit_adapter import parse_budget

    with pytest.raises(ConfigError, match="--calib-budget"):
        parse_budget(bad)


def test_spec_accepted_length_counts_the_cloud_token():
    from quantize.calibrate import ExitStats, spec_accepted_length

    m = np.array([1, 1, 0, 1, 1, 1, 1, 1, 0], bool)
    stats = ExitStats(confidence=np.ones(len(m)), correct=m, lengths=[len(m)])
    # rounds: 2 accepted + correction (3), 4 accepted + bonus (5), 0 accepted + correction (1)
    assert spec_accepted_length(stats, gamma=4) == pytest.approx(9 / 3)
    none = ExitStats(confidence=np.ones(5), correct=np.zeros(5, bool), lengths=[5])
    assert spec_accepted_length(none, gamma=4) == 1.0


# ---- the diverse held-out set (tools/bench_exit.py) -------------------------------------------

HELDOUT_DIVERSE = Path(__file__).resolve().parent.parent / "quantize" / "data" / "heldout_diverse.jsonl"


def _norm(text: str) -> str:
    """Lower-case, alphanumerics only: catches a near-duplicate that differs in case/punctuation."""
    import re
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_heldout_diverse_never_in_training_data():
    """The diverse set must stay unseen: no prompt (normalised) appears in what the trainer generates."""
    from quantize.calibration_data import builtin_prompts, read_calib_text
    held = read_calib_text(HELDOUT_DIVERSE)
    assert len(held) >= 60
    assert sum(1 for m in held if sum(x["role"] == "user" for x in m) > 1) >= 5  # multi-turn follow-ups
    held_texts = {_norm(x["content"]) for m in held for x in m if x["role"] == "user"}
    train_texts = {_norm(x["content"]) for m in builtin_prompts(4000) for x in m if x["role"] == "user"}
    train_texts |= {_norm(p) for p in ADAPTER_PROMPTS}
    assert len(train_texts) > 400
    overlap = held_texts & train_texts
    assert not overlap, f"held-out prompts found in training data: {sorted(overlap)[:5]}"


def test_tree_replay_counts_the_true_path_through_the_tree():
    """A tree that drafts the top-w_i at depth i accepts while the true token's rank is below w_i; the
    all-ones tree is the γ chain, and widening a tree never costs tokens per round."""
    from quantize.calibrate import ExitStats, spec_accepted_length, tree_nodes, tree_tokens_per_round
    rank = np.array([0, 1, 0, 2, 0])
    stats = ExitStats(confidence=np.ones(5), correct=rank == 0, lengths=[5], rank=rank)
    # (2, 1): rounds [0 1|] -> 2 tokens, [0 2|] -> 2, [0] at the end -> 1
    assert tree_tokens_per_round(stats, (2, 1)) == pytest.approx(5 / 3)
    assert tree_tokens_per_round(stats, (2, 2)) == pytest.approx(5 / 3)  # [0 1|] -> 3 (with the cloud's), [2] -> 1, [0] -> 1
    assert tree_tokens_per_round(stats, (3, 3, 3, 3, 3)) == pytest.approx(5 / 1)
    assert tree_nodes((2, 1)) == 4 and tree_nodes((1, 1, 1, 1)) == 4 and tree_nodes((2, 2, 1, 1)) == 14
    rng = np.random.default_rng(0)
    rank = rng.geometric(0.5, 300) - 1
    stats = ExitStats(confidence=np.ones(300), correct=rank == 0, lengths=[100, 200], rank=rank)
    chain = tree_tokens_per_round(stats, (1, 1, 1, 1))
    assert chain == pytest.approx(spec_accepted_length(stats, gamma=4))
    assert tree_tokens_per_round(stats, (2, 1, 1, 1)) > chain
    assert tree_tokens_per_round(stats, (2, 2, 2, 2)) > tree_tokens_per_round(stats, (2, 1, 1, 1))
    with pytest.raises(ValueError):
        tree_tokens_per_round(ExitStats(confidence=np.ones(5), correct=rank[:5] == 0, lengths=[5]), (2,))


def test_confidence_stop_simulation_matches_plain_chain_at_c0():
    """c = 0 reproduces calibrate.spec_accepted_length; a high c can only shorten the rounds."""
    from quantize.calibrate import ExitStats, spec_accepted_length
    from tools.bench_exit import confidence_stop_tokens_per_round
    rng = np.random.default_rng(0)
    conf = rng.random(200)
    correct = conf > 0.3
    lengths = [50, 70, 80]
    plain = spec_accepted_length(ExitStats(confidence=conf, correct=correct, lengths=lengths), gamma=4)
    assert confidence_stop_tokens_per_round(conf, correct, lengths, 0.0) == pytest.approx(plain)
    assert confidence_stop_tokens_per_round(conf, correct, lengths, 0.9) < plain
    # the cloud's rows per kept token: every drafted row costs, accepted or not
    from tools.bench_exit import confidence_stop_replay
    sure, ten = np.ones(10), [10]
    assert confidence_stop_replay(sure, np.ones(10, bool), ten, 0.5) == {"tokens_per_round": 5.0,
                                                                        "cloud_rows_per_token": 1.0}
    # all wrong: 4 drafts + 1 row per token, fewer in the last rounds (no drafts past the answer's end)
    assert confidence_stop_replay(sure, np.zeros(10, bool), ten, 0.5)["cloud_rows_per_token"] == \
        pytest.approx((7 * 5 + 4 + 3 + 2) / 10)
    assert confidence_stop_replay(np.zeros(10), np.zeros(10, bool), ten, 0.5)["cloud_rows_per_token"] == 1.0
    assert confidence_stop_replay(conf, correct, lengths, 0.0)["cloud_rows_per_token"] > \
        confidence_stop_replay(conf, correct, lengths, 0.9)["cloud_rows_per_token"] >= 1.0


def _synthetic_set(n: int, seed: int = 0):
    """n short training answers with random h_K rows and a random teacher top-k (the stop rule's
    mechanics, not quality: quality is bench_exit's)."""
    from quantize.calibration_data import TOP_K, CalibrationSet, Sample

    rng = np.random.default_rng(seed)
    samples, hidden = [], []
    for _ in range(n):
        prompt, answer = rng.integers(0, 49152, 6).tolist(), rng.integers(0, 49152, 6).tolist()
        ids = rng.integers(0, 49152, (len(answer), TOP_K)).astype(np.int32)
        ids[:, 0] = answer
        logp = np.sort(np.log(rng.dirichlet(np.ones(TOP_K + 1), len(answer))[:, :TOP_K]), axis=1)[:, ::-1]
        samples.append(Sample(prompt=prompt, answer=answer, topk_ids=ids, topk_logp=logp.astype(np.float16)))
        hidden.append(rng.standard_normal((len(prompt) + len(answer) - 1, 576)).astype(np.float16))
    return CalibrationSet(train=samples, heldout=[], key="synthetic", info={}), hidden


@pytest.mark.parametrize("min_gain, stops", [(1.0, True), (None, False)])
def test_training_stops_when_validation_agreement_stops_rising(demo_source, min_gain, stops):
    """Issue 11.5: with an unreachable gain the schedule stops after `min_epochs` and says so; with
    the rule off it runs every epoch and holds nothing out."""
    import dataclasses

    from quantize.exit_adapter import VAL_EVERY, AdapterConfig, train_adapter

    data, hidden = _synthetic_set(4 * VAL_EVERY)
    cfg = dataclasses.replace(AdapterConfig(), epochs=4, stop_min_gain=min_gain, min_epochs=2)
    info = train_adapter(demo_source, DEMO_SPLIT, cfg, data, hidden, None, seed=0, log=lambda _m: None,
                         progress=False, torch_threads=1).info
    assert info["early_stopped"] is stops, info
    if stops:
        assert len(info["val_agreement_by_epoch"]) == 2 and info["epochs"] < 4, info
    else:
        assert info["val_agreement_by_epoch"] == [] and info["epochs"] == 4, info


def test_answers_generated_by_two_worker_processes_are_the_ones_one_process_writes(demo_source):
    """Issue 11.5: held-out (greedy) and training (sampled) answers come out of one pass; over two
    spawned 1-thread workers (answer i on worker i % 2) they are the very answers one process
    writes, and the held-out ones are the answers a greedy pass alone writes."""
    import dataclasses

    from transformers import AutoTokenizer

    from edge_runtime.llama_backend import LlamaModel
    from quantize.calibration_data import DataConfig, builtin_prompts, generate_parallel, render_prompt
    from quantize.source import demo_gguf_path

    tok = AutoTokenizer.from_pretrained(demo_source.tokenizer_dir)
    model = LlamaModel(demo_gguf_path())
    try:
        prompts = [model.tokenize(render_prompt(tok, m), add_special=False, parse_special=True)
                   for m in builtin_prompts()[:6]]
    finally:
        model.close()
    held, train = prompts[:3], prompts[3:]
    cfg = DataConfig(max_new_tokens=12, n_parallel=4)
    one = generate_parallel(demo_gguf_path(), held, train, cfg, token_budget=None, desc="", progress=False,
                            threads=1)
    two = generate_parallel(demo_gguf_path(), held, train, dataclasses.replace(cfg, workers=2), token_budget=None,
                            desc="", progress=False)
    alone, none = generate_parallel(demo_gguf_path(), held, [], cfg, token_budget=None, desc="", progress=False,
                                    threads=1)
    assert none == []
    for a, b in zip(one, two):
        assert [s.prompt for s in b] == [s.prompt for s in a]
        assert [s.answer for s in b] == [s.answer for s in a]
    assert [s.prompt for s in two[0]] == held and [s.prompt for s in two[1]] == train
    assert [s.answer for s in alone] == [s.answer for s in one[0]]  # sharing the batch changes nothing
    assert all(s.topk_ids is None for s in one[0])
    assert all(np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(one[1], two[1]))


def test_a_training_token_budget_cuts_training_answers_only(demo_source):
    """The budget counts training tokens: it is met (and barely passed), while every held-out
    answer still ends at an end-of-generation token or max_new_tokens."""
    from transformers import AutoTokenizer

    from edge_runtime.llama_backend import LlamaModel
    from quantize.calibration_data import DataConfig, builtin_prompts, generate, render_prompt
    from quantize.source import demo_gguf_path

    tok = AutoTokenizer.from_pretrained(demo_source.tokenizer_dir)
    model = LlamaModel(demo_gguf_path())
    try:
        prompts = [model.tokenize(render_prompt(tok, m), add_special=False, parse_special=True)
                   for m in builtin_prompts()[:8]]
        cfg = DataConfig(max_new_tokens=16, n_parallel=4)
        held, train = generate(model, prompts[:2], prompts[2:], cfg, token_budget=20, desc="", progress=False,
                               threads=1)
        assert len(held) == 2
        assert all(len(s.answer) == 16 or model.is_eog(s.answer[-1]) for s in held)
        n = sum(len(s.answer) for s in train)
        assert 20 <= n < 20 + cfg.n_parallel
        assert all(s.topk_ids.shape[0] == len(s.answer) for s in train)
    finally:
        model.close()


def test_distill_loss_matches_the_full_log_softmax_in_value_and_gradient():
    """The chunked top-k log-softmax is the textbook loss: same value, same dL/dlogits, for
    float32 logits and for the bf16 logits training uses (rows not a multiple of the chunk)."""
    import torch

    from quantize.exit_adapter import distill_loss

    def reference(z, ids, t_logp, w):
        s_logp = torch.log_softmax(z.float(), dim=-1)
        s_top = s_logp.gather(1, ids)
        t_p = t_logp.exp()
        t_rest = (1 - t_p.sum(-1)).clamp_min(1e-6)
        s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
        kl = (t_p * (t_logp - s_top)).sum(-1) + t_rest * (t_rest.log() - s_rest)
        return kl.mean() - w * s_top[:, 0].mean(), (z.argmax(-1) == ids[:, 0]).sum()

    g = torch.Generator().manual_seed(0)
    n, v, k = 75, 3000, 8
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        base = (torch.randn(n, v, generator=g) * 3).to(dtype)
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        ids[::3, 0] = base[::3].float().argmax(-1)  # some rows agree
        t_logp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.2
        got_z, ref_z = base.clone().requires_grad_(), base.clone().requires_grad_()
        loss, hit = distill_loss(got_z, ids, t_logp, 1.0)
        ref_loss, ref_hit = reference(ref_z, ids, t_logp, 1.0)
        loss.backward()
        ref_loss.backward()
        assert int(hit) == int(ref_hit) >= n // 3
        assert abs(float(loss) - float(ref_loss)) < tol * max(1.0, abs(float(ref_loss)))
        assert got_z.grad.dtype == dtype
        err = (got_z.grad.float() - ref_z.grad.float()).abs().max()
        assert err <= tol * ref_z.grad.float().abs().max(), (dtype, float(err))


def test_h_k_probe_gguf_gives_the_base_files_h_k_without_logits(demo_bundle, demo_source, tmp_path):
    """The export reads the calibration text's h_K from a probe GGUF (base blocks byte for byte
    plus an untrained block K): llama.cpp hands h_K over as block K's input, no row is an output
    row, and the values are bit-identical to the eval-callback tap on the base file."""
    from edge_runtime.hidden_tap import layer_input_supported
    from edge_runtime.llama_backend import LlamaContext, LlamaModel
    from quantize.calibration_data import Sample
    from quantize.exit_adapter import AdapterConfig, edge_hidden_states, hk_probe_gguf
    from tests.conftest import DEMO_SPLIT

    base = demo_bundle / "edge" / "edge.gguf"
    probe = hk_probe_gguf(demo_source, DEMO_SPLIT, AdapterConfig(), base, tmp_path / "probe.gguf")
    assert not list(tmp_path.glob("*.tmp"))
    b, p = _tensors(base), _tensors(probe)
    assert {n: v for n, v in p.items() if n in b and n != "output_norm.weight"} == \
        {n: v for n, v in b.items() if n != "output_norm.weight"}
    assert f"blk.{DEMO_SPLIT}.attn_q.weight" in p and f"blk.{DEMO_SPLIT}.attn_q.weight" not in b
    samples = [Sample(prompt=list(range(200, 240 + 37 * i)), answer=list(range(500, 520 + 11 * i))) for i in range(3)]
    via_probe = edge_hidden_states(probe, DEMO_SPLIT, samples, threads=2, progress=False, hidden_via="auto")
    via_base = edge_hidden_states(base, DEMO_SPLIT, samples, threads=2, progress=False)
    for x, y, s in zip(via_probe, via_base, samples):
        assert x.shape == (len(s.tokens) - 1, demo_source.spec.hidden_size)
        assert np.array_equal(x, y)
    model = LlamaModel(probe)
    try:
        ctx = LlamaContext(model, n_ctx=256, tap_layer=DEMO_SPLIT - 1, hidden_via="auto")
        assert not ctx.tap_needs_all_outputs
        assert (ctx.layer_tap is not None) == layer_input_supported()
        ctx.close()
    finally:
        model.close()


@pytest.mark.slow
def test_bench_exit_measures_a_bundle_on_the_diverse_set(demo_bundle_adapter, tmp_path):
    """`python tools/bench_exit.py --bundle DIR` (the diverse-set figures the README reports) runs
    on an export of the production path and writes both held-out sets' figures."""
    import json
    import subprocess
    import sys

    from quantize.calibration_data import read_calib_text
    from tools.bench_exit import HELDOUT_DIVERSE

    out = tmp_path / "exit.json"
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "tools/bench_exit.py", "--bundle", str(demo_bundle_adapter), "--no-progress",
                        "--json", str(out)], cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "diverse" in r.stdout and "in-template" in r.stdout
    rows = json.loads(out.read_text())
    row = rows[0] if isinstance(rows, list) else rows
    d, t = row["diverse"], row["in_template"]
    assert d["answers"] == len(read_calib_text(HELDOUT_DIVERSE)) >= 60
    assert d["positions"] > 20 * d["answers"]
    for x in (d, t):
        assert 0.0 <= x["agreement_top1"] <= 1.0 and 1.0 <= x["spec_mean_accepted"] <= 5.0
    assert row["diverse_confidence_stop_tokens_per_round"]["0.0"] == pytest.approx(d["spec_mean_accepted"], abs=1e-3)
    # the edge's greedy tokens: exit head + the bundle's prompt-lookup λ (never refitted on the diverse set)
    assert row["drafter"] == "exit+lookup"
    assert row["prompt_lookup"] == load_manifest(demo_bundle_adapter / "edge").calibration["prompt_lookup"]
    head = row["diverse_head_only"]
    assert d["agreement_top1"] != head["agreement_top1"]  # lookup changed tokens on 67 answers
    # trees and top-k are the exit head's own ranks
    trees = {tuple(t["widths"]): t for t in row["diverse_trees"]}
    assert trees[(1, 1, 1, 1)]["tokens_per_round"] == pytest.approx(head["spec_mean_accepted"], abs=1e-3)
    assert trees[(2, 2, 2, 2)]["tokens_per_round"] >= trees[(2, 1, 1, 1)]["tokens_per_round"] >= \
        trees[(1, 1, 1, 1)]["tokens_per_round"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # tokens per round by draft tree
    top = row["diverse_topk_agreement"]
    assert top["1"] == pytest.approx(head["agreement_top1"], abs=1e-3) and top["8"] >= top["2"] >= top["1"]


def test_negative_self_instruct_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli_main(["export", "--source", "demo", "--split", "20", "--out", str(out), "--self-instruct", "-1",
                   "--no-progress"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "--self-instruct must be 0 or more" in lines[0], lines
    assert not out.exists()
