"""What the AMX guard costs where it is not needed: llama.cpp with and without its extra buffer
types (CPU_REPACK on this kind of host) on the same GGUFs, in one invocation.

`use_extra_bufts=False` is what fogline/host.py sets when the llama.cpp build has AMX; it also
turns off CPU_REPACK, which re-lays Q4_0 (and some other types') weights for the CPU's SIMD
width. Each run is a fresh child (edge_runtime/smoke.py: fogline's loader, greedy decode),
on/off interleaved so that load drift hits both alike. Prints medians and the ratio per GGUF
(and writes JSON with --json).

    python tools/bench_extra_bufts.py out/q8/edge/edge.gguf out/q4/edge/edge.gguf --repeats 7 --json extra_bufts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_runtime.smoke import SmokeShape, run_smoke  # noqa: E402
from fogline.host import EXTRA_BUFTS_ENV  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="+")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens per run")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens decoded per run")
    ap.add_argument("--threads", type=int, default=0, help="0: physical cores (the edge's default)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    shape = SmokeShape(n_ctx=args.prefill + args.tokens + 16, n_batch=args.prefill, prefill=args.prefill,
                       tokens=args.tokens, threads=args.threads)
    results, info = [], None
    for gguf in args.gguf:
        runs: dict[str, dict[str, list[float]]] = {m: {"decode": [], "prefill": []} for m in ("on", "off")}
        for _ in range(args.repeats):
            for mode in ("on", "off"):
                r = run_smoke(gguf, shape, env={**os.environ, EXTRA_BUFTS_ENV: mode}, timeout=600)
                if not r.ok:
                    print(f"{gguf} extra bufts {mode}: {r.summary}", file=sys.stderr)
                    return 1
                info = r.system_info
                runs[mode]["decode"].append(r.tokens_per_s)
                runs[mode]["prefill"].append(r.prefill_tokens_per_s)
        med = {m: {k: statistics.median(v) for k, v in runs[m].items()} for m in runs}
        row = {"gguf": str(gguf), "size_mib": round(Path(gguf).stat().st_size / 2**20, 1), "runs": runs,
               "median": med, "off_vs_on": {k: med["off"][k] / med["on"][k] for k in ("decode", "prefill")}}
        results.append(row)
        print(f"{Path(gguf).parent.parent.name}/{Path(gguf).name} ({row['size_mib']} MiB): decode tok/s on "
              f"{med['on']['decode']:.1f} / off {med['off']['decode']:.1f} (off/on {row['off_vs_on']['decode']:.2f}); "
              f"prefill tok/s on {med['on']['prefill']:.0f} / off {med['off']['prefill']:.0f} "
              f"(off/on {row['off_vs_on']['prefill']:.2f})", flush=True)
    if not args.json:
        return 0
    out = Path(args.json)
    out.write_text(json.dumps({"system_info": info, "machine": platform.machine(), "cpus": os.cpu_count(),
                               "load_average": os.getloadavg(), "repeats": args.repeats, "prefill": args.prefill,
                               "tokens": args.tokens, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
