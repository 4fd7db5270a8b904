"""`fogline inspect DIR`: what a bundle holds, and whether its files are intact."""

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
    if m.exit_adapter:
        lines.append(f"exit adapter {m.exit_adapter}")
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
    if bad:
        raise BundleError(f"{bad} file(s) do not match the manifest")
    return 0
