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
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--bundle", help="measure this existing export (in-template + diverse held-out set) "
                                     "instead of exporting")
    args = ap.parse_args()
    if args.bundle:
        r = measure_bundle(Path(args.bundle), args.source, args.target_agreement, args.threads)
        print(format_bundle(r, args.target_agreement))
        if args.json:
            from tools import plots
            Path(args.json).write_text(json.dumps(r, indent=1))
            print("figure:", plots.draft_trees(r, Path(args.json).with_suffix(".png")))
        return 0
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


def confidence_stop_replay(confidence, correct, lengths, c: float, gamma: int = 4) -> dict[str, float]:
    """quantize.calibrate.confidence_stop_replay on bare per-position arrays."""
    from quantize.calibrate import ExitStats
    from quantize.calibrate import confidence_stop_replay as replay
    return replay(ExitStats(confidence=confidence, correct=correct, lengths=lengths), c, gamma)


def confidence_stop_tokens_per_round(confidence, correct, lengths, c: float, gamma: int = 4) -> float:
    return confidence_stop_replay(confidence, correct, lengths, c, gamma)["tokens_per_round"]


HELDOUT_DIVERSE = REPO / "quantize" / "data" / "heldout_diverse.jsonl"
CONF_STOPS = (0.0, 0.3, 0.5, 0.7, 0.85)
# Draft trees replayed on the diverse set (children per node at each depth), fixed in advance, not tuned
# on it: the γ=4, 6 and 8 chains, then trees that branch at the first one or two depths, and wider ones.
TREES = ((1, 1, 1, 1), (1,) * 6, (1,) * 8, (2, 1, 1, 1), (3, 1, 1, 1), (2, 2, 1, 1), (4, 2, 1, 1),
         (2, 2, 2, 2), (2, 2, 2, 1, 1, 1))
TOPK = (1, 2, 3, 4, 8)


def tree_rows(stats) -> list[dict]:
    """Tokens per spec round trip for each of TREES (quantize.calibrate.tree_tokens_per_round), with what
    each costs: nodes (h_K rows the edge computes and the cloud verifies per round) and depth (sequential
    edge draft steps, each one batched llama.cpp decode of that depth's nodes)."""
    from quantize.calibrate import tree_nodes, tree_tokens_per_round
    return [{"widths": list(w), "nodes": tree_nodes(w), "depth": len(w),
             "tokens_per_round": round(tree_tokens_per_round(stats, w), 4)} for w in TREES]


def measure_bundle(bundle: Path, source: str, target: float, threads: int | None) -> dict:
    """Diverse-set exit quality of an existing bundle: full model's greedy answers (llama.cpp, full GGUF),
    teacher-forced through the bundle's edge GGUF, generated positions only; in-template figures from the
    bundle's manifest beside them."""
    from transformers import AutoTokenizer

    from fogline.manifest import load_manifest
    from quantize import calibrate as cal
    from quantize.calibration_data import DataConfig, generate, read_calib_text, render_prompt
    from quantize.exit_adapter import export_threads, full_model_gguf
    from quantize.source import load_source
    from edge_runtime.llama_backend import LlamaModel

    m = load_manifest(bundle / "edge")
    src = load_source(source)
    th = export_threads(threads)
    log = lambda line: print("  " + line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        full = full_model_gguf(src, source, th, log)
        tok = AutoTokenizer.from_pretrained(bundle / "cloud")
        prompts = read_calib_text(HELDOUT_DIVERSE)
        t0 = time.time()
        model = LlamaModel(full)
        try:
            enc = [model.tokenize(render_prompt(tok, p), add_special=False, parse_special=True) for p in prompts]
            samples, _ = generate(model, enc, [], DataConfig(), token_budget=None, desc="diverse answers",
                                  progress=False, threads=th)
        finally:
            model.close()
        gen_s = time.time() - t0
        t0 = time.time()
        stats = cal.measure(bundle / "edge" / "edge.gguf", samples, threads=th, ranks=True)
        meas_s = time.time() - t0
    finally:
        src.close()
    from fogline.prompt_lookup import PromptLookup

    c = m.calibration
    lookup = PromptLookup.from_manifest(c.get("prompt_lookup"))  # the bundle's fitted λ, never refitted here
    head = cal.summarize(stats, target)
    edge_stats = cal.with_lookup(stats, lookup) if lookup is not None else stats  # what the edge decodes
    summ = cal.summarize(edge_stats, target)
    replays = {str(stop): cal.confidence_stop_replay(edge_stats, stop) for stop in CONF_STOPS}
    stops = {k: round(r["tokens_per_round"], 4) for k, r in replays.items()}
    stop_rows = {k: round(r["cloud_rows_per_token"], 4) for k, r in replays.items()}
    trees = tree_rows(stats)
    topk = {str(k): round(float((stats.rank < k).mean()), 4) for k in TOPK}
    keys = ("agreement_top1", "default_tau", "exit_rate_at_target", "spec_mean_accepted")
    return {"bundle": str(bundle), "K": m.split if hasattr(m, "split") else None,
            "drafter": "exit+lookup" if lookup is not None else "exit",
            "prompt_lookup": lookup.to_manifest() if lookup is not None else None,
            "in_template": {k: c[k] for k in keys + ("positions", "answers")},
            "in_template_head_only": c.get("head_only"),
            "diverse": {k: summ[k] for k in keys + ("agreement_at_default_tau", "positions", "answers")},
            "diverse_head_only": {k: head[k] for k in keys},
            "diverse_confidence_stop_tokens_per_round": stops, "diverse_confidence_stop_cloud_rows_per_token": stop_rows,
            "diverse_trees": trees,
            "diverse_topk_agreement": topk,
            "diverse_curve": summ["curve"], "generate_seconds": round(gen_s, 1), "measure_seconds": round(meas_s, 1),
            "train_seconds": m.exit_adapter["train_seconds"], "calib_generate_seconds": c["data"]["generate_seconds"]}


def format_bundle(r: dict, target: float) -> str:
    t, d = r["in_template"], r["diverse"]
    lines = [f"exit quality of {r['bundle']} (llama.cpp on the edge GGUF, generated positions, target {target:.0%})",
             f"{'set':<12} {'answers':>7} {'positions':>9} {'agree':>7} {'exit@tgt':>9} {'τ':>5} {'spec γ=4':>9}"]
    rows = [("in-template", t, t), ("diverse", d, d)]
    if r.get("drafter") == "exit+lookup":
        lines[0] += f"; greedy tokens from the exit head + prompt lookup, λ by match length {r['prompt_lookup']['lambdas']}"
        rows = [("in-template", t, t), ("  head alone", r.get("in_template_head_only") or {}, t),
                ("diverse", d, d), ("  head alone", r["diverse_head_only"], d)]
    for name, x, n in rows:
        if not x:
            continue
        lines.append(f"{name:<12} {n['answers']:>7} {n['positions']:>9} {x['agreement_top1']:>7.1%} "
                     f"{x['exit_rate_at_target']:>9.1%} {x['default_tau']:>5} {x['spec_mean_accepted']:>9.2f}")
    lines.append("diverse, γ=4 chain with confidence stop c (c=0: plain chain), tokens/round trip and cloud rows "
                 "per kept token: " + ", ".join(
                     f"c={c}: {v:.2f} / {r['diverse_confidence_stop_cloud_rows_per_token'][c]:.2f}"
                     for c, v in r["diverse_confidence_stop_tokens_per_round"].items()))
    lines.append("diverse, exit head alone: full model's token within its top-k: "
                 + ", ".join(f"k={k}: {v:.1%}" for k, v in r["diverse_topk_agreement"].items()))
    lines.append("diverse, exit head alone: tokens/round trip by draft tree (children per node at each depth; "
                 "nodes = h_K rows verified per round, depth = edge draft steps):")
    lines.append(f"  {'tree':<18} {'nodes':>5} {'depth':>5} {'tokens/round':>12}")
    for t in r["diverse_trees"]:
        lines.append(f"  {'(' + ','.join(map(str, t['widths'])) + ')':<18} {t['nodes']:>5} {t['depth']:>5} "
                     f"{t['tokens_per_round']:>12.2f}")
    lines.append(f"adapter training {r['train_seconds']} s, calibration answers {r['calib_generate_seconds']} s "
                 f"(from the manifest); diverse answers {r['generate_seconds']} s, measurement {r['measure_seconds']} s")
    return "\n".join(lines)


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
