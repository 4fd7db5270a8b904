"""The main job on the bundled demo model: export, start cloud and edge, answer chat requests.

Run by `make demo`:
  1. `fogline export --source demo` (skipped when a verified bundle with the same K/quant exists),
  2. `fogline cloud serve` on a free port,
  3. `fogline edge serve` on a free port, linked to that cloud,
  4. one chat request per mode through the official `openai` client, printing
     the answer and where its tokens came from (`fogline` object),
  5. both daemons stopped. Any failure exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOGLINE = [sys.executable, "-m", "fogline.cli"]
QUESTION = "In two sentences: why does the Moon have phases?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the daemon exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not healthy after {timeout:.0f} s")


def bundle_ok(out: Path, split: str, quant: str) -> bool:
    try:
        from fogline.manifest import load_manifest, verify_files

        m = load_manifest(out / "edge", role="edge")
        c = load_manifest(out / "cloud", role="cloud")
        return (str(m.split) == split and m.quant == quant.upper() and not verify_files(out / "edge", m)
                and not verify_files(out / "cloud", c))
    except Exception:
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--split", default="20")
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--calib-budget", default="30k,5m",
                    help="exit-adapter training budget for the export (tokens, time cap); cached afterwards")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    if bundle_ok(out, args.split, args.quant):
        print(f"== 1. export: {out} already holds a verified K={args.split} {args.quant} bundle", flush=True)
    else:
        print(f"== 1. export the demo model (SmolLM2-135M-Instruct) at K={args.split}, {args.quant}", flush=True)
        subprocess.run([*FOGLINE, "export", "--source", "demo", "--split", args.split, "--quant", args.quant,
                        "--calib-budget", args.calib_budget, "--out", str(out), "--force"], check=True, cwd=REPO)
    subprocess.run([*FOGLINE, "inspect", str(out)], check=True, cwd=REPO)

    cloud_port, edge_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"== 2. cloud: fogline cloud serve on 127.0.0.1:{cloud_port}", flush=True)
    cloud = subprocess.Popen([*FOGLINE, "cloud", "serve", "--bundle", str(out / "cloud"),
                              "--port", str(cloud_port)], cwd=REPO, env=env)
    edge = None
    try:
        wait_healthy(f"http://127.0.0.1:{cloud_port}/health", cloud)
        print(f"== 3. edge: fogline edge serve on 127.0.0.1:{edge_port}, linked to the cloud", flush=True)
        edge = subprocess.Popen([*FOGLINE, "edge", "serve", "--bundle", str(out / "edge"), "--port", str(edge_port)],
                                cwd=REPO, env=dict(env, FOGLINE_EDGE_CLOUD_URL=f"ws://127.0.0.1:{cloud_port}/ws"))
        health = wait_healthy(f"http://127.0.0.1:{edge_port}/health", edge)
        print(f"   edge health: model={health.get('model')} cloud={health.get('cloud')}", flush=True)

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{edge_port}/v1", api_key="none")
        print(f"== 4. chat through the OpenAI endpoint: {QUESTION!r}", flush=True)
        for mode in ("edge", "collab", "spec", "cloud"):
            t0 = time.monotonic()
            resp = client.chat.completions.create(
                model=health["model"], messages=[{"role": "user", "content": QUESTION}],
                max_tokens=args.max_tokens, temperature=0, extra_body={"mode": mode})
            dt = time.monotonic() - t0
            info = resp.model_extra.get("fogline", {})
            print(f"-- mode={mode:<6} {dt:5.2f} s  edge_tokens={info.get('edge_tokens')} "
                  f"cloud_tokens={info.get('cloud_tokens')} round_trips={info.get('cloud_round_trips')} "
                  f"fallback={info.get('fallback')}")
            print("   " + resp.choices[0].message.content.strip().replace("\n", "\n   "), flush=True)
    finally:
        print("== 5. stopping edge and cloud", flush=True)
        if edge is not None:
            stop(edge)
        stop(cloud)
    return 0


if __name__ == "__main__":
    sys.exit(main())
