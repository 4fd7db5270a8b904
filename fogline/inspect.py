"""`fogline inspect DIR [--plot PNG]`: what a bundle holds, whether its files are intact, and
(--plot) its exit calibration curve as a picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from fogline.errors import BundleError
from fogline.manifest import MANIFEST_NAME, Manifest, check_pair, load_manifest, verify_files


def _halves(root: Path) -> list[Path]:
    if (root / MANIFEST_NAME).is_file():
        return [root]
    halves = [root / h for h in ("edge", "cloud") if (root / h / MANIFEST_NAME).is_file()]
    if not halves:
        raise BundleError(f"{root} holds no manifest.json, nor edge/ or cloud/ bundles")
    return halves


def describe(m: Manifest) -> list[str]:
    v = m.verification
    lines = [
        f"role         {m.role}",
        f"source       {m.source}",
        f"architecture {m.architecture}  L={m.n_layers}  d={m.hidden_size}  vocab={m.vocab_size}",
        f"split        K={m.split}  (edge layers [0,{m.split}), cloud layers [{m.split},{m.n_layers}))",
        f"quant        {m.quant}",
        f"fingerprint  {m.fingerprint}",
        f"fogline      {m.fogline_version} (manifest format {m.format_version})",
    ]
    if v:
        lines.append(f"verified     h_K rel. error {v.get('h_k_relative_error', float('nan')):.4%}, "
                     f"cloud argmax agreement {v.get('cloud_argmax_agreement', float('nan')):.0%} "
                     f"over {v.get('positions', '?')} positions, tokenizer match {v.get('tokenizer_match')}")
    if m.budget:
        lines.append(f"budget       {m.budget.get('reason')}")
    lines += describe_exit(m)
    return lines


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:6.1%}"


def describe_exit(m: Manifest) -> list[str]:
    """The exit head: adapter, calibration curve, spec drafting, split advice (edge bundles)."""
    if m.role != "edge":
        return []
    a, c = m.exit_adapter, m.calibration
    if not a:
        return ["exit head    bare (final norm + LM head on h_K; exported with --exit-adapter 0), not calibrated"]
    lines = [f"exit adapter {a.get('blocks')} block(s) after layer {m.split - 1} (initialised from layers "
             f"{a.get('init_layers')}), GGUF blocks {a.get('gguf_blocks')}, h_K tapped at l_out-{m.split - 1}",
             f"             trained on {a.get('train_positions')} generated positions, {a.get('epochs')} epochs, "
             f"loss {a.get('final_loss')}, seed {a.get('seed')}, {a.get('train_seconds')} s "
             f"({a.get('train_cpu_seconds')} CPU-s){' [from cache]' if a.get('cached') else ''}"]
    if not c:
        return lines
    bare = c.get("bare_head") or {}
    d = c.get("data") or {}
    lines += [
        f"calibration  {c.get('positions')} held-out generated positions in {c.get('answers')} greedy answers "
        f"(prompts: {d.get('prompts')}; llama.cpp on this GGUF)",
        f"             top-1 agreement with the full model {_pct(c.get('agreement_top1')).strip()} "
        f"(bare head {_pct(bare.get('agreement_top1')).strip()})",
        f"             default τ {c.get('default_tau')}: {_pct(c.get('exit_rate_at_target')).strip()} of tokens exit "
        f"at ≥{c.get('target_agreement', 0):.0%} agreement (bare head: "
        f"{_pct(bare.get('exit_rate_at_target')).strip()})",
        f"             spec drafting γ={c.get('spec_gamma')}: mean accepted length "
        f"{c.get('spec_mean_accepted')} tokens/round incl. the cloud's token "
        f"(bare head {bare.get('spec_mean_accepted')})",
    ]
    lk, head = c.get("prompt_lookup"), c.get("head_only") or {}
    if lk:
        lines.append(f"             greedy tokens: exit head + prompt lookup (λ by match length {lk.get('lambdas')}); "
                     f"the exit head alone: agreement {_pct(head.get('agreement_top1')).strip()}, "
                     f"{_pct(head.get('exit_rate_at_target')).strip()} exit, spec {head.get('spec_mean_accepted')}")
    lines.append("             τ      exit rate  agreement of exited tokens")
    for p in c.get("curve", []):
        mark = "  <- default" if p.get("tau") == c.get("default_tau") else ""
        lines.append(f"             {p['tau']:<6} {_pct(p.get('exit_rate'))}     {_pct(p.get('agreement'))}{mark}")
    if c.get("default_tau") == 1.0:
        lines.append("             1.0      never exit: no τ reaches the target, every token comes from the cloud"
                     "  <- default")
    advice = c.get("split_advice") or []
    if advice:
        lines.append("split advice edge cost vs exit quality (n/a: not measured on this machine; "
                     "tools/bench_exit.py measures)")
        lines.append("                K  edge compute  edge MiB  fits   agreement  exit@target  spec γ=4  bare agr.")
        for r in advice:
            fits = {True: "yes", False: "no", None: "-"}[r.get("fits_budget")]
            spec = "   n/a" if r.get("spec_mean_accepted") is None else f"{r['spec_mean_accepted']:6.2f}"
            lines.append(f"             {'*' if r.get('chosen') else ' '}{r['K']:>3}  {r['edge_compute_fraction']:>11.0%}"
                         f"  {r['edge_resident_mib']:>8.0f}  {fits:<4}  {_pct(r.get('agreement_top1'))}"
                         f"     {_pct(r.get('exit_rate_at_target'))}     {spec}    {_pct(r.get('bare_agreement_top1'))}")
    return lines


def main(args: argparse.Namespace) -> int:
    root = Path(args.bundle)
    if not root.exists():
        raise BundleError(f"{root} does not exist")
    manifests = {}
    bad = 0
    for half in _halves(root):
        m = load_manifest(half)
        manifests[m.role] = m
        print(f"== {half}")
        for line in describe(m):
            print("  " + line)
        problems = verify_files(half, m)
        for rel in sorted(m.files):
            status = next((p for p in problems if p.startswith(rel + ":")), None)
            print(f"  file {rel}: {'MISMATCH ' + status.split(': ', 1)[1] if status else 'ok'}")
        bad += len(problems)
    if "edge" in manifests and "cloud" in manifests:
        check_pair(manifests["edge"], manifests["cloud"])
        print("pair         edge and cloud halves match (fingerprint, K)")
    if getattr(args, "plot", None):
        print(f"plot         {plot_calibration(manifests.get('edge'), args.plot)}")
    if bad:
        raise BundleError(f"{bad} file(s) do not match the manifest")
    return 0


def plot_calibration(edge: Manifest | None, path: str) -> Path:
    """`--plot PATH`: the edge half's exit calibration curve as a PNG."""
    if edge is None or not edge.calibration or not edge.calibration.get("curve"):
        raise BundleError("--plot: no exit calibration to draw (it is in an edge half exported with an exit adapter)")
    from fogline.plots import calibration_curves

    title = f"exit calibration, K={edge.split} {edge.quant} ({edge.calibration.get('positions')} held-out positions)"
    return calibration_curves([(f"K={edge.split}", edge.calibration)], path, title)
