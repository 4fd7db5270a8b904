"""Edge throughput, side by side, on one GGUF with the same thread count:

  (a) plain llama-cpp-python (`llama_cpp.Llama.generate`, greedy, its C sampler)
  (b) the fogline engine in-process (continuous batching engine, greedy)
  (b') the same with h_K capture on (what a cloud-paired edge pays) through the eval
       callback, which a GGUF whose last block is K-1 needs (this demo bundle)
  (b'') capture through llama.cpp's layer-input copy, which a GGUF with an exit adapter
       gets (measured one block lower on this bundle)
  (c) fogline over HTTP (`fogline edge serve` subprocess, SSE streaming /v1/completions)

Time to first token (TTFT) on a short chat prompt, streamed /v1/chat/completions, the same
aiohttp client timing (c) and `python -m llama_cpp.server` (llama-cpp-python's own OpenAI
server, when its [server] extra is installed) on the same GGUF and threads, one request after the
other, alternating: p50/p95 of each and the p50 ratio (target <= 1.1).

Prompt tokens/s is prompt length / time to first token; decode tokens/s is
(generated - 1) / (last token - first token). Then aggregate completion
tokens/s with 1, 2, 4, 8 concurrent streams (total tokens / wall time, prefill
included), in-process and over HTTP. Every figure is the median over
--repeats runs; the variants are interleaved in each repeat so that a noisy
neighbour hurts them alike.

    python tools/bench_edge.py --bundle out/k20q8/edge [--threads N] [--repeats 5] [--json edge.json]
    python tools/bench_edge.py --quick --json edge.json   # one short pass of everything (tests)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_runtime.config import load_config, physical_cores  # noqa: E402
from edge_runtime.engine import GenerationRequest  # noqa: E402
from edge_runtime.loader import EdgeRuntime, load_runtime, open_bundle  # noqa: E402
from edge_runtime.llama_backend import host_params_for_llama_class  # noqa: E402
from edge_runtime.sampling import SamplingParams  # noqa: E402


@dataclass
class Run:
    prompt_tps: float
    decode_tps: float


def prompt_for(model, n: int, salt: int) -> list[int]:
    """n tokens of real text, different for every run (no prefix cache can help)."""
    words = ("the edge decodes shallow layers while the cloud holds deep ones and a small device answers "
             "many requests at once with continuous batching over llama cpp sequences").split()
    text = f"Run {salt}: " + " ".join(words[(salt + i * 7) % len(words)] for i in range(4 * n))
    return model.tokenize(text)[:n]


# --------------------------------------------------------------------------- (a) plain llama-cpp-python


def bench_plain(llm, prompt: list[int], n_gen: int) -> Run:
    llm._ctx.kv_cache_clear()
    llm.reset()
    t0 = time.perf_counter()
    gen = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
    next(gen)
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        next(gen)
    t2 = time.perf_counter()
    gen.close()
    return Run(len(prompt) / (t1 - t0), (n_gen - 1) / (t2 - t1))


# --------------------------------------------------------------------------- (b) engine in-process


def bench_engine(rt: EdgeRuntime, prompt: list[int], n_gen: int, capture: bool = False) -> Run:
    t0 = time.perf_counter()
    req = GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(temperature=0.0, max_tokens=n_gen,
                                                                       ignore_eos=True),
                            mode="collab" if capture else "edge", capture_hidden=capture)
    t1 = t2 = None
    n = 0
    for ev in rt.engine.generate(req):
        if ev.choice is not None:
            n += 1
            t2 = time.perf_counter()
            t1 = t1 or t2
    assert n == n_gen, n
    return Run(len(prompt) / (t1 - t0), (n_gen - 1) / (t2 - t1))


def aggregate_engine(rt: EdgeRuntime, prompts: list[list[int]], n_gen: int) -> float:
    import queue

    q: queue.SimpleQueue = queue.SimpleQueue()
    t0 = time.perf_counter()
    for p in prompts:
        rt.engine.submit(GenerationRequest(uuid.uuid4().hex, p, SamplingParams(temperature=0.0, max_tokens=n_gen,
                                                                                 ignore_eos=True)), q.put)
    done = total = 0
    while done < len(prompts):
        ev = q.get()
        if ev.finish_reason is not None:
            done += 1
            total += ev.completion_tokens
    return total / (time.perf_counter() - t0)


def raw_decode_ceiling(model, threads: int, n_rows: int, steps: int = 32) -> float:
    """tok/s of bare llama_decode calls with one row from each of n_rows sequences: what
    continuous batching can at best get from llama.cpp's kernels on this machine."""
    from edge_runtime.llama_backend import BatchRow, LlamaContext

    ctx = LlamaContext(model, n_ctx=n_rows * 256, n_batch=512, n_seq=n_rows, n_threads=threads)
    try:
        for s in range(n_rows):
            ctx.decode([BatchRow(100 + i, i, s, i == 31) for i in range(32)])
        t0 = time.perf_counter()
        for k in range(steps):
            ctx.decode([BatchRow(5, 32 + k, s, True) for s in range(n_rows)])
        return n_rows * steps / (time.perf_counter() - t0)
    finally:
        ctx.close()


# --------------------------------------------------------------------------- (c) over HTTP


class Daemon:
    def __init__(self, bundle: str, threads: int, parallel: int, ctx_size: int) -> None:
        self.log = Path(tempfile.mkstemp(prefix="bench-edge-", suffix=".log")[1])
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "fogline.cli", "edge", "serve", "--bundle", bundle,
                                          "--port", "0", "--threads", str(threads), "--parallel", str(parallel),
                                          "--ctx-size", str(ctx_size), "--no-verify-bundle"],
                                         stdout=f, stderr=subprocess.STDOUT, env=env)
        self.base: str | None = None
        end = time.monotonic() + 120
        while time.monotonic() < end and self.base is None:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited:\n{self.log.read_text()}")
            m = re.search(r"listening on (http://[0-9.]+:\d+)", self.log.read_text(errors="replace"))
            self.base = m.group(1) if m else None
            time.sleep(0.1)
        if self.base is None:
            raise SystemExit("daemon did not listen")
        self.model = asyncio.run(self._wait_ready())

    async def _wait_ready(self) -> str:
        import aiohttp

        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                try:
                    async with s.get(self.base + "/health") as r:
                        if r.status == 200:
                            return (await r.json())["model"]
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise SystemExit("daemon never became healthy")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.unlink(missing_ok=True)


async def _http_stream(session, d: Daemon, prompt: list[int], n_gen: int) -> tuple[float, float | None, float, int]:
    body = {"model": d.model, "prompt": prompt, "max_tokens": n_gen, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    t1 = t2 = None
    n = 0
    async with session.post(d.base + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["finish_reason"] is None:
                t2 = time.perf_counter()
                t1 = t1 or t2
    return t0, t1, t2, n


def bench_http(d: Daemon, prompt: list[int], n_gen: int) -> Run:
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            return await _http_stream(s, d, prompt, n_gen)

    t0, t1, t2, n = asyncio.run(go())
    assert n == n_gen, n
    return Run(len(prompt) / (t1 - t0), (n_gen - 1) / (t2 - t1))


def aggregate_http(d: Daemon, prompts: list[list[int]], n_gen: int) -> float:
    import aiohttp

    async def go():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(_http_stream(s, d, p, n_gen) for p in prompts))
            return sum(r[3] for r in res) / (time.perf_counter() - t0)

    return asyncio.run(go())


# --------------------------------------------------------------------------- TTFT, fogline vs llama_cpp.server

CHATS = ["Hi!", "What is 2+2?", "Name a color.", "Say hello.", "What is the capital of France?",
         "Give me a word that rhymes with cat.", "How many legs has a spider?", "Is water wet?"]


class LlamaCppServer:
    """`python -m llama_cpp.server` on the same GGUF and threads (flash attention on, as in (a))."""

    def __init__(self, gguf: Path, threads: int, ctx_size: int) -> None:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.base = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix="bench-edge-lcs-", suffix=".log")[1])
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                          "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
                                          "--n_threads_batch", str(threads), "--n_ctx", str(ctx_size),
                                          "--flash_attn", "true"], stdout=f, stderr=subprocess.STDOUT)
        self.model = "x"
        asyncio.run(self._wait_ready())

    async def _wait_ready(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"llama_cpp.server exited:\n{self.log.read_text(errors='replace')[-2000:]}")
                try:
                    async with s.get(self.base + "/v1/models") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("llama_cpp.server never answered")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.unlink(missing_ok=True)


def llama_cpp_server_available() -> str | None:
    """None when `python -m llama_cpp.server` can start here, else why not."""
    r = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["import failed"])[-1]


async def _chat_ttft(base: str, model: str, text: str) -> float:
    """Seconds from sending a streamed chat request to the first chunk with content."""
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0,
            "stream": True}
    t1 = None
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        async with s.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    obj = json.loads(line[6:])
                    if t1 is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                        t1 = time.perf_counter()
    # read to the end: a client that hangs up early leaves the server finishing (or cancelling)
    # that request while the next one arrives, which would time the overlap, not the first token
    if t1 is None:
        raise RuntimeError(f"{base}: the stream ended without content")
    return t1 - t0


def bench_ttft(servers: dict[str, Daemon | LlamaCppServer], n: int) -> dict[str, list[float]]:
    """n short chat prompts to every server in turn (one warm-up each first); TTFT in ms."""
    out: dict[str, list[float]] = {k: [] for k in servers}
    for k, srv in servers.items():
        asyncio.run(_chat_ttft(srv.base, srv.model, "Warm up."))
    for i in range(n):
        for k, srv in servers.items():
            out[k].append(1000 * asyncio.run(_chat_ttft(srv.base, srv.model, f"{CHATS[i % len(CHATS)]} ({i})")))
    return out


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, int(round(q / 100 * len(ys) + 0.5)) - 1))]


# --------------------------------------------------------------------------- main


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "out/k20q8/edge"))
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--agg-gen-tokens", type=int, default=64, help="tokens per stream in the concurrency runs")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--ttft-requests", type=int, default=20, help="short chat requests per server for TTFT")
    ap.add_argument("--quick", action="store_true", help="one short pass of everything (what the tests run)")
    ap.add_argument("--json", help="also write the medians to this file, and tokens/s vs streams as a PNG beside it")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.prompt_tokens, args.gen_tokens, args.agg_gen_tokens = 1, 32, 16, 8
        args.streams, args.ttft_requests = "1,2", 3
    streams = [int(s) for s in args.streams.split(",")]
    parallel = max(streams)
    ctx_size = max(128, args.prompt_tokens + args.gen_tokens + 16)  # a chat prompt (TTFT) fits too

    import llama_cpp

    _, gguf = open_bundle(args.bundle, verify=False)
    print(f"bundle {args.bundle} ({gguf.stat().st_size / 2**20:.0f} MiB), threads {args.threads}, "
          f"prompt {args.prompt_tokens} tok, generate {args.gen_tokens} tok, repeats {args.repeats}, "
          f"llama-cpp-python {llama_cpp.__version__}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    # TTFT first, while this process holds no model of its own
    daemon = None if args.skip_http else Daemon(args.bundle, args.threads, parallel, ctx_size)
    lcs_missing = None if args.skip_http else llama_cpp_server_available()
    ttft: dict[str, list[float]] = {}
    if daemon:
        servers: dict[str, Daemon | LlamaCppServer] = {"fogline": daemon}
        lcs = None
        try:
            if lcs_missing is None:
                lcs = servers["llama_cpp.server"] = LlamaCppServer(gguf, args.threads, ctx_size)
            else:
                print(f"llama_cpp.server unavailable ({lcs_missing}): install llama-cpp-python[server] "
                      "(the dev extra) for the TTFT baseline", flush=True)
            ttft = bench_ttft(servers, args.ttft_requests)
        except BaseException:
            daemon.stop()
            raise
        finally:
            if lcs is not None:
                lcs.stop()
    with host_params_for_llama_class():  # the same model params (AMX guard) as fogline's loads
        llm = llama_cpp.Llama(model_path=str(gguf), n_threads=args.threads, n_threads_batch=args.threads,
                              n_ctx=ctx_size, n_batch=512, flash_attn=True, verbose=False)
    base = dict(bundle=args.bundle, threads=args.threads, parallel=parallel, ctx_size=ctx_size, batch_size=512,
                queue_size=64, verify_bundle=False)
    rt = load_runtime(load_config(env={}, overrides=base))
    rt_cap = load_runtime(load_config(env={}, overrides={**base, "parallel": 1, "capture_hidden": True}))

    class EdgeDecides:  # stands in for a cloud-paired mode: decides at the edge, keeps h_K
        def decide(self, step):
            return step.sampler.choose(step.logits)

        def release(self, request):
            pass

    rt_cap.engine.register_source("collab", EdgeDecides())
    # (b''): how capture costs once the GGUF has a block after K-1 (an exit adapter): here the
    # tap sits one block lower so that llama.cpp's layer-input copy can serve it
    from edge_runtime.engine import Engine
    from edge_runtime.llama_backend import LlamaContext

    nat_ctx = LlamaContext(rt.model, n_ctx=ctx_size, n_batch=512, n_seq=1, n_threads=args.threads,
                           tap_layer=rt.manifest.split - 2, hidden_via="layer_input")
    rt_nat = Engine(rt.model, nat_ctx, parallel=1, ctx_size=ctx_size, batch_size=512, queue_size=4)
    rt_nat.register_source("collab", EdgeDecides())
    rt_nat.start()

    class _Rt:  # what bench_engine needs of a runtime
        engine = rt_nat
    try:
        # warm-up: page the weights in, build the graphs
        p = prompt_for(rt.model, args.prompt_tokens, 0)
        bench_plain(llm, p, 8)
        bench_engine(rt, p, 8)
        bench_engine(rt_cap, p, 8, capture=True)
        bench_engine(_Rt, p, 8, capture=True)
        if daemon:
            bench_http(daemon, p, 8)
        single: dict[str, list[Run]] = {"a": [], "b": [], "b'": [], "b''": [], "c": []}
        agg: dict[tuple[str, int], list[float]] = {}
        for r in range(args.repeats):
            p = prompt_for(rt.model, args.prompt_tokens, r + 1)
            single["a"].append(bench_plain(llm, p, args.gen_tokens))
            single["b"].append(bench_engine(rt, p, args.gen_tokens))
            single["b'"].append(bench_engine(rt_cap, p, args.gen_tokens, capture=True))
            single["b''"].append(bench_engine(_Rt, p, args.gen_tokens, capture=True))
            if daemon:
                single["c"].append(bench_http(daemon, p, args.gen_tokens))
            for n in streams:
                agg.setdefault(("raw", n), []).append(raw_decode_ceiling(rt.model, args.threads, n))
                ps = [prompt_for(rt.model, 32, 1000 * r + i) for i in range(n)]
                agg.setdefault(("engine", n), []).append(aggregate_engine(rt, ps, args.agg_gen_tokens))
                if daemon:
                    agg.setdefault(("http", n), []).append(aggregate_http(daemon, ps, args.agg_gen_tokens))
            print(f"  repeat {r + 1}/{args.repeats}: decode a={single['a'][-1].decode_tps:.1f} "
                  f"b={single['b'][-1].decode_tps:.1f} tok/s", flush=True)
    finally:
        if daemon:
            daemon.stop()
        rt.close()
        rt_cap.close()
        rt_nat.stop()
        nat_ctx.close()

    names = {"a": "(a) llama-cpp-python Llama", "b": "(b) fogline engine", "b'": "(b') + h_K capture, callback",
             "b''": "(b'') + h_K capture, layer-input", "c": "(c) fogline over HTTP"}
    a_dec = med([x.decode_tps for x in single["a"]])
    a_pro = med([x.prompt_tps for x in single["a"]])
    print()
    print(f"{'single stream (median of ' + str(args.repeats) + ')':<34}{'decode tok/s':>14}{'vs (a)':>8}"
          f"{'prompt tok/s':>15}{'vs (a)':>8}")
    for k, runs in single.items():
        if not runs:
            continue
        d, pr = med([x.decode_tps for x in runs]), med([x.prompt_tps for x in runs])
        print(f"{names[k]:<34}{d:>14.1f}{d / a_dec:>8.2f}{pr:>15.1f}{pr / a_pro:>8.2f}")
    print()
    print(f"{'concurrent streams':<26}" + "".join(f"{n:>10}" for n in streams))
    labels = {"raw": "raw llama_decode", "engine": "(b) engine", "http": "(c) HTTP"}
    for where in ("raw", "engine", "http"):
        if (where, streams[0]) not in agg:
            continue
        vals = [med(agg[(where, n)]) for n in streams]
        print(f"{labels[where] + ' tok/s':<26}" + "".join(f"{v:>10.1f}" for v in vals))
        print(f"{labels[where] + ' x 1 stream':<26}" + "".join(f"{v / vals[0]:>10.2f}" for v in vals))
    print("(raw: decode steps only, one row per sequence, no prefill, no sampling; engine and HTTP:\n"
          f" {args.agg_gen_tokens} tokens per stream from a 32-token prompt, prefill and everything included)")
    ttft_out: dict[str, object] = {k: {"p50_ms": med(v), "p95_ms": pct(v, 95), "n": len(v)} for k, v in ttft.items()}
    if ttft:
        print()
        print(f"TTFT, short chat prompt, streamed ({args.ttft_requests} requests each, alternating)")
        for k, v in ttft.items():
            print(f"  {k:<20} p50 {med(v):7.1f} ms   p95 {pct(v, 95):7.1f} ms")
        if "llama_cpp.server" in ttft:
            ratio = med(ttft["fogline"]) / med(ttft["llama_cpp.server"])
            ttft_out["ratio_p50"] = ratio
            print(f"target fogline/llama_cpp.server TTFT p50 <= 1.10: {ratio:.2f} -> {'met' if ratio <= 1.1 else 'MISSED'}")
        else:
            ttft_out["ratio_p50"] = None
            ttft_out["baseline_missing"] = lcs_missing
    b_dec = med([x.decode_tps for x in single["b"]])
    print()
    print(f"target (b)/(a) decode >= 0.90: {b_dec / a_dec:.2f} -> {'met' if b_dec / a_dec >= 0.90 else 'MISSED'}")
    if 4 in streams:
        for where in ("raw", "engine", "http"):
            if (where, 4) in agg:
                ratio = med(agg[(where, 4)]) / med(agg[(where, streams[0])])
                print(f"target {where} aggregate at 4 streams >= 2x one stream: {ratio:.2f} -> "
                      f"{'met' if ratio >= 2 else 'MISSED'}")
    if args.json:
        result = {"bundle": args.bundle, "threads": args.threads, "repeats": args.repeats, "streams": streams,
                  "single": {k: {"decode_tps": med([x.decode_tps for x in runs]),
                                 "prompt_tps": med([x.prompt_tps for x in runs])} for k, runs in single.items() if runs},
                  "aggregate": {w: [med(agg[(w, n)]) for n in streams] for w in labels if (w, streams[0]) in agg},
                  "ttft": ttft_out}
        Path(args.json).write_text(json.dumps(result, indent=1))
        from tools import plots

        print("figure:", plots.tokens_vs_streams(result, Path(args.json).with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
