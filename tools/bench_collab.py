"""Collaborative-inference benchmark: what each mode costs over an emulated WAN.

    python -m tools.bench_collab --bundle DIR [--rtt 20,50,100] [--mbit 20] [--tokens 32] [--prompts 4]

One invocation: a real `fogline cloud serve` subprocess, a WanEmulator (tools/wanem.py) in
front of it, and a real `fogline edge serve` whose cloud link goes through the emulator; for
each RTT and mode the same prompts are sent (greedy, ignore_eos) with the openai client,
streaming. Columns (medians over prompts / over token gaps): wall time per request, TTFT,
inter-token latency, % edge tokens,
cloud deep-layer token-passes per generated token (cloud `fogline_cloud_positions_total`),
cloud process CPU-seconds per generated token (psutil on the cloud pid), bytes on the wire
per generated token (counted by the emulator, both directions), cloud round trips per
generated token (as the edge reports them), agreement with the full model (`cloud-only`'s
text: fraction of it reproduced before the first difference; `agreement_vs_cloud_mode` in the
JSON compares with `cloud` mode instead, which equals the full model only for an F32 edge). Printed as one table per RTT, plus JSON (--json PATH).

Two baselines run outside the edge daemon, through their own WanEmulator with the same shape:

* `cloud-only` — the whole model at the cloud (cloud_runtime/full_model.py, a subprocess built
  from the demo source weights): the bench tokenises the chat prompt (the cloud bundle's
  tokenizer + chat template), sends the ids over a websocket and receives the tokens streamed
  down. Deep passes/tok counts token-passes through ALL L layers (L/(L-K) deep-layer passes
  each would be the like-for-like cost; the column says what the cloud process ran).
* `naive split` — every token escalated, fp32 h_K, whole context re-sent: the bench runs the
  edge layers [0, K) itself (llama.cpp, the edge bundle, 1 thread), and for every token opens
  a fresh cloud session and sends h_K of the whole context so far (codec fp32) in one `infer`;
  the session is closed without waiting for the ack. One round trip per token.

Both decode greedily to `--tokens` tokens, ignoring EOS, like the daemon modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
           "Explain photosynthesis to a child.", "List three uses of a paperclip.", "Tell me a joke about computers."]
MODES = ("edge", "collab", "spec", "cloud")
BASELINES = ("cloud-only", "naive split")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="export dir with edge/ and cloud/")
    ap.add_argument("--rtt", default="20,50,100")
    ap.add_argument("--mbit", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tau", type=float, default=None, help="collab τ (default: the bundle's calibrated one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--timeline", default=None,
                    help="write the per-event timeline of the first spec request per RTT (JSON) here")
    ap.add_argument("--source", default="demo", help="the bundle's source model, for the cloud-only baseline")
    ap.add_argument("--spec-stop", type=float, default=None,
                    help="the edge's spec confidence stop (edge config spec_stop; default: the edge's default)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import psutil
    from openai import OpenAI

    from tests.edge_server_util import start_edge_server
    from tools import plots
    from tools.procs import free_port, start_http
    from tools.wanem import LinkShape, WanEmulator

    bundle = Path(args.bundle)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cport, fport = free_port(), free_port()
    cloud = start_http(["-m", "fogline.cli", "cloud", "serve", "--bundle", str(bundle / "cloud"),
                        "--port", str(cport), "--threads", "1"], cport, "/tmp/bench_collab_cloud.log", env=env,
                       timeout_s=180.0)
    cproc = psutil.Process(cloud.pid)
    full = start_http(["-m", "cloud_runtime.full_model", "--source", args.source,
                       "--port", str(fport), "--threads", "1"], fport, "/tmp/bench_collab_full.log", env=env,
                      timeout_s=180.0)
    fproc = psutil.Process(full.pid)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle / "cloud")
    prompt_ids = [list(tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True), add_special_tokens=False).input_ids)
                  for p in PROMPTS[:args.prompts]]
    naive = _NaiveSplit(bundle)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    results: dict[str, dict[str, dict[str, float]]] = {}
    timelines: dict[str, dict[str, object]] = {}
    try:
        for rtt in [float(x) for x in args.rtt.split(",")]:
            wan = asyncio.run_coroutine_threadsafe(
                WanEmulator(("127.0.0.1", cport), LinkShape(delay_ms=rtt / 2, mbit=args.mbit)).start(), loop).result()
            eenv = dict(env, FOGLINE_EDGE_CLOUD_URL=f"ws://127.0.0.1:{wan.port}/ws", FOGLINE_EDGE_THREADS="1",
                        FOGLINE_EDGE_CLOUD_DEADLINE_MS="60000")
            if args.spec_stop is not None:
                eenv["FOGLINE_EDGE_SPEC_STOP"] = str(args.spec_stop)
            edge = start_edge_server(bundle / "edge", Path("/tmp/bench_collab_edge.log"), env=eenv)
            try:
                for _ in range(300):
                    if edge.health()[1]["cloud"].get("connected"):
                        break
                    time.sleep(0.1)
                client = OpenAI(base_url=edge.v1, api_key="x", max_retries=0, timeout=600)
                name = edge.health()[1]["model"]
                texts: dict[str, list[str]] = {}
                results[str(int(rtt))] = per = {}
                for mode in MODES:
                    walls, ttfts, itls, edge_t, gen, rts = [], [], [], 0, 0, 0
                    specs, decode_s, decode_n = [], 0.0, 0
                    b0 = wan.stats.bytes_up + wan.stats.bytes_down
                    p0 = _metric(cport, "fogline_cloud_positions_total")
                    cpu0 = sum(cproc.cpu_times()[:2])
                    texts[mode] = []
                    for prompt in PROMPTS[:args.prompts]:
                        extra = {"mode": mode, "ignore_eos": True}
                        if args.tau is not None:
                            extra["fogline_tau"] = args.tau
                        if mode == "spec" and prompt == PROMPTS[0]:
                            extra["fogline_timeline"] = True
                        t0 = time.monotonic()
                        stamps, text, stats = [], "", {}
                        for ch in client.chat.completions.create(
                                model=name, messages=[{"role": "user", "content": prompt}], max_tokens=args.tokens,
                                temperature=0, stream=True, extra_body=extra):
                            if ch.choices and ch.choices[0].delta.content:
                                stamps.append(time.monotonic())
                                text += ch.choices[0].delta.content
                            f = ch.model_extra.get("fogline") or ((ch.choices[0].model_extra or {}).get("fogline")
                                                                   if ch.choices else None)
                            stats = f or stats
                        walls.append(time.monotonic() - t0)
                        if stamps:
                            ttfts.append(stamps[0] - t0)
                            itls += [b - a for a, b in zip(stamps, stamps[1:])]
                        edge_t += stats.get("edge_tokens", 0)
                        n = stats.get("edge_tokens", 0) + stats.get("cloud_tokens", 0)
                        gen += n
                        rts += stats.get("cloud_round_trips", 0)
                        texts[mode].append(text)
                        if "spec" in stats:
                            specs.append(stats["spec"])
                        if len(stamps) > 1 and n > 1:  # decode time per token, first token excluded
                            decode_s += stamps[-1] - stamps[0]
                            decode_n += n - 1
                        if "timeline" in stats:
                            timelines[str(int(rtt))] = {"events": stats["timeline"],
                                                        "summary": _timeline_summary(stats["timeline"], rtt / 1000)}
                    gen = max(gen, 1)
                    per[mode] = {
                        "wall_s": _median(walls), "ttft_s": _median(ttfts),
                        "itl_ms": 1000 * _median(itls), "edge_pct": 100.0 * edge_t / gen,
                        "cloud_passes_per_tok": (_metric(cport, "fogline_cloud_positions_total") - p0) / gen,
                        "cloud_cpu_s_per_tok": (sum(cproc.cpu_times()[:2]) - cpu0) / gen,
                        "wire_bytes_per_tok": (wan.stats.bytes_up + wan.stats.bytes_down - b0) / gen,
                        "round_trips_per_tok": rts / gen}
                    if mode == "spec":
                        per[mode].update(_spec_bound(specs, rtt / 1000, decode_s / max(decode_n, 1)))
                # the two baselines, each through its own emulated link of the same shape
                fwan = asyncio.run_coroutine_threadsafe(
                    WanEmulator(("127.0.0.1", fport), LinkShape(delay_ms=rtt / 2, mbit=args.mbit)).start(),
                    loop).result()
                try:
                    per["cloud-only"], texts["cloud-only"] = _run_baseline(
                        lambda ids: _cloud_only(f"ws://127.0.0.1:{fwan.port}/v1/generate", ids, args.tokens),
                        loop, prompt_ids, tok, fwan, fproc, lambda: _metric(fport, "fogline_full_positions_total"))
                finally:
                    asyncio.run_coroutine_threadsafe(fwan.close(), loop).result()
                per["naive split"], texts["naive split"] = _run_baseline(
                    lambda ids: naive.run(f"ws://127.0.0.1:{wan.port}/ws", ids, args.tokens),
                    loop, prompt_ids, tok, wan, cproc, lambda: _metric(cport, "fogline_cloud_positions_total"))
                # agreement with the full model = cloud-only (the whole fp32 model at the cloud); with a
                # quantized edge, `cloud` mode differs from it by the edge layers' quantization
                for mode in (*MODES, *BASELINES):
                    same = sum(_prefix_agree(a, b) for a, b in zip(texts[mode], texts["cloud-only"]))
                    per[mode]["agreement"] = same / max(len(texts["cloud-only"]), 1)
                    per[mode]["agreement_vs_cloud_mode"] = (
                        sum(_prefix_agree(a, b) for a, b in zip(texts[mode], texts["cloud"])) / max(len(texts["cloud"]), 1))
            finally:
                edge.stop()
                asyncio.run_coroutine_threadsafe(wan.close(), loop).result()
            _print_table(rtt, args.mbit, per)
            _print_bound(per["spec"], timelines.get(str(int(rtt)), {}).get("summary"))
    finally:
        naive.close(loop)
        for p in (cloud, full):
            p.terminate()
            p.wait()
    if args.timeline:
        Path(args.timeline).write_text(json.dumps(timelines, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print("figure:", plots.latency_vs_rtt(results, Path(args.json).with_suffix(".png"), args.mbit))
    print(json.dumps(results))
    return 0


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _run_baseline(run, loop, prompt_ids, tok, wan, proc, positions):
    """Send each prompt through `run(ids) -> (token ids, stamps, t0, round trips)` on the loop."""
    walls, ttfts, itls, texts, gen, rts = [], [], [], [], 0, 0
    b0 = wan.stats.bytes_up + wan.stats.bytes_down
    p0, cpu0 = positions(), sum(proc.cpu_times()[:2])
    for ids in prompt_ids:
        toks, stamps, t0, rt = asyncio.run_coroutine_threadsafe(run(ids), loop).result()
        walls.append(stamps[-1] - t0)
        ttfts.append(stamps[0] - t0)
        itls += [b - a for a, b in zip(stamps, stamps[1:])]
        gen += len(toks)
        rts += rt
        texts.append(tok.decode(toks, skip_special_tokens=True))
    gen = max(gen, 1)
    return {"wall_s": _median(walls), "ttft_s": _median(ttfts), "itl_ms": 1000 * _median(itls), "edge_pct": 0.0,
            "cloud_passes_per_tok": (positions() - p0) / gen,
            "cloud_cpu_s_per_tok": (sum(proc.cpu_times()[:2]) - cpu0) / gen,
            "wire_bytes_per_tok": (wan.stats.bytes_up + wan.stats.bytes_down - b0) / gen,
            "round_trips_per_tok": rts / gen}, texts


async def _cloud_only(url: str, ids: list[int], n: int):
    """Text (token ids) up, tokens streamed down; the websocket is opened per request (counted)."""
    import aiohttp

    t0 = time.monotonic()
    toks, stamps = [], []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, compress=0) as ws:
        await ws.send_str(json.dumps({"prompt": ids, "max_tokens": n}))
        while True:
            msg = json.loads((await ws.receive()).data)
            if "error" in msg:
                raise RuntimeError(msg["error"])
            if "done" in msg:
                break
            toks.append(msg["token"])
            stamps.append(time.monotonic())
    return toks, stamps, t0, 1


class _NaiveSplit:
    """Every token escalated, fp32 h_K of the whole context re-sent each step, fresh session."""

    def __init__(self, bundle: Path) -> None:
        from edge_runtime.llama_backend import LlamaContext, LlamaModel
        from fogline.manifest import load_manifest

        self.m = load_manifest(bundle / "edge", role="edge")
        self.model = LlamaModel(bundle / "edge" / "edge.gguf")
        self.ctx = LlamaContext(self.model, n_ctx=1024, n_batch=256, n_seq=1, n_threads=1,
                                tap_layer=self.m.split - 1)
        self.link = None

    async def run(self, url: str, ids: list[int], n: int):
        import numpy as np

        from edge_runtime.cloud_client import CloudLink
        from edge_runtime.cloud_generation import LlamaEdgeStep
        from fogline.wire.protocol import Close

        if self.link is None or self.link.url != url:
            if self.link is not None:
                await self.link.close()
            self.link = CloudLink(url, fingerprint=self.m.fingerprint, split=self.m.split, codec="fp32")
            await self.link.connect()
        step = LlamaEdgeStep(self.ctx)
        t0 = time.monotonic()
        h = await step(ids, 0)
        toks, stamps = [], []
        for i in range(n):
            sid = f"naive-{os.getpid()}-{time.monotonic_ns()}"
            res = await self.link.infer(sid, 0, np.ascontiguousarray(h, dtype=np.float32))
            await self.link._request(lambda r, sid=sid: Close(id=r, session=sid), want_reply=False)
            toks.append(res.token)
            stamps.append(time.monotonic())
            if i < n - 1:
                h = np.concatenate([h, await step([res.token], len(ids) + i)])
        return toks, stamps, t0, n

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.link is not None:
            asyncio.run_coroutine_threadsafe(self.link.close(), loop).result()
        self.ctx.close()
        self.model.close()


def _spec_bound(specs: list[dict], rtt_s: float, per_tok_s: float) -> dict[str, float]:
    """The spec pipeline bound from the run's own measurements (the edge's `spec` stats):
    max(γ·t_draft, RTT + t_verify) / tokens per cycle, where γ = drafts per verify, t_draft = edge
    seconds per drafted step, RTT + t_verify = the verify's measured round trip (send -> verdict;
    t_verify = that minus the emulated RTT), tokens per cycle = accepted + 1 per verify."""
    v = sum(s["verifies"] for s in specs)
    if not v:
        return {"bound_ratio": float("nan")}
    gamma = sum(s["drafted"] for s in specs) / v
    t_draft = sum(s["draft_s"] for s in specs) / max(sum(s["draft_steps"] for s in specs), 1)
    verify_rt = sum(s["verify_s"] for s in specs) / v
    per_cycle = (sum(s["accepted"] for s in specs) + v) / v
    bound = max(gamma * t_draft, verify_rt) / per_cycle
    return {"spec_ms_per_tok": 1000 * per_tok_s, "bound_ms_per_tok": 1000 * bound,
            "bound_ratio": per_tok_s / bound, "gamma": gamma, "t_draft_ms": 1000 * t_draft,
            "t_verify_ms": 1000 * (verify_rt - rtt_s), "tokens_per_cycle": per_cycle}


def _timeline_summary(events: list, rtt_s: float) -> dict[str, float]:
    """Where one spec request's time goes, from its event timeline ([event, t, detail]): verify round
    trip beyond the RTT (cloud batch window + deep layers + serialisation), verdict -> applied on the
    edge (engine wake-up), and time the edge sat idle waiting on a verdict (no draft in flight)."""
    sent, rt, wake, idle = None, [], [], 0.0
    last_draft, verdict_t = 0.0, None
    for ev, t, _ in events:
        if ev == "draft":
            last_draft = t
        elif ev == "verify_sent":
            sent = t
        elif ev == "verdict" and sent is not None:
            rt.append(t - sent)
            verdict_t = t
            idle += max(0.0, t - max(last_draft, sent))
        elif ev in ("kept", "rolled_back", "settled") and verdict_t is not None:
            wake.append(t - verdict_t)
            verdict_t = None
    total = events[-1][1] - events[0][1] if events else 0.0
    return {"verifies": len(rt), "verify_rt_ms": 1000 * _median(rt),
            "verify_over_rtt_ms": 1000 * (_median(rt) - rtt_s), "verdict_to_applied_ms": 1000 * _median(wake),
            "idle_waiting_verdict_s": idle, "span_s": total,
            "rolled_back": sum(1 for e in events if e[0] == "rolled_back"),
            "kept": sum(1 for e in events if e[0] == "kept"),
            "settled": sum(1 for e in events if e[0] == "settled")}


def _print_bound(spec: dict[str, float], summary: dict[str, float] | None) -> None:
    if "bound_ms_per_tok" in spec:
        print(f"spec: {spec['spec_ms_per_tok']:.1f} ms/token decode vs pipeline bound {spec['bound_ms_per_tok']:.1f} ms "
              f"(γ {spec['gamma']:.2f}, t_draft {spec['t_draft_ms']:.1f} ms, t_verify {spec['t_verify_ms']:.1f} ms, "
              f"tokens/cycle {spec['tokens_per_cycle']:.2f}): bound_ratio {spec['bound_ratio']:.2f}")
    if summary:
        print("spec timeline (one request):", json.dumps({k: round(v, 4) for k, v in summary.items()}))


def _prefix_agree(a: str, b: str) -> float:
    """Fraction of the reference text (characters) reproduced before the first difference."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(b), 1)


def _print_table(rtt: float, mbit: float, per: dict[str, dict[str, float]]) -> None:
    cols = [("wall_s", "wall s/req", "{:.2f}"), ("ttft_s", "TTFT s", "{:.3f}"), ("itl_ms", "ITL ms", "{:.1f}"),
            ("edge_pct", "% edge", "{:.0f}"), ("cloud_passes_per_tok", "deep passes/tok", "{:.2f}"),
            ("cloud_cpu_s_per_tok", "cloud CPU s/tok", "{:.4f}"), ("wire_bytes_per_tok", "wire B/tok", "{:.0f}"),
            ("round_trips_per_tok", "RT/tok", "{:.2f}"), ("agreement", "agree full", "{:.2f}"),
            ("agreement_vs_cloud_mode", "agree cloud", "{:.2f}")]
    print(f"\nRTT {rtt:g} ms, {mbit:g} Mbit/s")
    print("| mode | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, r in per.items():
        print(f"| {mode} | " + " | ".join(f.format(r[k]) for k, _, f in cols) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
