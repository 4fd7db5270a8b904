"""Exit quality per split: bare head vs exit adapter, through the real export + calibration path.

    python tools/bench_exit.py                       # demo model, K = 10 15 20 24, Q8_0, 1 adapter block
    python tools/bench_exit.py --splits 20 --exit-adapter 2 --calib-budget 30k

For each K this runs `fogline export` (adapter training is cached in
FOGLINE_CACHE_DIR, so a second run only re-measures) and prints, side by side,
what the manifest's calibration measured with llama.cpp on the quantized edge
GGUF over the held-out greedy answers (generated positions only): top-1
agreement with the full model, the share of tokens that can exit at the target
agreement, and the mean accepted length of greedy spec drafting at γ=4
(counting the cloud's token) — for the bare head (final norm + LM head on
h_K) and for the exit adapter — plus the adapter's training time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DIVERSE = REPO / "quantize" / "data" / "heldout_diverse.jsonl"
STOP_CONFIDENCES = (0.0, 0.3, 0.5, 0.7, 0.9)  # chain drafting stops below this exit confidence


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="demo")
    ap.add_argument("--splits", default="10,15,20,24")
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--exit-adapter", type=int, default=1)
    ap.add_argument("--calib-text", default=None)
    ap.add_argument("--calib-budget", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-agreement", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--bundle", default=None,
                    help="measure this existing export on the diverse held-out set instead of exporting")
    ap.add_argument("--heldout", default=str(DIVERSE),
                    help="the diverse held-out set (JSONL of {messages}) the trainer never sees")
    ap.add_argument("--tokens", type=int, default=64, help="max tokens of each full-model answer (diverse set)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.bundle:
        return measure_bundle(Path(args.bundle), Path(args.heldout), args)
    if args.exit_adapter < 1:
        ap.error("--exit-adapter must be at least 1 (the bare head is measured alongside)")

    from fogline.errors import FoglineError
    from fogline.manifest import load_manifest
    from quantize.export import ExportRequest, run_export
    from quantize.source import load_source
    from tools import plots

    splits = [int(k) for k in args.splits.split(",")]
    src = load_source(args.source)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmp:
            for k in splits:
                t0 = time.time()
                out = Path(tmp) / f"k{k}"
                req = ExportRequest(source=args.source, out=out, split=k, quant=args.quant,
                                    exit_adapter=args.exit_adapter, calib_text=args.calib_text,
                                    calib_budget=args.calib_budget, seed=args.seed,
                                    target_agreement=args.target_agreement, threads=args.threads,
                                    progress=not args.no_progress)
                run_export(req, log=lambda line: print("  " + line, file=sys.stderr, flush=True), source=src)
                m = load_manifest(out / "edge")
                c, a = m.calibration, m.exit_adapter
                advice = next(r for r in c["split_advice"] if r["K"] == k)
                rows.append({"K": k, "quant": args.quant, "blocks": a["blocks"],
                             "edge_compute_fraction": advice["edge_compute_fraction"],
                             "bare": c["bare_head"],
                             "adapter": {key: c[key] for key in ("agreement_top1", "default_tau",
                                                                  "exit_rate_at_target", "spec_mean_accepted")},
                             "positions": c["positions"], "answers": c["answers"],
                             "train_positions": a["train_positions"], "epochs": a["epochs"],
                             "train_seconds": a["train_seconds"], "train_cpu_seconds": a["train_cpu_seconds"],
                             "cached": a["cached"], "export_seconds": round(time.time() - t0, 1),
                             "curve": c["curve"]})
                print(f"  K={k} done in {rows[-1]['export_seconds']} s", file=sys.stderr, flush=True)
    except FoglineError as e:
        print(f"bench_exit: error: {e}", file=sys.stderr)
        return 2
    finally:
        src.close()
    print(format_table(rows, args.target_agreement))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print("figure:", plots.exit_calibration(rows, Path(args.json).with_suffix(".png"), args.target_agreement))
    return 0


def diverse_samples(bundle: Path, heldout: Path, max_tokens: int) -> list:
    """The full model's greedy answers (fp32 transformers, its own KV cache, stop at EOS) to the
    hand-written diverse held-out prompts, as calibration Samples (targets = answer tokens)."""
    import torch
    from transformers import AutoTokenizer

    from quantize.calibration_data import Sample
    from quantize.source import load_source
    from quantize.verify import build_reference_model

    tok = AutoTokenizer.from_pretrained(str(bundle / "cloud"))
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    src = load_source("demo")
    try:
        model = build_reference_model(src)
    finally:
        src.close()
    samples = []
    with torch.inference_mode():
        for line in heldout.read_text().splitlines():
            if not line.strip():
                continue
            text = tok.apply_chat_template(json.loads(line)["messages"], add_generation_prompt=True, tokenize=False)
            ids = list(tok(text, add_special_tokens=False).input_ids)
            out = model(torch.tensor([ids]), use_cache=True)
            answer = [int(out.logits[0, -1].argmax())]
            while answer[-1] not in eos and len(answer) < max_tokens:
                out = model(torch.tensor([[answer[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                answer.append(int(out.logits[0, -1].argmax()))
            samples.append(Sample(prompt=ids, answer=answer))
    return samples


def chain_with_stop(stats, stop: float, gamma_max: int) -> dict:
    """Greedy spec over teacher-forced answers: draft while the exit confidence >= `stop` (at
    least one draft, at most gamma_max), the cloud accepts the matching prefix and adds its token.
    Returns tokens per round trip and drafted tokens per round trip."""
    tokens = rounds = drafted = 0
    off = 0
    for n in stats.lengths:
        match, conf = stats.correct[off: off + n], stats.confidence[off: off + n]
        off += n
        p = 0
        while p < n:
            d = 1
            while d < gamma_max and p + d < n and conf[p + d] >= stop:
                d += 1
            a = 0
            while a < d and p + a < n and match[p + a]:
                a += 1
            tokens += min(a + 1, n - p)
            drafted += min(d, n - p)
            rounds += 1
            p += a + 1
    return {"stop": stop, "gamma_max": gamma_max, "tokens_per_round_trip": round(tokens / max(1, rounds), 3),
            "drafted_per_round_trip": round(drafted / max(1, rounds), 3)}


def measure_bundle(bundle: Path, heldout: Path, args) -> int:
    """Exit quality of an existing export on both held-out sets: the export's in-template split
    (its manifest's calibration) and the diverse hand-written set, measured here with llama.cpp
    on the edge GGUF, teacher-forced on the full model's greedy answers, generated positions only."""
    from fogline.manifest import load_manifest
    from quantize.calibrate import measure, spec_accepted_length, summarize

    m = load_manifest(bundle / "edge")
    c, a = m.calibration or {}, m.exit_adapter or {}
    t0 = time.time()
    samples = diverse_samples(bundle, heldout, args.tokens)
    stats = measure(bundle / "edge" / "edge.gguf", samples, args.threads)
    div = summarize(stats, args.target_agreement)
    chains = [chain_with_stop(stats, s, g) for g in (4, 8) for s in STOP_CONFIDENCES]
    row = {"bundle": str(bundle), "K": m.split, "quant": m.quant,
           "in_template": {k: c.get(k) for k in ("agreement_top1", "exit_rate_at_target", "spec_mean_accepted",
                                                  "default_tau", "positions", "answers")},
           "diverse": {k: div[k] for k in ("agreement_top1", "exit_rate_at_target", "default_tau",
                                           "spec_mean_accepted", "positions", "answers")},
           "diverse_gamma4_check": round(spec_accepted_length(stats, 4), 4),
           "diverse_chain_with_stop": chains, "diverse_curve": div["curve"],
           "train_seconds": a.get("train_seconds"), "train_cpu_seconds": a.get("train_cpu_seconds"),
           "measure_seconds": round(time.time() - t0, 1)}
    t, d = row["in_template"], row["diverse"]
    print(f"exit quality of {bundle} (K={m.split} {m.quant}, target agreement {args.target_agreement:.0%}, "
          f"adapter trained in {row['train_seconds']} s)")
    print(f"{'held-out set':<34} {'answers':>7} {'positions':>9} {'agree':>7} {'exit@tgt':>9} {'spec γ=4':>9}")
    print(f"{'in-template split (manifest)':<34} {t['answers'] or 0:>7} {t['positions'] or 0:>9} "
          f"{(t['agreement_top1'] or 0):>7.1%} {(t['exit_rate_at_target'] or 0):>9.1%} {(t['spec_mean_accepted'] or 0):>9.2f}")
    print(f"{'diverse, hand-written (' + heldout.name + ')':<34} {d['answers']:>7} {d['positions']:>9} "
          f"{d['agreement_top1']:>7.1%} {d['exit_rate_at_target']:>9.1%} {d['spec_mean_accepted']:>9.2f}")
    print("diverse set, chain drafting with a confidence stop (tokens / drafted per round trip):")
    for ch in chains:
        print(f"  γ≤{ch['gamma_max']}, stop below {ch['stop']:.1f}: {ch['tokens_per_round_trip']:.2f} tokens, "
              f"{ch['drafted_per_round_trip']:.2f} drafted")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    return 0


def format_table(rows: list[dict], target: float) -> str:
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    lines = [
        f"exit quality on {r0['answers']} held-out greedy answers ({r0['positions']} generated positions), "
        f"llama.cpp {r0['quant']}, target agreement {target:.0%}, spec γ=4 (tokens/round incl. the cloud's)",
        f"{'':>3} {'':>6} | {'bare head':^27} | {'exit adapter (' + str(r0['blocks']) + ' block)':^34} | training",
        f"{'K':>3} {'edge':>6} | {'agree':>7} {'exit@tgt':>9} {'spec':>7} | {'agree':>7} {'exit@tgt':>9} "
        f"{'τ':>5} {'spec':>7}  | {'positions':>9} {'epochs':>6} {'wall s':>7} {'CPU s':>7}",
    ]
    for r in rows:
        b, a = r["bare"], r["adapter"]
        lines.append(
            f"{r['K']:>3} {r['edge_compute_fraction']:>6.0%} | {b['agreement_top1']:>7.1%} "
            f"{b['exit_rate_at_target']:>9.1%} {b['spec_mean_accepted']:>7.2f} | {a['agreement_top1']:>7.1%} "
            f"{a['exit_rate_at_target']:>9.1%} {a['default_tau']:>5} {a['spec_mean_accepted']:>7.2f}  | "
            f"{r['train_positions']:>9} {r['epochs']:>6} {r['train_seconds']:>7} {r['train_cpu_seconds']:>7}"
            + ("  (cached)" if r["cached"] else ""))
    lines.append("edge = edge multiply-accumulates per token (K + adapter blocks + LM head) / full model's")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
