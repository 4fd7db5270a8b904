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

All three run side by side and their rounds are interleaved (a shared box's load
drifts). h_K rows are random (the deep layers do the same work on any input).
The Ray cluster is local, started here (no dashboard; internal traffic on
127.0.0.1). `--haproxy` puts Serve's HAProxy ingress in front of the replicas
instead of its Python proxy. Writes a JSON file (`--out`).

    python tools/bench_ray.py                       # demo model, export in out/k20q8
    python tools/bench_ray.py --haproxy --repeats 5
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

from cloud_runtime.replica_stats import REPORT_INTERVAL_S  # noqa: E402
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
        try:
            await asyncio.gather(*(link.infer(s, 0, _rows(prefill, d, 1)) for s in sids))
        except BaseException:
            await start.abort()  # the others must not wait for this edge
            raise
        await start.wait()  # every edge has its sessions

        async def decode(sid: str) -> None:
            step = _rows(steps, d, 2)
            for i in range(steps):
                t0 = time.perf_counter()
                await link.infer(sid, prefill + i, step[i:i + 1])
                itl.append(time.perf_counter() - t0)

        await asyncio.gather(*(decode(s) for s in sids))
        await asyncio.gather(*(link.close_session(s) for s in sids))


async def _round(base: str, manifest, edges: int, sessions: int, args: argparse.Namespace,
                 tag: str) -> tuple[float, list[float], dict[str, int]]:
    """(tokens/s of the decode phase, every step's latency, websockets per replica) for `edges` edges at once."""
    start, itl = asyncio.Barrier(edges + 1), []
    url = base.replace("http://", "ws://") + "/ws"
    tasks = [asyncio.create_task(_edge(url, manifest, sessions, args.prefill, args.steps, f"{tag}-{e}", start, itl))
             for e in range(edges)]
    try:
        await start.wait()
    except asyncio.BrokenBarrierError:
        await asyncio.gather(*tasks)  # raises the failed edge's error
        raise
    await asyncio.sleep(REPORT_INTERVAL_S + 0.2)  # untimed: every replica has reported its websockets
    split = {rid.rsplit("#", 1)[-1]: r["connections"] for rid, r in _health(base).get("per_replica", {}).items()}
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    return edges * sessions * args.steps / (time.perf_counter() - t0), itl, split


def _health(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
        return json.loads(r.read())


def measure(targets: dict[str, str], manifest, args: argparse.Namespace) -> dict[str, dict]:
    """Both parts against every target, the targets interleaved round by round (the box's load drifts)."""
    one: dict[str, list[float]] = {t: [] for t in targets}
    tps: dict[str, list[float]] = {t: [] for t in targets}
    split: dict[str, dict[str, int]] = {}
    for r in range(args.repeats):
        for name, base in targets.items():
            one[name] += asyncio.run(_round(base, manifest, 1, 1, args, f"{name}-one{r}"))[1]
            t, _, split[name] = asyncio.run(_round(base, manifest, args.edges, args.sessions_per_edge, args,
                                                   f"{name}-many{r}"))
            tps[name].append(t)
            print(f"  round {r + 1}/{args.repeats} {name}: {t:.1f} tok/s {split[name] or ''}", file=sys.stderr)
    return {name: {"one_session_itl_ms": statistics.median(one[name]) * 1e3,
                   "one_session_itl_p90_ms": float(np.percentile(one[name], 90)) * 1e3,
                   "tokens_per_s": statistics.median(tps[name]), "tokens_per_s_runs": tps[name],
                   "websockets_per_replica": split[name]} for name in targets}


def run_all(bundle: Path, manifest, args: argparse.Namespace) -> dict[str, dict]:
    """The plain server and two Serve apps (1 and 2 replicas) side by side on one local Ray cluster."""
    import ray
    from ray import serve

    from cloud_runtime.config import CloudConfig
    from cloud_runtime.ray_serve import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")  # for Ray's workers
    if args.haproxy:  # read by every Ray process at start: set before the cluster exists
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    proc, port = start_server(bundle, args.threads, False, "cpu")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 << 20, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        base = CloudConfig(bundle=bundle / "cloud", ray=True, port=args.port, threads=args.threads,
                           kv_budget_bytes=8 << 30, log_level="WARNING")
        targets = {"plain": f"http://127.0.0.1:{port}"}
        for n in (1, 2):
            serve.run(build_app(replace(base, replicas=n)), name=f"fogline-x{n}", route_prefix=f"/x{n}")
            targets[f"serve_x{n}"] = f"http://127.0.0.1:{args.port}/x{n}"
            while _health(targets[f"serve_x{n}"]).get("replicas") != n:
                time.sleep(0.2)
        return measure(targets, manifest, args)
    finally:
        serve.shutdown()
        ray.shutdown()
        proc.terminate()
        proc.wait(timeout=60)


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
    ap.add_argument("--haproxy", action="store_true",
                    help="Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) instead of its Python proxy")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/bench_ray[_haproxy].json)")
    args = ap.parse_args()
    bundle = ensure_bundle(Path(args.bundle))
    manifest = load_manifest(bundle / "cloud", role="cloud")
    res = run_all(bundle, manifest, args)
    plain, one, two = res["plain"], res["serve_x1"], res["serve_x2"]
    sessions = args.edges * args.sessions_per_edge
    lines = [
        f"deep layers [{manifest.split}, {manifest.n_layers}) of {manifest.source}, {args.threads} torch thread(s) "
        f"per server/replica, cpu; {args.prefill}-row prefill (untimed), {args.steps} decode steps per session; "
        f"median of {args.repeats}",
        f"Serve ingress: {'HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1)' if args.haproxy else 'the Python proxy (default)'}",
        f"(a) one session, inter-token latency: plain {plain['one_session_itl_ms']:.2f} ms, Serve (1 replica) "
        f"{one['one_session_itl_ms']:.2f} ms -> Serve / plain {one['one_session_itl_ms'] / plain['one_session_itl_ms']:.2f}x",
        f"(b) {args.edges} edges x {args.sessions_per_edge} sessions = {sessions} sessions decoding, tokens/s:",
        f"  {'plain server':<22} {plain['tokens_per_s']:>8.1f}  {plain['tokens_per_s'] / one['tokens_per_s']:.2f}x",
        f"  {'Serve, 1 replica':<22} {one['tokens_per_s']:>8.1f}  1.00x",
        f"  {'Serve, 2 replicas':<22} {two['tokens_per_s']:>8.1f}  {two['tokens_per_s'] / one['tokens_per_s']:.2f}x"
        f"   websockets per replica: {sorted(two['websockets_per_replica'].values())}",
    ]
    load = os.getloadavg()
    lines.append(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)")
    print("\n" + "\n".join(lines))
    out = Path(args.out or REPO / "benchmarks" / f"bench_ray{'_haproxy' if args.haproxy else ''}.json")
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
