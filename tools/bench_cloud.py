"""Benchmark the cloud runtime. One invocation, three parts, medians, tables with ratios.

(a) Per-token decode latency of fogline's deep-layer runtime running the *whole*
    model (K=0: DeepModel over all L layers + the token embedding) against
    Hugging Face `generate` (greedy, its own KV cache) on the same float32
    weights, same device, same torch thread count. Rows: fogline as served (oneDNN
    prepacked linears on CPU), fogline with dense linears, and (`--fast-gemv`) as
    served with `--fast-gemv` (prepacked, single rows through the compiled matmul).

(b) Aggregate deep-layer decode throughput through a real `fogline cloud serve`
    process (websocket, session store, batcher) for 1, 4, 16, 64 concurrent
    sessions, against the same work done one session at a time on the same
    server. Every session first uploads a prefill of h_K rows (untimed), then
    runs `--decode-steps` infer steps, each waiting for its token; tokens/s =
    sessions x steps / wall time of the decode phase. `--baseline-repo DIR` serves
    the same bundle from another checkout's code (e.g. main before a change) in the
    same invocation, rounds interleaved, and prints the two side by side;
    `--b-fast-gemv eager,fast_gemv` does the same for the server's two matmul configs.

(c) Where this CPU's bound is: FLOPs/s of a plain large matmul and of the model's
    own matmul shapes, the memory bandwidth of a large streaming read, and what they
    imply for deep-layer tokens/s (2 x weights FLOPs per token; a lone decode step
    must stream every weight once).

    python tools/bench_cloud.py                        # demo model, export in out/k20q8
    python tools/bench_cloud.py --threads 2 --repeats 5
    python tools/bench_cloud.py --bundle out/k20q8 --sessions 1,16,64 --repeats 1 --baseline-repo /work/main
    python tools/bench_cloud.py --device cuda          # on a GPU box (tools/gpu_bench.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.procs import free_port, start_http, stop  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


# --- (a) whole model vs HF generate ------------------------------------------------------


def part_a(args: argparse.Namespace, report: dict) -> list[str]:
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
    dev = torch.device(args.device)
    hf = build_reference_model(src).to(dev)
    served = load_deep_model(src.spec, 0, src.state, device=dev)
    dense = load_deep_model(src.spec, 0, src.state, device=dev, prepack=False)
    fast, fast_ok, compile_s = None, False, 0.0
    if args.fast_gemv:
        fast = load_deep_model(src.spec, 0, src.state, device=dev)
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
            hf.generate(torch.tensor([prompt], device=dev), generation_config=gen_cfg, streamer=clock)
        return [b - a for a, b in zip(clock.t[1:], clock.t[2:])], clock.tokens

    def run_ours(model) -> tuple[list[float], list[int]]:
        cache = model.new_cache()
        ids = torch.tensor(prompt, device=dev)
        normed = model.forward_ragged([Segment(model.embed(ids), cache, 0)])
        token = int(model.logits(normed[-1:]).argmax())
        tokens, lat = [token], []
        for i in range(n - 1):
            t = time.perf_counter()
            normed = model.forward_ragged([Segment(model.embed(torch.tensor([token], device=dev)), cache,
                                                   len(prompt) + i)])
            token = int(model.logits(normed).argmax())  # the .item() waits for a GPU too
            lat.append(time.perf_counter() - t)
            tokens.append(token)
        cache.release()
        return lat, tokens

    runs: dict[str, list[float]] = {"hf": [], "served": [], "dense": [], "fast": []}
    toks: dict[str, list[int]] = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit every row alike
        for name, fn in (("hf", run_hf), ("served", lambda: run_ours(served)), ("dense", lambda: run_ours(dense)),
                         ("fast", lambda: run_ours(fast))):
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
    packed = "oneDNN prepacked" if not isinstance(served.lm_head, torch.nn.Linear) else "dense (no oneDNN here)"
    report["a"] = {"model": src.description, "device": args.device, "threads": torch.get_num_threads(),
                   "prompt_tokens": len(prompt), "new_tokens": n, "repeats": args.repeats,
                   "hf": {"median_ms": hf_med * 1e3, "p90_ms": pctl(runs["hf"], 90) * 1e3}}
    for name, label in (("served", f"fogline DeepModel, {packed}"), ("dense", "fogline DeepModel, dense F.linear"),
                        ("fast", f"fogline DeepModel, {packed} + fast_gemv (compile {compile_s:.0f} s)")):
        if not runs[name]:
            if name == "fast" and args.fast_gemv:
                lines.append(f"  {label:<38} unavailable (torch.compile failed)")
            continue
        med = statistics.median(runs[name])
        report["a"][name] = {"label": label, "median_ms": med * 1e3, "p90_ms": pctl(runs[name], 90) * 1e3,
                             "speedup_vs_hf": hf_med / med, "same_tokens_as_hf": same(name)}
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


def start_server(bundle: Path, threads: int, fast_gemv: bool, device: str,
                 repo: Path = REPO) -> tuple[subprocess.Popen, int]:
    """`fogline cloud serve` from `repo`'s code (tools.procs: its checkout first on sys.path, and the
    cwd); refuses one asked for --fast-gemv that serves eager (its /health says which)."""
    port = free_port()
    argv = ["-m", "fogline.cli", "cloud", "serve", "--bundle", str(bundle.resolve() / "cloud"),
            "--port", str(port), "--threads", str(threads), "--device", device, "--log-level", "WARNING",
            "--kv-budget-bytes", str(8 << 30)] + (["--fast-gemv"] if fast_gemv else [])
    log_path = f"/tmp/bench_cloud_{port}.log"
    proc = start_http(argv, port, log_path, repo=repo)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        if fast_gemv and not json.load(r).get("fast_gemv"):
            stop(proc)
            raise SystemExit(f"the cloud server was asked for --fast-gemv but serves eager; see {log_path}")
    return proc, port


async def _batch_stats(port: int) -> tuple[float, float]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
    total = float(re.search(r"^fogline_cloud_batch_sessions_sum ([\d.e+]+)", text, re.M).group(1))
    count = float(re.search(r"^fogline_cloud_batch_sessions_count ([\d.e+]+)", text, re.M).group(1))
    return total, count


Row = tuple[int, float, float, float]  # sessions, concurrent tok/s, one-at-a-time tok/s, sessions per pass


async def _bench_servers(ports: dict[str, int], manifest, args: argparse.Namespace) -> dict[str, list[Row]]:
    """The same rounds on every server, interleaved per repeat (load changes hit all alike)."""
    from edge_runtime.cloud_client import CloudLink

    d, p, t = manifest.hidden_size, args.prefill, args.decode_steps
    rng = np.random.default_rng(0)
    prefill = rng.standard_normal((p, d)).astype(np.float32)
    steps = rng.standard_normal((t, d)).astype(np.float32)
    links = {name: CloudLink(f"ws://127.0.0.1:{port}/ws", fingerprint=manifest.fingerprint, split=manifest.split)
             for name, port in ports.items()}
    results: dict[str, list[Row]] = {name: [] for name in ports}
    run = 0
    try:
        for name, link in links.items():
            await link.connect()
            await link.infer("warmup", 0, prefill)
            await link.close_session("warmup")

        async def one_round(name: str, n: int, concurrent: bool) -> tuple[float, float]:
            nonlocal run
            run += 1
            link, port = links[name], ports[name]
            sids = [f"b{run}-{i}" for i in range(n)]

            async def decode(sid: str) -> None:
                for i in range(t):
                    await link.infer(sid, p + i, steps[i:i + 1])

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
            conc: dict[str, list[float]] = {k: [] for k in ports}
            seq: dict[str, list[float]] = {k: [] for k in ports}
            per_pass: dict[str, list[float]] = {k: [] for k in ports}
            for _ in range(args.repeats):
                for name in ports:
                    tps, sp = await one_round(name, n, True)
                    conc[name].append(tps)
                    per_pass[name].append(sp)
                    seq[name].append((await one_round(name, n, False))[0])
            for name in ports:
                results[name].append((n, statistics.median(conc[name]), statistics.median(seq[name]),
                                      statistics.median(per_pass[name])))
            print(f"  ... {n} sessions done", file=sys.stderr)
    finally:
        for link in links.values():
            await link.close()
    return results


def part_b(args: argparse.Namespace, report: dict) -> list[str]:
    from fogline.manifest import load_manifest

    bundle = ensure_bundle(Path(args.bundle))
    manifest = load_manifest(bundle / "cloud", role="cloud")
    repos = {"this": REPO}
    if args.baseline_repo:
        repos["baseline"] = Path(args.baseline_repo).resolve()
    configs = list(dict.fromkeys(args.b_fast_gemv))
    label = {False: "eager", True: "fast_gemv"}
    procs, ports = [], {}
    try:  # every (config, code) pair served at once, their rounds interleaved: load hits all alike
        for fast in configs:
            for name, repo in repos.items():
                proc, ports[f"{label[fast]}/{name}"] = start_server(bundle, args.threads, fast, args.device, repo)
                procs.append(proc)
        rows = asyncio.run(_bench_servers(ports, manifest, args))
    finally:
        stop(*procs)
    lines = []
    for fast in configs:
        mine = {name: rows[f"{label[fast]}/{name}"] for name in repos}
        lines.append(f"(b) deep layers [{manifest.split}, {manifest.n_layers}) through `fogline cloud serve` "
                     f"({label[fast]}, {args.threads or 'default'} torch thread(s), "
                     f"{args.device}); {args.prefill}-row prefill (untimed), then {args.decode_steps} decode steps "
                     f"per session; median of {args.repeats}" + (", rounds interleaved" if len(ports) > 1 else ""))
        lines.append(f"  {'code':<10} {'sessions':>8} {'concurrent tok/s':>17} {'one-at-a-time tok/s':>20} "
                     f"{'ratio':>7} {'sessions/pass':>14} {'step ms (1 session)':>20}")
        report.setdefault("b", []).append({
            "fast_gemv": fast, "split": manifest.split, "n_layers": manifest.n_layers, "threads": args.threads,
            "device": args.device, "prefill": args.prefill, "decode_steps": args.decode_steps, "repeats": args.repeats,
            "servers": {name: {"repo": str(repo), "rows": [
                {"sessions": n, "concurrent_tok_s": conc, "one_at_a_time_tok_s": seq, "ratio": conc / seq,
                 "sessions_per_pass": per_pass, "step_ms_one_session": 1e3 / seq}
                for n, conc, seq, per_pass in mine[name]]} for name, repo in repos.items()}})
        for name in repos:
            for n, conc, seq, per_pass in mine[name]:
                lines.append(f"  {name:<10} {n:>8} {conc:>17.1f} {seq:>20.1f} {conc / seq:>6.2f}x {per_pass:>14.1f} "
                             f"{1e3 / seq:>20.1f}")
        if "baseline" in repos:
            lines.append(f"  baseline = {repos['baseline']}; this / baseline:")
            for (n, c1, s1, _), (_, c0, s0, _) in zip(mine["this"], mine["baseline"]):
                lines.append(f"  {'':<10} {n:>8} {c1 / c0:>16.2f}x {s1 / s0:>19.2f}x   one-session step time "
                             f"{s0 / s1:.2f}x of baseline's")
    if len(configs) == 2:
        lines.append("  fast_gemv / eager (this code), same rounds interleaved:")
        for (n, c1, s1, _), (_, c0, s0, _) in zip(rows["fast_gemv/this"], rows["eager/this"]):
            lines.append(f"  {'':<10} {n:>8} concurrent {c1 / c0:.2f}x, one session's step time {s0 / s1:.2f}x "
                         f"of eager's")
    return lines


# --- (c) where the bound is ---------------------------------------------------------------


def part_c(args: argparse.Namespace, report: dict) -> list[str]:
    import torch
    import torch.nn.functional as F

    from cloud_runtime.deep_model import PackedLinear
    from fogline.manifest import load_manifest

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn, reps: int) -> float:
        fn()
        sync()
        xs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            xs.append(time.perf_counter() - t0)
        return min(xs)  # a bound: the best this machine did (others' load only slows it down)

    n = 2048
    a = torch.randn(n, n, device=dev)
    gflops = 2 * n ** 3 / timed(lambda: a @ a, 5) / 1e9
    big = torch.randn(64 << 20, device=dev)  # 256 MiB
    gbps = big.numel() * 4 / timed(lambda: big.sum(), 5) / 1e9
    manifest = load_manifest(ensure_bundle(Path(args.bundle)) / "cloud", role="cloud")
    cfg = json.loads((Path(args.bundle) / "cloud" / "config.json").read_text())
    d, inter, vocab = manifest.hidden_size, cfg["intermediate_size"], manifest.vocab_size
    nh = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // nh
    nkv = cfg.get("num_key_value_heads", nh)
    shapes = [((nh + 2 * nkv) * hd, d), (d, nh * hd), (2 * inter, d), (d, inter)]
    per_layer = sum(o * i for o, i in shapes)
    n_deep = manifest.n_layers - manifest.split
    weights = n_deep * per_layer + vocab * d
    flop_tok = 2 * weights
    report["c"] = {"device": args.device, "threads": torch.get_num_threads(), "matmul_gflops": gflops,
                   "stream_gbps": gbps, "deep_weights": weights, "compute_bound_tok_s": gflops * 1e9 / flop_tok,
                   "lone_step_stream_ms": weights * 4 / (gbps * 1e9) * 1e3}
    lines = [f"(c) this machine's bounds ({args.device}, {torch.get_num_threads()} thread(s)): plain {n}^3 fp32 matmul "
             f"{gflops:.0f} GFLOP/s; streaming read of 256 MiB {gbps:.0f} GB/s",
             f"  deep layers [{manifest.split}, {manifest.n_layers}) + LM head: {weights / 1e6:.1f} M weights, "
             f"{flop_tok / 1e6:.0f} MFLOP per token -> compute bound {gflops * 1e9 / flop_tok:.0f} tok/s; "
             f"a lone step streams {weights * 4 / 1e6:.0f} MB of fp32 weights -> >= "
             f"{weights * 4 / (gbps * 1e9) * 1e3:.1f} ms per step if none stays in cache",
             f"  {'matmul [rows, in] x [in, out]':<34} {'rows':>5} {'F.linear GF/s':>14} {'oneDNN GF/s':>12}"]
    use_packed = dev.type == "cpu" and torch.backends.mkldnn.is_available()
    for o, i in shapes + [(vocab, d)]:
        lin = torch.nn.Linear(i, o, bias=False).to(dev).requires_grad_(False)
        packed = PackedLinear(lin) if use_packed else None
        for rows in (1, 16, 64):
            x = torch.randn(rows, i, device=dev)
            with torch.inference_mode():
                t_dense = timed(lambda: F.linear(x, lin.weight), 10)
                t_packed = timed(lambda: packed(x), 10) if packed is not None else float("nan")
            fl = 2 * rows * o * i / 1e9
            lines.append(f"  {f'[{rows}, {i}] x [{i}, {o}]':<34} {rows:>5} {fl / t_dense:>14.1f} "
                         f"{fl / t_packed:>12.1f}")
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
                    default=[False], help="server configs for (b), comma-separated: eager,fast_gemv "
                                          "(both: served side by side, rounds interleaved)")
    ap.add_argument("--fast-gemv", action="store_true", help="(a): also time the compiled single-row matmul")
    ap.add_argument("--baseline-repo", default="",
                    help="(b): also serve from this checkout's code (e.g. /work/main), interleaved, side by side")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--skip-c", action="store_true")
    ap.add_argument("--json", help="also write the figures of every part run to this file")
    args = ap.parse_args()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out: list[str] = []
    report: dict = {}
    if not args.skip_a:
        out += part_a(args, report) + [""]
    if not args.skip_b:
        out += part_b(args, report) + [""]
    if not args.skip_c:
        out += part_c(args, report)
    print("\n" + "\n".join(out))
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)")
    if args.json:
        report["machine"] = {"cpus": os.cpu_count(), "load_1min": load[0], "load_5min": load[1]}
        Path(args.json).write_text(json.dumps(report, indent=1))
        print("json:", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
