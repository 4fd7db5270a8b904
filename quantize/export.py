"""`fogline export`: one source model -> a matched edge GGUF + cloud shard.

Everything is written into a temporary sibling directory and renamed into
place only after verification passed, so a failed export leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogline.errors import ExportError
from fogline.manifest import Manifest, sha256_file, write_manifest

EDGE_GGUF = "edge.gguf"


@dataclass(frozen=True)
class ExportRequest:
    source: str
    out: Path
    split: int | None  # None: auto
    quant: str | None  # None: auto
    device: str | None = None
    device_memory: str | None = None
    force: bool = False
    cloud_dtype: str = "float32"
    threads: int | None = None
    tokenizer_pre: str | None = None
    progress: bool = True
    # Exit adapter (quantize/exit_adapter.py). The CLI defaults to 1 block; programmatic
    # callers opt in, so library users and fixtures do not train by accident.
    exit_adapter: int = 0
    calib_text: str | None = None
    calib_budget: str | None = None
    self_instruct: int | None = None  # None: the default (SELF_INSTRUCT_DEFAULT with the built-in prompts)
    seed: int = 0
    target_agreement: float = 0.95


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="HF model directory, .gguf file, or 'demo'")
    p.add_argument("--split", default="auto", help="K: edge runs layers [0,K); 'auto' needs a device budget")
    p.add_argument("--quant", default="auto", help="edge GGUF type (Q8_0, Q4_K_M, F16, ...) or 'auto'")
    p.add_argument("--out", required=True, help="output directory (gets edge/ and cloud/)")
    p.add_argument("--device", help="device preset for the budget, e.g. rpi4-2gb, jetson-orin-nano-8gb")
    p.add_argument("--device-memory", help="memory budget for the edge process, e.g. 1.5GiB")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--cloud-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name for HF sources when detection is wrong")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("exit adapter and calibration")
    g.add_argument("--exit-adapter", type=int, default=1, metavar="N",
                   help="train N transformer blocks after layer K as the edge's exit head (0: bare head, "
                        "no calibration; default 1)")
    g.add_argument("--calib-text", metavar="FILE",
                   help="prompts for calibration: .txt (one per paragraph) or .jsonl chat messages; "
                        "default: 360 prompts, 200 built-in templated ones and the --self-instruct requests. "
                        "The full model writes the answers.")
    g.add_argument("--self-instruct", type=int, default=None, metavar="N",
                   help="N more prompts written by the full model itself from a seed list of request kinds "
                        "(cached; default: 160 with the built-in prompts, 0 with --calib-text)")
    g.add_argument("--calib-budget", metavar="BUDGET",
                   help="training tokens to generate (e.g. 60k) and/or a training time cap (e.g. 8m), "
                        "e.g. '30k,5m'; default: one sampled answer per training prompt (~44k tokens for the "
                        "built-in set), no time cap")
    g.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and training (default 0)")
    g.add_argument("--target-agreement", type=float, default=0.95,
                   help="agreement with the full model that the default exit threshold must reach (default 0.95)")


def request_from_args(a: argparse.Namespace) -> ExportRequest:
    split: int | None
    if a.split == "auto":
        split = None
    else:
        try:
            split = int(a.split)
        except ValueError:
            raise ExportError(f"--split must be an integer or 'auto', not {a.split!r}") from None
    quant = None if a.quant == "auto" else a.quant.upper()
    if a.exit_adapter < 0:
        raise ExportError(f"--exit-adapter must be 0 or more, not {a.exit_adapter}")
    if a.self_instruct is not None and a.self_instruct < 0:
        raise ExportError(f"--self-instruct must be 0 or more, not {a.self_instruct}")
    if not 0 < a.target_agreement <= 1:
        raise ExportError(f"--target-agreement must be in (0, 1], not {a.target_agreement}")
    return ExportRequest(source=a.source, out=Path(a.out), split=split, quant=quant, device=a.device,
                         device_memory=a.device_memory, force=a.force, cloud_dtype=a.cloud_dtype,
                         threads=a.threads, tokenizer_pre=a.tokenizer_pre, progress=not a.no_progress,
                         exit_adapter=a.exit_adapter, calib_text=a.calib_text, calib_budget=a.calib_budget,
                         self_instruct=a.self_instruct, seed=a.seed, target_agreement=a.target_agreement)


def run_export(req: ExportRequest, log=print, source: Any = None) -> tuple[Manifest, Manifest]:
    """Export; `source` lets a caller reuse an already loaded SourceModel (tests, sweeps)."""
    from quantize import budget as budget_mod
    from quantize.llama_quant import QUANT_TYPES, ftype_of

    out = req.out
    if out.exists() and not req.force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if req.quant is not None:
        if req.quant not in QUANT_TYPES:
            raise ExportError(f"unknown quantization type {req.quant!r}; choose one of {', '.join(QUANT_TYPES)}")
        ftype_of(req.quant)
    if req.exit_adapter:  # bad calibration input fails now, before minutes of work
        from quantize.calibration_data import read_calib_text
        from quantize.exit_adapter import parse_budget

        parse_budget(req.calib_budget)
        if req.calib_text:
            read_calib_text(req.calib_text)
    budget = budget_mod.device_budget(req.device, req.device_memory)
    if req.split is None and budget is None:
        raise ExportError("--split auto needs --device or --device-memory to choose K")
    if not out.parent.exists():
        raise ExportError(f"parent directory {out.parent} does not exist")

    from tqdm import tqdm

    steps = tqdm(total=6 + (3 if req.exit_adapter else 0), desc="export", unit="step", disable=not req.progress,
                 file=sys.stderr)
    src = None
    try:
        steps.set_postfix_str("loading + dequantizing source")
        src = source if source is not None else _load(req)
        spec = src.spec
        choice = None
        if budget is not None:
            if req.split is not None:
                spec.check_split(req.split)
            choice = budget_mod.choose(spec, budget[0], req.split, req.quant, extra_blocks=req.exit_adapter)
            log(f"device budget: {budget[0] / budget_mod.MiB:.0f} MiB ({budget[1]})")
            log(budget_mod.format_table(choice))
            log(f"chose {choice.reason}")
            split, quant = choice.split, choice.quant
        else:
            split, quant = req.split, req.quant or "Q8_0"
        assert split is not None
        spec.check_split(split)
        steps.update(1)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            edge_m, cloud_m = _export_into(tmp, src, split, quant, req, steps, choice, budget, log)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        steps.close()  # before any error line, so that line stands alone
        if source is None and src is not None:
            src.close()
    return edge_m, cloud_m


def _load(req: ExportRequest):
    from quantize.source import load_source

    src = load_source(req.source)
    if req.tokenizer_pre:
        src.tokenizer_pre = req.tokenizer_pre  # type: ignore[attr-defined]
    return src


def _export_into(tmp: Path, src: Any, split: int, quant: str, req: ExportRequest, steps: Any,
                 choice: Any, budget: Any, log=print) -> tuple[Manifest, Manifest]:
    import torch
    from transformers import AutoTokenizer

    from quantize.cloud_shard import cloud_tensors, write_cloud_shard
    from quantize.edge_gguf import write_edge_gguf
    from quantize.llama_quant import quantize_gguf
    from quantize.verify import verify_export

    t0 = time.time()
    edge_dir, cloud_dir = tmp / "edge", tmp / "cloud"
    edge_dir.mkdir(parents=True)
    cloud_dir.mkdir()
    fingerprint = src.fingerprint()

    steps.set_postfix_str("writing float edge GGUF")
    float_type = quant if quant in ("F32", "F16") else "F16"
    float_path = edge_dir / (EDGE_GGUF if quant in ("F32", "F16") else "edge.float.gguf")
    write_edge_gguf(src, split, float_path, float_type, fingerprint=fingerprint, progress=False)
    steps.update(1)

    steps.set_postfix_str(f"quantizing to {quant} (llama.cpp)")
    edge_path = edge_dir / EDGE_GGUF
    if float_path != edge_path:
        quantize_gguf(float_path, edge_path, quant, req.threads)
        float_path.unlink()
    steps.update(1)

    steps.set_postfix_str("writing cloud shard")
    dtype = getattr(torch, req.cloud_dtype)
    cloud_files = write_cloud_shard(src, split, cloud_dir, dtype)
    steps.update(1)

    steps.set_postfix_str("verifying h_K and cloud argmax")
    tokenizer = AutoTokenizer.from_pretrained(cloud_dir)
    shard = cloud_tensors(src, split, torch.float32)
    figures = verify_export(src, split, quant, edge_path, shard, tokenizer, req.threads)
    steps.update(1)

    adapter_info = calibration = None
    if req.exit_adapter:
        adapter_info, calibration = _add_exit_adapter(edge_dir, src, split, quant, req, tokenizer, steps, choice,
                                                      figures, log)

    steps.set_postfix_str("writing manifests")
    figures["export_seconds"] = round(time.time() - t0, 1)
    spec = src.spec
    common = dict(fingerprint=fingerprint, architecture=spec.model_type, n_layers=spec.n_layers, split=split,
                  hidden_size=spec.hidden_size, vocab_size=spec.vocab_size, source=src.description,
                  verification=figures)
    budget_info = None
    if choice is not None:
        budget_info = {"budget_bytes": budget[0], "budget_source": budget[1], "reason": choice.reason,
                       "estimated_resident_bytes": next(c.resident_bytes for c in choice.table
                                                        if (c.split, c.quant) == (split, quant))}
    edge_m = Manifest(role="edge", quant=quant, files={EDGE_GGUF: sha256_file(edge_path)},
                      budget=budget_info, exit_adapter=adapter_info, calibration=calibration, **common)
    cloud_m = Manifest(role="cloud", quant=req.cloud_dtype,
                       files={f: sha256_file(cloud_dir / f) for f in cloud_files}, **common)
    write_manifest(edge_dir, edge_m)
    write_manifest(cloud_dir, cloud_m)
    steps.update(1)
    return edge_m, cloud_m


def _add_exit_adapter(edge_dir: Path, src: Any, split: int, quant: str, req: ExportRequest, tokenizer: Any,
                      steps: Any, choice: Any, figures: dict[str, Any], log) -> tuple[dict, dict]:
    """Train (or fetch) the exit adapter, write it into edge.gguf after block K-1, calibrate it.

    The edge GGUF without adapter, already verified, stays the source of blocks [0, K): the
    adapter file is spliced onto it, and h_K is checked to be bit-identical."""
    import numpy as np

    from quantize import calibrate as cal
    from quantize import exit_adapter as ea
    from quantize.edge_gguf import write_edge_gguf
    from quantize.llama_quant import quantize_gguf
    from quantize.verify import edge_hidden, verification_prompt_tokens

    areq = ea.AdapterRequest(blocks=req.exit_adapter, calib_text=req.calib_text,
                             budget=ea.parse_budget(req.calib_budget), seed=req.seed, threads=req.threads,
                             progress=req.progress, self_instruct=req.self_instruct)
    threads = ea.export_threads(req.threads)
    edge_path, base = edge_dir / EDGE_GGUF, edge_dir / "edge.base.gguf"
    os.replace(edge_path, base)

    steps.set_postfix_str("calibration text (full model, llama.cpp)")
    data, origin = ea.calibration_set(src, req.source, tokenizer, areq, log)
    steps.update(1)

    steps.set_postfix_str(f"exit adapter ({req.exit_adapter} block(s))")
    result, cached = ea.trained_adapter(src, split, quant, base, data, areq, log)
    float_type = quant if quant in ("F32", "F16") else "F16"
    float_path = edge_dir / "edge.adapter.float.gguf"
    write_edge_gguf(src, split, float_path, float_type, fingerprint=src.fingerprint(), adapter_state=result.state,
                    adapter_blocks=req.exit_adapter, progress=False)
    quant_path = float_path
    if quant not in ("F32", "F16"):
        quant_path = edge_dir / "edge.adapter.gguf"
        quantize_gguf(float_path, quant_path, quant, req.threads)
        float_path.unlink()
    ea.splice_adapter_gguf(base, quant_path, edge_path)
    quant_path.unlink()
    tokens = verification_prompt_tokens(tokenizer)
    h_base, h_new = edge_hidden(base, split, tokens, threads), edge_hidden(edge_path, split, tokens, threads)
    if not np.array_equal(h_base, h_new):
        from fogline.errors import VerificationError

        raise VerificationError("the exit adapter changed h_K (max |diff| "
                                f"{float(np.abs(h_base - h_new).max()):.3g}); the cloud would see other inputs")
    figures["h_k_identical_to_export_without_adapter"] = True
    steps.update(1)

    steps.set_postfix_str("calibrating the exit (llama.cpp, held-out text)")
    curve = cal.calibrate(edge_path, data.heldout, req.target_agreement, threads, progress=req.progress)
    bare = cal.calibrate(base, data.heldout, req.target_agreement, threads, lookup=False)
    base.unlink()
    bare_short = {k: bare[k] for k in ("agreement_top1", "default_tau", "exit_rate_at_target", "spec_mean_accepted")}
    cal.record_measurement(src, split, quant, areq, data.key, curve, bare_short, result.info)
    calibration = {**curve, "bare_head": bare_short,
                   "data": {"key": data.key, "prompt_source": origin, "heldout_answers": len(data.heldout),
                            "heldout_positions": data.heldout_tokens, "train_answers": len(data.train),
                            "train_positions": data.train_tokens, **data.info},
                   "split_advice": cal.split_advice(src.spec, src.fingerprint(), quant, areq, data.key, split,
                                                    choice)}
    info = {k: result.info[k] for k in ("blocks", "init_layers", "steps", "epochs", "train_positions", "final_loss",
                                        "train_seconds", "train_cpu_seconds", "seed", "cache_key", "recipe",
                                        "val_agreement_by_epoch", "early_stopped", "best_epoch", "hidden_seconds")
            if k in result.info}
    info.update({"cached": cached, "gguf_blocks": split + req.exit_adapter, "h_k_tap_layer": split - 1,
                 "heldout_agreement_torch": result.info.get("heldout_agreement_torch")})
    head = curve["head_only"]
    log(f"exit adapter + prompt lookup (λ by match length {curve['prompt_lookup']['lambdas']}): agreement "
        f"{curve['agreement_top1']:.1%} (exit head alone {head['agreement_top1']:.1%}, bare head "
        f"{bare['agreement_top1']:.1%}); τ={curve['default_tau']} lets {curve['exit_rate_at_target']:.1%} of tokens "
        f"exit at ≥{req.target_agreement:.0%} agreement (head alone {head['exit_rate_at_target']:.1%}); spec γ=4 "
        f"accepts {curve['spec_mean_accepted']:.2f} tokens/round (head alone {head['spec_mean_accepted']:.2f})")
    return info, calibration


def main(args: argparse.Namespace) -> int:
    req = request_from_args(args)
    edge_m, cloud_m = run_export(req)
    v = edge_m.verification
    print(f"exported {edge_m.source} -> {req.out}")
    print(f"  edge : {req.out / 'edge'}  K={edge_m.split} {edge_m.quant}  "
          f"h_K rel. error {v['h_k_relative_error']:.4%} (tolerance {v['h_k_tolerance']:.0%})")
    print(f"  cloud: {req.out / 'cloud'}  layers [{cloud_m.split}, {cloud_m.n_layers})  {cloud_m.quant}  "
          f"argmax agreement {v['cloud_argmax_agreement']:.0%} over {v['positions']} positions")
    print(f"  fingerprint {edge_m.fingerprint[:16]}…  ({v['export_seconds']} s)")
    from fogline.inspect import describe_exit

    for line in describe_exit(edge_m):
        print("  " + line)
    return 0
