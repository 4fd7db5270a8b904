"""`fogline export` / `fogline inspect` on the real demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from safetensors import safe_open

from fogline.cli import main as cli_main
from fogline.manifest import check_pair, load_manifest, verify_files
from quantize.verify import H_TOLERANCE


def _block_count(gguf_path: Path) -> int:
    r = gguf.GGUFReader(gguf_path)
    return int(r.fields["llama.block_count"].contents())


@pytest.mark.parametrize("bundle_name,split,quant", [("demo_bundle", 20, "Q8_0"), ("demo_bundle_k10_q4", 10, "Q4_0")])
def test_demo_export_at_two_splits_and_quants(request, bundle_name, split, quant):
    root: Path = request.getfixturevalue(bundle_name)
    edge, cloud = load_manifest(root / "edge", role="edge"), load_manifest(root / "cloud", role="cloud")
    check_pair(edge, cloud)
    assert (edge.split, edge.quant, edge.n_layers, edge.hidden_size) == (split, quant, 30, 576)
    assert verify_files(root / "edge", edge) == [] and verify_files(root / "cloud", cloud) == []
    v = edge.verification
    assert v["tokenizer_match"] is True
    assert 0 < v["h_k_relative_error"] <= H_TOLERANCE[quant]
    assert v["cloud_argmax_agreement"] == 1.0 and v["positions"] > 30
    assert _block_count(root / "edge" / "edge.gguf") == split
    r = gguf.GGUFReader(root / "edge" / "edge.gguf")
    names = {t.name for t in r.tensors}
    assert f"blk.{split - 1}.ffn_down.weight" in names and f"blk.{split}.ffn_down.weight" not in names
    assert "tokenizer.chat_template" in r.fields and "token_embd.weight" in names
    with safe_open(str(root / "cloud" / "deep.safetensors"), "pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}
        assert "lm_head.weight" in f.keys() and "model.norm.weight" in f.keys()
    assert layers == set(range(split, 30))


def test_both_exports_share_the_fingerprint(demo_bundle, demo_bundle_k10_q4):
    a = load_manifest(demo_bundle / "edge")
    b = load_manifest(demo_bundle_k10_q4 / "cloud")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64


def test_pairing_refuses_other_split(demo_bundle, demo_bundle_k10_q4):
    from fogline.errors import BundleError

    with pytest.raises(BundleError, match="split"):
        check_pair(load_manifest(demo_bundle / "edge"), load_manifest(demo_bundle_k10_q4 / "cloud"))


def test_inspect_passes_then_catches_tampering(demo_bundle, tmp_path, capsys):
    assert cli_main(["inspect", str(demo_bundle)]) == 0
    out = capsys.readouterr().out
    assert "edge and cloud halves match" in out and "K=20" in out
    copy = tmp_path / "copy"
    shutil.copytree(demo_bundle, copy)
    shard = copy / "cloud" / "deep.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli_main(["inspect", str(copy)]) == 2
    captured = capsys.readouterr()
    assert "deep.safetensors: MISMATCH" in captured.out
    assert captured.err.count("\n") == 1 and "do not match" in captured.err


@pytest.mark.slow
def test_hf_directory_source(demo_hf_dir, demo_bundle, tmp_path, capsys):
    out = tmp_path / "from-hf"
    rc = cli_main(["export", "--source", str(demo_hf_dir), "--split", "15", "--quant", "F16",
                   "--out", str(out), "--no-progress", "--exit-adapter", "0"])
    assert rc == 0, capsys.readouterr().err
    edge = load_manifest(out / "edge")
    # Same weights, other container: same fingerprint as the GGUF-sourced export.
    assert edge.fingerprint == load_manifest(demo_bundle / "edge").fingerprint
    assert edge.verification["tokenizer_match"] is True
    assert edge.verification["h_k_relative_error"] < 0.01
    assert _block_count(out / "edge" / "edge.gguf") == 15


# ---- bad input: one line, exit code 2, nothing left behind -------------------------------


def _run_bad(args: list[str], capsys, out: Path) -> str:
    rc = cli_main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("fogline")]
    assert len(lines) == 1 and lines[0].startswith("fogline export: error: ")
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "half-written output left behind"
    return lines[0]


@pytest.fixture()
def bad_hf_dir(demo_hf_dir, tmp_path) -> Path:
    d = tmp_path / "bad-hf"
    shutil.copytree(demo_hf_dir, d)
    return d


def test_unknown_architecture(bad_hf_dir, tmp_path, capsys):
    cfg = json.loads((bad_hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad_hf_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(bad_hf_dir), "--split", "10", "--quant", "Q8_0", "--out", str(out)],
                   capsys, out)
    assert "unsupported architecture 'gpt_neox'" in msg


@pytest.mark.parametrize("split", ["0", "30", "-3", "ten"])
def test_split_outside_range(demo_hf_dir, tmp_path, capsys, split):
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(demo_hf_dir), "--split", split, "--quant", "Q8_0",
                    "--out", str(out)], capsys, out)
    assert "split" in msg


def test_missing_weights(bad_hf_dir, tmp_path, capsys):
    for f in bad_hf_dir.glob("*.safetensors"):
        f.unlink()
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(bad_hf_dir), "--split", "10", "--out", str(out)], capsys, out)
    assert "no *.safetensors" in msg


def test_missing_source(tmp_path, capsys):
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(tmp_path / "nope"), "--split", "10", "--out", str(out)], capsys, out)
    assert "does not exist" in msg


def test_corrupt_safetensors(bad_hf_dir, tmp_path, capsys):
    f = next(bad_hf_dir.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: 1000])
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(bad_hf_dir), "--split", "10", "--out", str(out)], capsys, out)
    assert "safetensors" in msg


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(bad), "--split", "10", "--out", str(out)], capsys, out)
    assert "broken.gguf" in msg


def test_budget_nothing_fits(demo_hf_dir, tmp_path, capsys):
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(demo_hf_dir), "--split", "auto", "--device-memory", "20MiB",
                    "--out", str(out)], capsys, out)
    assert "nothing fits" in msg


def test_unknown_quant_and_device(demo_hf_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert "Q9_9" in _run_bad(["export", "--source", str(demo_hf_dir), "--split", "10", "--quant", "Q9_9",
                               "--out", str(out)], capsys, out)
    assert "unknown device" in _run_bad(["export", "--source", str(demo_hf_dir), "--split", "auto",
                                         "--device", "toaster", "--out", str(out)], capsys, out)
    assert "needs --device" in _run_bad(["export", "--source", str(demo_hf_dir), "--split", "auto",
                                         "--out", str(out)], capsys, out)


def test_existing_output_needs_force(demo_hf_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = cli_main(["export", "--source", str(demo_hf_dir), "--split", "10", "--out", str(out), "--exit-adapter", "0"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_failed_verification_leaves_nothing(demo_hf_dir, tmp_path, capsys):
    """A wrong pre-tokenizer is caught by verification after files were written: all are removed."""
    out = tmp_path / "o"
    msg = _run_bad(["export", "--source", str(demo_hf_dir), "--split", "10", "--quant", "Q8_0",
                    "--tokenizer-pre", "falcon", "--out", str(out), "--no-progress", "--exit-adapter", "0"],
                   capsys, out)
    assert "tokenizes differently" in msg


def test_loading_a_gguf_source_puts_gguf_back_and_keeps_its_tokenizer(demo_source):
    """The GGUF is parsed once while loading (quantize/source.py): gguf-py's own reader and name map are
    back afterwards, and what was read through the shared reader is complete."""
    import gguf.gguf_reader
    import gguf.tensor_mapping

    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map
    tokens, _ = demo_source.gguf_tokenizer_fields["tokenizer.ggml.tokens"]
    assert len(tokens) == demo_source.spec.vocab_size == demo_source.lm_head().shape[0]
