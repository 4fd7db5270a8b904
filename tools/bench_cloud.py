"""Benchmark the cloud runtime. One invocation, two parts, medians, a table with ratios.

(a) Per-token decode latency of fogline's deep-layer runtime running the *whole*
    model (K=0: DeepModel over all L layers + the token embedding) against
    Hugging Face `generate` (greedy, its own KV cache) on the same float32
    weights, same device, same torch thread count. Rows: fogline eager, and
    fogline with `fast_gemv` (the server's `--fast-gemv`: single-row matmuls as
    a compiled fused multiply-reduce).

(b) Aggregate deep-layer decode throughput through a real `fogline cloud serve`
    process (websocket, session store, batcher) for 1, 4, 16, 64 concurrent
    sessions, against the same work done one session at a time on the same
    server. Every session first uploads a prefill of h_K rows (untimed), then
    runs `--decode-steps` infer steps, each waiting for its token; tokens/s =
    sessions x steps / wall time of the decode phase.

    python tools/bench_cloud.py                        # demo model, export in out/k20q8
    python tools/bench_cloud.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


# --- (a) whole model vs HF generate ------------------------------------------------------


def part_a(args: argparse.Namespace) -> list[str]:
    import torch
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from cloud_runtime.deep_model import Segment, load_deep_model
    from quantize.source import load_source
    from quantize.verify import build_reference_model

    src = load_source(args.source)
    tok = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    prompt = list(tok(text, add_special_tokens=False).input_ids)
    n = args.new_tokens
    hf = build_reference_model(src)
    eager = load_deep_model(src.spec, 0, src.state)
    fast = load_deep_model(src.spec, 0, src.state)
    t0 = time.perf_counter()
    fast_ok = fast.enable_fast_gemv()
    compile_s = time.perf_counter() - t0

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.t: list[float] = []
            self.tokens: list[int] = []

        def put(self, value) -> None:
            self.t.append(time.perf_counter())
            if len(self.t) > 1:
                self.tokens.extend(int(v) for v in value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    gen_cfg = copy.deepcopy(hf.generation_config)
    gen_cfg.update(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)

    def run_hf() -> tuple[list[float], list[int]]:
        clock = Clock()
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt]), generation_config=gen_cfg, streamer=clock)
        return [b - a for a, b in zip(clock.t[1:], clock.t[2:])], clock.tokens

    def run_ours(model) -> tuple[list[float], list[int]]:
        cache = model.new_cache()
        ids = torch.tensor(prompt)
        normed = model.forward_ragged([Segment(model.embed(ids), cache, 0)])
        token = int(model.logits(normed[-1:]).argmax())
        tokens, lat = [token], []
        for i in range(n - 1):
            t = time.perf_counter()
            normed = model.forward_ragged([Segment(model.embed(torch.tensor([token])), cache, len(prompt) + i)])
            token = int(model.logits(normed).argmax())
            lat.append(time.perf_counter() - t)
            tokens.append(token)
        return lat, tokens

    runs: dict[str, list[float]] = {"hf": [], "eager": [], "fast": []}
    toks: dict[str, list[int]] = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit every row alike
        for name, fn in (("hf", run_hf), ("eager", lambda: run_ours(eager)), ("fast", lambda: run_ours(fast))):
            if name == "fast" and not fast_ok:
                continue
            lat, t = fn()
            runs[name].extend(lat)
            toks[name] = t
    hf_med = statistics.median(runs["hf"])

    def same(name: str) -> str:
        a, b = toks[name], toks["hf"]
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{k}/{n}"

    lines = [f"(a) whole model (K=0 equivalent): {src.description}, float32, {args.device}, "
             f"{torch.get_num_threads()} torch thread(s); prompt {len(prompt)} tokens, {n} new tokens, "
             f"{args.repeats} interleaved rounds; per-token decode latency",
             f"  {'runtime':<38} {'median ms':>10} {'p90 ms':>8} {'speed-up vs HF':>15} {'same tokens as HF':>18}",
             f"  {'HF transformers generate (greedy)':<38} {hf_med * 1e3:>10.1f} {pctl(runs['hf'], 90) * 1e3:>8.1f} "
             f"{1.0:>14.2f}x {'-':>18}"]
    for name, label in (("eager", "fogline DeepModel, eager"),
                        ("fast", f"fogline DeepModel, fast_gemv (compile {compile_s:.0f} s)")):
        if not runs[name]:
            lines.append(f"  {label:<38} unavailable (torch.compile failed)")
            continue
        med = statistics.median(runs[name])
        lines.append(f"  {label:<38} {med * 1e3:>10.1f} {pctl(runs[name], 90) * 1e3:>8.1f} {hf_med / med:>14.2f}x "
                     f"{same(name):>18}")
    src.close()
    return lines


# --- (b) concurrent sessions through the server ------------------------------------------------


def ensure_bundle(path: Path) -> Path:
    if (path / "cloud" / "manifest.json").is_file():
        return path
    from quantize.export import ExportRequest, run_export

    print(f"exporting the demo model to {path} (K=20, Q8_0) ...", file=sys.stderr)
    run_export(ExportRequest(source="demo", out=path, split=20, quant="Q8_0", progress=False),
               log=lambda *a: None)
    return path


def start_server(bundle: Path, threads: int, fast_gemv: bool, device: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "fogline.cli", "cloud", "serve", "--bundle", str(bundle / "cloud"), "--port", "0",
           "--threads", str(threads), "--device", device, "--log-level", "WARNING",
           "--kv-budget-bytes", str(8 << 30)]
    if fast_gemv:
        cmd.append("--fast-gemv")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("cloud server did not start:\n" + "".join(lines[-20:]))
        lines.append(line)
        if m := re.search(r"http://[\d.]+:(\d+)", line):
            return proc, int(m.group(1))


async def _batch_stats(port: int) -> tuple[float, float]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
    total = float(re.search(r"^fogline_cloud_batch_sessions_sum ([\d.e+]+)", text, re.M).group(1))
    count = float(re.search(r"^fogline_cloud_batch_sessions_count ([\d.e+]+)", text, re.M).group(1))
    return total, count


async def _bench_server(port: int, manifest, args: argparse.Namespace) -> list[tuple[int, float, float, float]]:
    from edge_runtime.cloud_client import CloudLink

    d, p, t = manifest.hidden_size, args.prefill, args.decode_steps
    rng = np.random.default_rng(0)
    prefill = rng.standard_normal((p, d)).astype(np.float32)
    steps = rng.standard_normal((t, d)).astype(np.float32)
    results = []
    async with CloudLink(f"ws://127.0.0.1:{port}/ws", fingerprint=manifest.fingerprint, split=manifest.split) as link:
        await link.infer("warmup", 0, prefill)
        await link.close_session("warmup")
        run = 0

        async def decode(sid: str) -> None:
            for i in range(t):
                await link.infer(sid, p + i, steps[i:i + 1])

        async def one_round(n: int, concurrent: bool) -> tuple[float, float]:
            nonlocal run
            run += 1
            sids = [f"b{run}-{i}" for i in range(n)]
            await asyncio.gather(*(link.infer(s, 0, prefill) for s in sids))  # untimed
            s0, c0 = await _batch_stats(port)
            t0 = time.perf_counter()
            if concurrent:
                await asyncio.gather(*(decode(s) for s in sids))
            else:
                for s in sids:
                    await decode(s)
            wall = time.perf_counter() - t0
            s1, c1 = await _batch_stats(port)
            await asyncio.gather(*(link.close_session(s) for s in sids))
            return n * t / wall, (s1 - s0) / max(c1 - c0, 1)

        for n in args.sessions:
            conc, seq, per_pass = [], [], []
            for _ in range(args.repeats):
                tps, sp = await one_round(n, True)
                conc.append(tps)
                per_pass.append(sp)
                seq.append((await one_round(n, False))[0])
            results.append((n, statistics.median(conc), statistics.median(seq), statistics.median(per_pass)))
            print(f"  ... {n} sessions done", file=sys.stderr)
    return results


def part_b(args: argparse.Namespace) -> list[str]:
    from fogline.manifest import load_manifest

    bundle = ensure_bundle(Path(args.bundle))
    manifest = load_manifest(bundle / "cloud", role="cloud")
    lines = []
    for fast in args.b_fast_gemv:
        proc, port = start_server(bundle, args.threads, fast, args.device)
        try:
            rows = asyncio.run(_bench_server(port, manifest, args))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        lines.append(f"(b) deep layers [{manifest.split}, {manifest.n_layers}) through `fogline cloud serve` "
                     f"({'fast_gemv' if fast else 'eager'}, {args.threads or 'default'} torch thread(s), "
                     f"{args.device}); {args.prefill}-row prefill (untimed), then {args.decode_steps} decode steps "
                     f"per session; median of {args.repeats}")
        lines.append(f"  {'sessions':>8} {'concurrent tok/s':>17} {'one-at-a-time tok/s':>20} {'ratio':>7} "
                     f"{'sessions/pass':>14}")
        for n, conc, seq, per_pass in rows:
            lines.append(f"  {n:>8} {conc:>17.1f} {seq:>20.1f} {conc / seq:>6.2f}x {per_pass:>14.1f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="demo", help="source model for (a) (HF dir, .gguf or 'demo')")
    ap.add_argument("--bundle", default=str(REPO / "out" / "k20q8"), help="export dir for (b); made if missing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both sides (0 = torch default; 1 is steadier on a shared box)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--b-fast-gemv", type=lambda s: [x == "fast_gemv" for x in s.split(",")],
                    default=[False, True], help="server configs for (b): eager,fast_gemv")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    args = ap.parse_args()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = []
    if not args.skip_a:
        out += part_a(args) + [""]
    if not args.skip_b:
        out += part_b(args)
    print("\n" + "\n".join(out))
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
