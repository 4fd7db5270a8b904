"""Benchmark the cloud on Ray Serve against the plain server, in one invocation.

(a) Proxy overhead, one session: inter-token latency (one h_K row up, one token
    down, waited for) of a single session against the plain `fogline cloud serve`
    and against the Ray Serve app with one replica (same runtime code, same torch
    thread count), medians over all steps of all repeats, ratio Serve / plain.

(b) Scale-out: aggregate decode throughput of `--edges` websockets (each an edge,
    `--sessions-per-edge` sessions on it, all decoding at once) against the plain
    server, the Serve app with 1 replica and with 2 replicas; the proxy spreads
    the websockets over the replicas (the split is printed). Median of
    `--repeats`; ratios against 1 replica.

h_K rows are random (the deep layers do the same work on any input). The Ray
cluster is local, started here (no dashboard; internal traffic on 127.0.0.1).
Writes a JSON file (`--out`).

    python tools/bench_ray.py                       # demo model, export in out/k20q8
    python tools/bench_ray.py --edges 8 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.bench_cloud import ensure_bundle, start_server  # noqa: E402


def _rows(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


async def _edge(url: str, manifest, sessions: int, prefill: int, steps: int, tag: str,
                start: asyncio.Barrier, itl: list[float]) -> None:
    """One edge: a websocket with `sessions` sessions; prefill (untimed), then decode once all are in."""
    from edge_runtime.cloud_client import CloudLink

    d = manifest.hidden_size
    async with CloudLink(url, fingerprint=manifest.fingerprint, split=manifest.split) as link:
        sids = [f"{tag}-{i}" for i in range(sessions)]
        await asyncio.gather(*(link.infer(s, 0, _rows(prefill, d, 1)) for s in sids))
        await start.wait()  # every edge has its sessions

        async def decode(sid: str) -> None:
            step = _rows(steps, d, 2)
            for i in range(steps):
                t0 = time.perf_counter()
                await link.infer(sid, prefill + i, step[i:i + 1])
                itl.append(time.perf_counter() - t0)

        await asyncio.gather(*(decode(s) for s in sids))
        await asyncio.gather(*(link.close_session(s) for s in sids))


async def _round(url: str, manifest, edges: int, sessions: int, prefill: int, steps: int, tag: str,
                 connected=None) -> tuple[float, list[float]]:
    """(tokens/s of the decode phase, every step's latency) for `edges` edges decoding at once."""
    start, itl = asyncio.Barrier(edges + 1), []
    tasks = [asyncio.create_task(_edge(url, manifest, sessions, prefill, steps, f"{tag}-{e}", start, itl))
             for e in range(edges)]
    await start.wait()
    if connected is not None:
        connected()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    return edges * sessions * steps / wall, itl


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return json.loads(r.read())


def measure(url: str, manifest, args: argparse.Namespace, label: str, port: int) -> dict:
    """Both parts against one server: one-session ITL, then `args.edges` edges."""
    one_itl: list[float] = []
    for r in range(args.repeats):
        one_itl += asyncio.run(_round(url, manifest, 1, 1, args.prefill, args.steps, f"{label}-one{r}"))[1]
    split: list[dict] = []

    def record_split() -> None:
        per = _health(port).get("per_replica")
        if per is not None:
            split.append({rid.rsplit("#", 1)[-1]: r["connections"] for rid, r in per.items()})

    tps = []
    for r in range(args.repeats):
        tps.append(asyncio.run(_round(url, manifest, args.edges, args.sessions_per_edge, args.prefill, args.steps,
                                      f"{label}-many{r}", record_split))[0])
    res = {"one_session_itl_ms": statistics.median(one_itl) * 1e3, "tokens_per_s": statistics.median(tps),
           "tokens_per_s_runs": tps, "connections_per_replica": split}
    print(f"  {label}: one-session ITL {res['one_session_itl_ms']:.2f} ms, {args.edges} edges "
          f"{res['tokens_per_s']:.1f} tok/s {split[-1] if split else ''}", file=sys.stderr)
    return res


def bench_plain(bundle: Path, manifest, args: argparse.Namespace) -> dict:
    proc, port = start_server(bundle, args.threads, False, "cpu")
    try:
        return measure(f"ws://127.0.0.1:{port}/ws", manifest, args, "plain", port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def bench_serve(bundle: Path, manifest, args: argparse.Namespace) -> dict[int, dict]:
    import ray
    from ray import serve

    from cloud_runtime.config import CloudConfig
    from cloud_runtime.ray_serve import APP_NAME, build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")  # for Ray's workers
    ray.init(num_cpus=max(2, os.cpu_count() or 1) + 1, include_dashboard=False, object_store_memory=100 << 20,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    out = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        base = CloudConfig(bundle=bundle / "cloud", ray=True, port=args.port, threads=args.threads,
                           kv_budget_bytes=8 << 30, log_level="WARNING")
        for n in (1, 2):
            serve.run(build_app(replace(base, replicas=n)), name=APP_NAME, route_prefix="/")
            while _health(args.port).get("replicas") != n:
                time.sleep(0.2)
            out[n] = measure(f"ws://127.0.0.1:{args.port}/ws", manifest, args, f"serve x{n}", args.port)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> int:
    from fogline.manifest import load_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(REPO / "out" / "k20q8"), help="export dir; made if missing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server / replica")
    ap.add_argument("--edges", type=int, default=8, help="websockets in (b)")
    ap.add_argument("--sessions-per-edge", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48, help="decode steps per session")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=8790, help="Serve proxy port")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "bench_ray.json"))
    args = ap.parse_args()
    bundle = ensure_bundle(Path(args.bundle))
    manifest = load_manifest(bundle / "cloud", role="cloud")
    plain = bench_plain(bundle, manifest, args)
    serve_runs = bench_serve(bundle, manifest, args)
    one, two = serve_runs[1], serve_runs[2]
    sessions = args.edges * args.sessions_per_edge
    lines = [
        f"deep layers [{manifest.split}, {manifest.n_layers}) of {manifest.source}, {args.threads} torch thread(s) "
        f"per server/replica, cpu; {args.prefill}-row prefill (untimed), {args.steps} decode steps per session; "
        f"median of {args.repeats}",
        f"(a) one session, inter-token latency: plain {plain['one_session_itl_ms']:.2f} ms, Serve (1 replica) "
        f"{one['one_session_itl_ms']:.2f} ms -> Serve / plain {one['one_session_itl_ms'] / plain['one_session_itl_ms']:.2f}x",
        f"(b) {args.edges} edges x {args.sessions_per_edge} sessions = {sessions} sessions decoding, tokens/s:",
        f"  {'plain server':<22} {plain['tokens_per_s']:>8.1f}  {plain['tokens_per_s'] / one['tokens_per_s']:.2f}x",
        f"  {'Serve, 1 replica':<22} {one['tokens_per_s']:>8.1f}  1.00x",
        f"  {'Serve, 2 replicas':<22} {two['tokens_per_s']:>8.1f}  {two['tokens_per_s'] / one['tokens_per_s']:.2f}x"
        f"   websockets per replica: {two['connections_per_replica'][-1] if two['connections_per_replica'] else '?'}",
    ]
    load = os.getloadavg()
    lines.append(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)")
    print("\n" + "\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "plain": plain, "serve_1_replica": one, "serve_2_replicas": two,
                               "ratios": {"itl_serve_over_plain": one["one_session_itl_ms"]
                                          / plain["one_session_itl_ms"],
                                          "throughput_2_over_1_replica": two["tokens_per_s"] / one["tokens_per_s"],
                                          "throughput_plain_over_1_replica": plain["tokens_per_s"]
                                          / one["tokens_per_s"]},
                               "cpus": os.cpu_count(), "load_average": load}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
