"""Capacity: how many concurrent edges one cloud process serves within a latency SLO, per mode.

    python -m tools.bench_capacity [--bundle out/k20q8] [--sessions 1,2,4,8,16,32,64] [--rtt 20] \
        [--slo 150,300] [--tokens 48] [--prompts 3] [--json benchmarks/bench_capacity.json]

One invocation, all real processes: one `fogline cloud serve` (the deep layers of the bundle),
one `python -m cloud_runtime.full_model` (the cloud-only baseline: the whole model on the same
deep-model code, token ids up, tokens down), each behind its own WAN emulator subprocess
(tools/wanem.py, RTT `--rtt`, `--mbit` per connection). The edges are simulated by
tools/loadgen.py: real edge traffic is recorded once (a real `fogline edge serve` of the bundle
per mode and prompt, greedy, each answer to its end or `--tokens`, whichever comes first — or all
`--tokens` with `--ignore-eos`; cached under out/traces/) and replayed by N concurrent
websocket clients, each reacting to the cloud's replies and sleeping the edge's recorded think
time between frames; every reply is checked against the recording ("mismatch" column).

Per mode and N: p50/p95 inter-token latency as the edge's user sees it (think time included;
each request's wait for its first token counts as one gap, so queueing whole requests shows),
the cloud process's CPU-seconds per generated token (psutil, user+system), aggregate tokens/s.
Headline per SLO: the largest N whose p95 ITL meets it (with no errors, and p95 TTFT within
`--ttft-slo`, 2 s by default) and each mode's ratio to
cloud-only; plus a bound per mode, N_max ≈ cloud threads / (CPU-s per token × tokens/s of one
session), from the same run, and a compute bound: the cloud's weight multiply-accumulates per generated
token counted from the recorded frames (`cloud_compute`), whose cloud-only/mode ratio caps that mode's
capacity win when the cloud is compute-bound. A mode stops climbing N once its p95 is past `--stop-factor` × the
largest SLO (rows beyond are not run). The llama-cpp-python server on the full demo GGUF is run
beside it as the off-the-shelf reference when its [server] extra is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_runtime.config import EdgeConfig  # noqa: E402  (torch-free)
from fogline.arch import ArchSpec  # noqa: E402
import tools.procs as child_procs  # noqa: E402
from tools.procs import free_port, repo_env, stop  # noqa: E402
from tools.loadgen import RecordingProxy, SessionResult, Trace, load_traces, prepare, save_traces  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
           "Explain photosynthesis to a child.", "List three uses of a paperclip.", "Tell me a joke about computers."]
SPLIT_MODES = ("collab", "spec", "cloud")
BASELINE = "cloud-only"
REFERENCE = "llama.cpp server"


# --- processes ------------------------------------------------------------------------------


def start_http(argv: list[str], port: int, name: str, health: str = "/health",
               timeout_s: float = 240.0, repo: Path = REPO) -> subprocess.Popen:
    """tools.procs.start_http, logging to /tmp/bench_capacity_{name}.log."""
    return child_procs.start_http(argv, port, f"/tmp/bench_capacity_{name}.log", health=health, timeout_s=timeout_s, repo=repo)


def start_wanem(upstream: int, rtt_ms: float, mbit: float) -> tuple[subprocess.Popen, int]:
    """A WAN emulator in its own process, so its forwarding does not share the load generator's loop."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.wanem", "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{upstream}", "--delay-ms", str(rtt_ms / 2),
                             "--mbit", str(mbit)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=repo_env(), cwd=REPO, text=True)
    line = proc.stdout.readline()
    if not line.startswith("wanem"):
        proc.kill()
        raise SystemExit(f"wanem did not start: {line}{proc.stdout.read()}")
    return proc, port


def cpu_s(proc: Any) -> float:
    t = proc.cpu_times()
    return t.user + t.system


# --- traces ----------------------------------------------------------------------------------


def record_traces(bundle: Path, cloud_port: int, rtt_ms: float, mbit: float, modes: list[str],
                  prompts: list[str], tokens: int, ignore_eos: bool = False, spec_stop: float = EdgeConfig.spec_stop) -> list[Trace]:
    """Real edge runs of the bundle through WAN emulator + recording proxy; one Trace per mode x prompt."""
    from openai import OpenAI

    from tests.edge_server_util import start_edge_server

    wan, wport = start_wanem(cloud_port, rtt_ms, mbit)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    proxy = asyncio.run_coroutine_threadsafe(RecordingProxy(f"ws://127.0.0.1:{wport}/ws").start(), loop).result()
    env = dict(repo_env(), FOGLINE_EDGE_CLOUD_URL=proxy.url, FOGLINE_EDGE_THREADS="1",
               FOGLINE_EDGE_CLOUD_DEADLINE_MS="60000", FOGLINE_EDGE_SPEC_STOP=str(spec_stop))
    edge = start_edge_server(bundle / "edge", Path("/tmp/bench_capacity_edge.log"), env=env)
    traces: list[Trace] = []
    try:
        for _ in range(300):
            if edge.health()[1]["cloud"].get("connected"):
                break
            time.sleep(0.1)
        client = OpenAI(base_url=edge.v1, api_key="x", max_retries=0, timeout=600)
        name = edge.health()[1]["model"]
        for mode in modes:
            for prompt in prompts:
                t0, emits, stats = time.monotonic(), [], {}
                for ch in client.chat.completions.create(
                        model=name, messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
                        temperature=0, stream=True, extra_body={"mode": mode, "ignore_eos": ignore_eos}):
                    if ch.choices and ch.choices[0].delta.content:
                        emits.append(time.monotonic())
                    stats = ch.model_extra.get("fogline") or stats
                time.sleep(0.3)  # the session's close and late replies reach the proxy
                tr = proxy.cut(mode, prompt, t0, time.monotonic(), emits,
                               int(stats.get("edge_tokens", 0)) + int(stats.get("cloud_tokens", 0)))
                if stats.get("fallback"):
                    raise SystemExit(f"recording {mode} {prompt!r}: the edge fell back ({stats['fallback']})")
                traces.append(tr)
                sends = sum(e.kind == "send" for e in tr.events)
                print(f"recorded {mode:6s} {prompt[:32]!r}: {tr.tokens} tokens, {sends} frames", flush=True)
    finally:
        edge.stop()
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result()
        stop(wan)
    return traces


def answer_lengths(traces: dict[str, list[Trace]], prompts: list[str], tokens: int) -> list[int]:
    """Per prompt, the tokens the recorded split answer has (greedy on the same split model, so every mode's
    is the same; the longest if not): the cloud-only baseline generates exactly as many, so both sides do
    the same work per request. Without traces (cloud-only alone), `tokens`."""
    out = []
    for p in prompts:
        made = [t.generated or tokens for ts in traces.values() for t in ts if t.prompt == p]
        out.append(max(made, default=tokens))
    return out


def chat_ids(bundle: Path, prompts: list[str]) -> list[list[int]]:
    """The chat-templated prompts as token ids: all the cloud-only edge does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle / "cloud")
    return [list(tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False).input_ids)
            for p in prompts]


# --- one level: N sessions of one mode ----------------------------------------------------------


async def run_level(mode: str, n: int, url: str, traces: dict[str, list[Trace]], prompt_ids: list[list[int]],
                    tokens: int, requests: int, stagger_s: float, proc: Any,
                    lengths: list[int] | None = None) -> dict[str, Any]:
    """N simulated edges of one mode at once; `lengths`: per prompt, the tokens cloud-only generates."""
    import aiohttp

    from tools.loadgen import replay_cloud_only, replay_split
    from tools.llama_ref import replay_llama_server

    results = [SessionResult() for _ in range(n)]
    jobs = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for i in range(n):
            if mode == BASELINE:
                picks = [(i + r) % len(prompt_ids) for r in range(requests)]
                job = replay_cloud_only(url, [prompt_ids[k] for k in picks],
                                        [lengths[k] if lengths else tokens for k in picks], results[i], http)
            elif mode == REFERENCE:
                job = replay_llama_server(url, [PROMPTS[(i + r) % len(prompt_ids)] for r in range(requests)],
                                          tokens, results[i], http)
            else:
                ts = traces[mode]
                runs = [prepare(ts[(i + r) % len(ts)], f"cap-{mode}-{n}-{i}-{r}-{os.getpid()}")
                        for r in range(requests)]
                job = replay_split(url, ts[0].hello, runs, results[i], http)
            jobs.append(_delayed(stagger_s * i / n, job, results[i]))
        cpu0, t0 = cpu_s(proc), time.monotonic()
        await asyncio.gather(*jobs)
        wall, cpu = time.monotonic() - t0, cpu_s(proc) - cpu0
    itls = [x for r in results for x in r.itls]
    ttfts = [x for r in results for x in r.ttfts]
    gen = sum(r.tokens for r in results)
    errors = [e for r in results for e in r.errors]
    return {"mode": mode, "sessions": n, "tokens": gen, "wall_s": wall,
            "p50_itl_ms": 1000 * float(np.percentile(itls, 50)) if itls else float("nan"),
            "p95_itl_ms": 1000 * float(np.percentile(itls, 95)) if itls else float("nan"),
            "p50_ttft_ms": 1000 * float(np.percentile(ttfts, 50)) if ttfts else float("nan"),
            "p95_ttft_ms": 1000 * float(np.percentile(ttfts, 95)) if ttfts else float("nan"),
            "tok_s": gen / wall if wall > 0 else 0.0,
            "cloud_cpu_s_per_tok": cpu / gen if gen else float("nan"),
            "reply_mismatches": sum(r.mismatches for r in results), "replies": sum(r.replies for r in results),
            "errors": len(errors), "first_error": errors[0] if errors else None}


async def _delayed(delay: float, job: Any, out: SessionResult) -> None:
    await asyncio.sleep(delay)
    try:
        await job
    except Exception as e:  # one edge's failure is a counted error, not the end of the level
        out.errors.append(f"{type(e).__name__}: {e}")


# --- the headline ----------------------------------------------------------------------------


def sessions_at_slo(rows: list[dict[str, Any]], slo_ms: float, mode: str, ttft_slo_ms: float = 0.0) -> int:
    """The largest N whose p95 ITL meets the SLO with no failed session (0: not even one); with
    `ttft_slo_ms`, its p95 time to first token must meet that too (a server that queues whole
    requests keeps a steady ITL while its users wait for their first token)."""
    ok = [r["sessions"] for r in rows if r["mode"] == mode and r["errors"] == 0 and r["p95_itl_ms"] <= slo_ms
          and (ttft_slo_ms <= 0 or r["p95_ttft_ms"] <= ttft_slo_ms)]
    return max(ok, default=0)


def bounds(rows: list[dict[str, Any]], threads: int) -> dict[str, dict[str, float]]:
    """N_max ≈ cores / (CPU-s per token at the largest N run × tokens/s of one lone session)."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        lone = next((r for r in mine if r["sessions"] == 1), None)
        top = max(mine, key=lambda r: r["sessions"])
        if lone is None or not top["tokens"]:
            continue
        rate = lone["tok_s"]
        cpu = top["cloud_cpu_s_per_tok"]
        out[mode] = {"cpu_s_per_tok": cpu, "tok_s_per_session": rate, "at_sessions": top["sessions"],
                     "n_max": threads / (cpu * rate) if cpu > 0 and rate > 0 else float("inf")}
    return out


def cloud_compute(traces: dict[str, list[Trace]], prompt_ids: dict[str, list[int]], tokens: int, spec: ArchSpec,
                  split: int) -> dict[str, dict[str, float | None]]:
    """The cloud's weight multiply-accumulates per generated token, per mode, counted from the traffic:
    every h_K row the recorded edge sent runs the L−K deep blocks, and every row the cloud must score
    (an infer's last row, every verify row, every agreement check) runs the LM head. The cloud-only
    edge's prompt and each generated token but the last run all L blocks, and each generated token one
    head row, for the same prompts (`prompt_ids`, by prompt text) and answer lengths. Per trace the
    tokens are the edge's own count (`Trace.generated`; `tokens` for traces recorded before it was kept,
    which ran ignore_eos to exactly `tokens`). When the cloud is compute-bound, cloud-only's figure over a mode's is the most that mode
    can multiply the sessions one cloud serves (attention over the context and per-call overhead are
    not counted, so the measured ratio can only come out lower)."""
    from fogline.wire.protocol import Append, Infer, Verify, decode_frame

    deep, head = (spec.n_layers - split) * spec.block_macs, spec.head_macs
    out: dict[str, dict[str, float]] = {}
    for mode, ts in traces.items():
        rows = scored = 0
        emitted = sum(t.generated or tokens for t in ts)  # not emits: a chunk can carry several tokens
        for t in ts:
            for e in t.events:
                if e.kind != "send":
                    continue
                m = decode_frame(e.data)
                if isinstance(m, Verify):
                    rows += m.h.rows
                    scored += m.h.rows
                elif isinstance(m, (Append, Infer)):
                    rows += m.h.rows
                    scored += int(isinstance(m, Infer)) + len(m.check or ())
        if emitted > 0:
            out[mode] = {"deep_rows_per_token": rows / emitted, "head_rows_per_token": scored / emitted,
                         "macs_per_token": (rows * deep + scored * head) / emitted}
    same = next(iter(traces.values()), [])  # every mode answers the same prompts at the same lengths
    if prompt_ids and same:
        made = sum(t.generated or tokens for t in same)
        base_rows = sum(len(prompt_ids[t.prompt]) + (t.generated or tokens) - 1 for t in same)
        out[BASELINE] = {"deep_rows_per_token": base_rows / made, "head_rows_per_token": 1.0,
                         "macs_per_token": (base_rows * spec.n_layers * spec.block_macs + made * head) / made}
    base = out.get(BASELINE, {}).get("macs_per_token")
    for row in out.values():
        row["ratio_to_cloud_only"] = base / row["macs_per_token"] if base else None  # no cloud-only run
    return out


def print_report(rows: list[dict[str, Any]], slos: list[float], rtt: float, threads: int,
                 headline: dict[str, dict[str, int]], bound: dict[str, dict[str, float]],
                 ttft_slo: float = 0.0, compute: dict[str, dict[str, float]] | None = None) -> None:
    ttft = f" (and p95 TTFT <= {ttft_slo:g} ms)" if ttft_slo > 0 else ""
    print(f"\nCapacity at RTT {rtt:g} ms, cloud {threads} thread(s)")
    print("| mode | N | p50 ITL ms | p95 ITL ms | p95 TTFT ms | tok/s | cloud CPU s/tok | mismatches | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['sessions']} | {r['p50_itl_ms']:.1f} | {r['p95_itl_ms']:.1f} | "
              f"{r['p95_ttft_ms']:.0f} | {r['tok_s']:.1f} | "
              f"{r['cloud_cpu_s_per_tok']:.4f} | {r['reply_mismatches']}/{r['replies']} | {r['errors']} |")
    for slo in slos:
        h = headline[str(int(slo))]
        base = h.get(BASELINE, 0)
        parts = [f"{m} {n}" + (f" ({n / base:.2f}x)" if base and m != BASELINE else "") for m, n in h.items()]
        print(f"sessions at p95 ITL <= {slo:g} ms{ttft}: " + ", ".join(parts))
    base_b = bound.get(BASELINE, {}).get("n_max")
    for mode, b in bound.items():
        ratio = f", {b['n_max'] / base_b:.2f}x cloud-only" if base_b and mode != BASELINE else ""
        print(f"bound {mode}: N_max ≈ {threads} / ({b['cpu_s_per_tok']:.4f} CPU-s/tok at N={b['at_sessions']} "
              f"x {b['tok_s_per_session']:.1f} tok/s per lone session) = {b['n_max']:.1f}{ratio}")
    for mode, c in (compute or {}).items():
        print(f"compute bound {mode}: {c['macs_per_token'] / 1e6:.1f}M weight MACs per token at the cloud "
              f"({c['deep_rows_per_token']:.2f} deep rows, {c['head_rows_per_token']:.2f} LM-head rows per token)"
              + (f", cloud-only / this = {c['ratio_to_cloud_only']:.2f}x"
                 if mode != BASELINE and c["ratio_to_cloud_only"] else ""))


def plot(rows: list[dict[str, Any]], slos: list[float], rtt: float, path: Path) -> Path:
    """p95 ITL against N per mode (with the SLOs), and beside it aggregate tokens/s against N: where each
    mode's cloud saturates."""
    from fogline.plots import COLOURS, figure, save

    fig, (itl, tps) = figure(2, f"concurrent edges per cloud process (RTT {rtt:g} ms)")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["sessions"])
        style = {"ls": "--", "marker": "s"} if mode in (BASELINE, REFERENCE) else {"marker": "o"}
        for ax, key in ((itl, "p95_itl_ms"), (tps, "tok_s")):
            ax.plot([r["sessions"] for r in mine], [r[key] for r in mine], label=mode, color=COLOURS.get(mode),
                    **style)
    for slo in slos:
        itl.axhline(slo, color="k", lw=0.8, ls=":")
        itl.annotate(f"SLO {slo:g} ms", (1, slo), fontsize=8, va="bottom")
    ns = sorted({r["sessions"] for r in rows})
    for ax in (itl, tps):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
    itl.set_yscale("log")
    itl.set(xlabel="concurrent edge sessions", ylabel="p95 inter-token latency (ms)")
    tps.set(xlabel="concurrent edge sessions", ylabel="tokens/s, all sessions")
    tps.set_ylim(bottom=0)
    itl.legend(fontsize=9)
    return save(fig, path)


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(REPO / "out" / "k20q8"), help="export dir (made, K=20 Q8_0, if missing)")
    ap.add_argument("--source", default="demo", help="the bundle's source model, for the cloud-only baseline")
    ap.add_argument("--sessions", default="1,2,4,8,16,32,64")
    ap.add_argument("--modes", default="cloud-only,collab,spec,cloud")
    ap.add_argument("--rtt", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=20.0, help="per-connection bandwidth cap of the emulated link")
    ap.add_argument("--slo", default="150,300", help="p95 ITL SLOs in ms")
    ap.add_argument("--tokens", type=int, default=48, help="most tokens per answer")
    ap.add_argument("--spec-stop", type=float, default=EdgeConfig.spec_stop,
                    help="the recorded edge's spec confidence stop (edge config spec_stop; default: the edge's "
                         "default; 0: the plain chain)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every answer runs all --tokens, past its end (default: answers end at end-of-generation)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1, help="requests each simulated edge sends, back to back")
    ap.add_argument("--stagger", type=float, default=0.5, help="seconds over which the N edges start")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each cloud process")
    ap.add_argument("--ttft-slo", type=float, default=2000.0,
                    help="a row meets the SLO only if its p95 time to first token is within this (ms; 0: off)")
    ap.add_argument("--stop-factor", type=float, default=4.0,
                    help="stop a mode's sweep once its p95 ITL exceeds this x the largest SLO")
    ap.add_argument("--traces", default=None, help="trace file (default: out/traces/, recorded if missing)")
    ap.add_argument("--record", action="store_true", help="re-record the traces even if cached")
    ap.add_argument("--no-reference", action="store_true", help="skip the llama-cpp-python server")
    ap.add_argument("--cloud-repo", default=str(REPO),
                    help="checkout whose cloud_runtime both cloud processes run (e.g. a snapshot of another branch)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cloud_repo = Path(args.cloud_repo).resolve()
    import psutil

    from fogline.manifest import load_manifest
    from tools.bench_cloud import ensure_bundle

    bundle = ensure_bundle(Path(args.bundle).resolve())
    manifest = load_manifest(bundle / "cloud", role="cloud")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - {BASELINE, *SPLIT_MODES}
    if bad:
        raise SystemExit(f"unknown mode(s) {sorted(bad)}: choose from {BASELINE}, {', '.join(SPLIT_MODES)}")
    ns = sorted({int(x) for x in args.sessions.split(",")})
    slos = [float(x) for x in args.slo.split(",")]
    prompts = PROMPTS[:args.prompts]
    trace_path = Path(args.traces or REPO / "out" / "traces" /
                      f"capacity-{manifest.fingerprint[:12]}-k{manifest.split}-t{args.tokens}-p{args.prompts}"
                      f"-rtt{args.rtt:g}{'-noeos' if args.ignore_eos else '-eos'}"
                      f"{f'-stop{args.spec_stop:g}' if args.spec_stop else ''}.msgpack")
    split_modes = [m for m in modes if m in SPLIT_MODES]
    cport, fport = free_port(), free_port()
    procs: list[subprocess.Popen | None] = []
    try:
        cloud = start_http(["-m", "fogline.cli", "cloud", "serve", "--bundle", str(bundle / "cloud"), "--port",
                            str(cport), "--threads", str(args.threads), "--log-level", "WARNING",
                            "--kv-budget-bytes", str(8 << 30)], cport, "cloud", repo=cloud_repo)
        procs.append(cloud)
        traces: dict[str, list[Trace]] = {}
        if split_modes:
            if trace_path.is_file() and not args.record:
                loaded, meta = load_traces(trace_path)
                print(f"traces: {trace_path} (recorded {meta.get('recorded')})")
            else:
                loaded = record_traces(bundle, cport, args.rtt, args.mbit, list(SPLIT_MODES), prompts, args.tokens,
                                       args.ignore_eos, args.spec_stop)
                save_traces(trace_path, loaded, {"recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                 "bundle": str(bundle), "rtt_ms": args.rtt,
                                                 "tokens": args.tokens, "ignore_eos": args.ignore_eos,
                                                 "spec_stop": args.spec_stop})
                print(f"traces: recorded to {trace_path}")
            for t in loaded:
                traces.setdefault(t.mode, []).append(t)
        full = None
        if BASELINE in modes:
            full = start_http(["-m", "cloud_runtime.full_model", "--source", args.source, "--port", str(fport),
                               "--threads", str(args.threads)], fport, "full", repo=cloud_repo)
            procs.append(full)
        prompt_ids = chat_ids(bundle, prompts)
        lengths = answer_lengths(traces, prompts, args.tokens)
        cwan, cwport = start_wanem(cport, args.rtt, args.mbit)
        procs.append(cwan)
        fwan, fwport = start_wanem(fport, args.rtt, args.mbit) if full else (None, 0)
        procs.append(fwan)
        targets: dict[str, tuple[str, Any]] = {m: (f"ws://127.0.0.1:{cwport}/ws", psutil.Process(cloud.pid))
                                               for m in split_modes}
        if full is not None:
            targets[BASELINE] = (f"ws://127.0.0.1:{fwport}/v1/generate", psutil.Process(full.pid))
        ref = None if args.no_reference else start_reference(args.rtt, args.mbit, args.threads)
        if ref is not None:
            procs += ref[2]
            targets[REFERENCE] = (ref[0], ref[1])
        rows: list[dict[str, Any]] = []
        for mode in targets:
            url, proc = targets[mode]
            for n in ns:
                row = asyncio.run(run_level(mode, n, url, traces, prompt_ids, args.tokens, args.requests,
                                            args.stagger, proc, lengths))
                rows.append(row)
                print(f"{mode:16s} N={n:3d}: p50 {row['p50_itl_ms']:7.1f} ms  p95 {row['p95_itl_ms']:7.1f} ms  "
                      f"{row['tok_s']:6.1f} tok/s  {row['cloud_cpu_s_per_tok']:.4f} CPU-s/tok  "
                      f"mismatch {row['reply_mismatches']}/{row['replies']}  errors {row['errors']}"
                      + (f" ({row['first_error']})" if row["first_error"] else ""), flush=True)
                if not (row["p95_itl_ms"] <= args.stop_factor * max(slos)
                        and (args.ttft_slo <= 0 or row["p95_ttft_ms"] <= args.stop_factor * args.ttft_slo)):
                    break
    finally:
        stop(*reversed(procs))
    headline = {str(int(s)): {m: sessions_at_slo(rows, s, m, args.ttft_slo) for m in targets} for s in slos}
    bound = bounds(rows, args.threads)
    spec = ArchSpec.from_hf_config(json.loads((bundle / "cloud" / "config.json").read_text()))
    compute = cloud_compute({m: traces[m] for m in split_modes if m in traces},
                            dict(zip(prompts, prompt_ids)) if BASELINE in modes else {}, args.tokens, spec,
                            manifest.split)
    print_report(rows, slos, args.rtt, args.threads, headline, bound, args.ttft_slo, compute)
    if args.json:
        out = {"sessions_at_slo": headline, "rows": rows, "bounds": bound, "compute_bound": compute,
               "config": {"rtt_ms": args.rtt, "mbit": args.mbit, "tokens": args.tokens, "prompts": args.prompts,
                          "requests": args.requests, "threads": args.threads, "ttft_slo_ms": args.ttft_slo,
                          "ignore_eos": args.ignore_eos, "spec_stop": args.spec_stop,
                          "split": manifest.split,
                          "sessions": ns, "traces": str(trace_path), "cloud_repo": str(cloud_repo)}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print("json:", args.json)
        print("figure:", plot(rows, slos, args.rtt, Path(args.json).with_suffix(".png")))
    return 0


def start_reference(rtt: float, mbit: float, threads: int) -> tuple[str, Any, list[subprocess.Popen]] | None:
    """`python -m llama_cpp.server` on the full demo GGUF behind its own WAN emulator, if installed."""
    import psutil

    from fogline.demo_model import demo_gguf_path

    missing = [m for m in ("sse_starlette", "pydantic_settings", "starlette_context", "fastapi", "uvicorn")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{REFERENCE}: not run — llama_cpp.server needs {', '.join(missing)} "
              "(pip install 'llama-cpp-python[server]==0.3.36')", flush=True)
        return None
    port = free_port()
    proc = start_http(["-m", "llama_cpp.server", "--model", str(demo_gguf_path()), "--port", str(port),
                       "--n_threads", str(threads), "--n_ctx", "2048"], port, "llama_server", health="/v1/models")
    wan, wport = start_wanem(port, rtt, mbit)
    return f"http://127.0.0.1:{wport}", psutil.Process(proc.pid), [proc, wan]


if __name__ == "__main__":
    raise SystemExit(main())
