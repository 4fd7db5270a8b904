"""The cloud on Ray Serve: a real local Ray cluster (head started here), `fogline cloud serve --ray
--replicas 2` joining it, and a real edge daemon streaming cloud- and spec-mode requests through
Serve's proxy. One replica's actor is killed mid-stream: the edge reconnects to the other replica,
is told `unknown_session`, replays its h_K history, and both outputs equal the uninterrupted runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from cloud_runtime.replica_stats import REPORT_INTERVAL_S
from tests.edge_server_util import REPO, edge_env, free_port, start_edge_server, wait_cloud_connected

N = 96  # tokens per request: long enough that the kill lands while both sessions are held
KILL_AFTER = 6  # streamed chunks of each request before the replica dies


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _health(port: int) -> dict:
    return json.loads(_get(port, "/health")[1])


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster owned by this test process (small: no dashboard, 100 MB object store)."""
    import ray

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    # the workers Ray starts must import this tree's cloud_runtime
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ours_before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    ctx = ray.init(num_cpus=3, include_dashboard=False, object_store_memory=100 << 20,
                   _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"\nray head up in {time.monotonic() - t0:.1f} s")
    yield ctx.address_info["gcs_address"]
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in ours_before]
    assert started, "the Ray head runs no processes"
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    left = psutil.wait_procs(started, timeout=30)[1]
    assert not left, f"processes left behind by Ray: {[(p.pid, p.name()) for p in left]}"


@pytest.fixture(scope="module")
def ray_cloud(ray_head, demo_bundle, tmp_path_factory):
    """`fogline cloud serve --ray` with 2 CPU replicas on the test's cluster; yields the proxy port."""
    port = free_port()
    log = tmp_path_factory.mktemp("raycloud") / "cloud.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "fogline.cli", "cloud", "serve", "--bundle",
                                 str(demo_bundle / "cloud"), "--ray", "--ray-address", ray_head, "--replicas", "2",
                                 "--port", str(port), "--threads", "1", "--batch-window-ms", "5",
                                 "--log-level", "WARNING"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        end = time.monotonic() + 240
        while "fogline cloud: serving" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < end, log.read_text()[-4000:]
            time.sleep(0.2)
        while _health(port).get("replicas") != 2:  # both replicas have reported to the directory
            assert time.monotonic() < end, _health(port)
            time.sleep(0.2)
        print(f"serve app with 2 replicas up in {time.monotonic() - t0:.1f} s")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def edge(demo_bundle, ray_cloud, tmp_path_factory):
    srv = start_edge_server(demo_bundle / "edge", tmp_path_factory.mktemp("edgelog") / "edge.log",
                            env=edge_env(f"ws://127.0.0.1:{ray_cloud}/ws", FOGLINE_EDGE_CLOUD_DEADLINE_MS="90000"))
    wait_cloud_connected(srv)
    yield srv
    srv.stop()


def _stream(edge, ids: list[int], mode: str, chunks: threading.Semaphore, out: dict) -> None:
    """One streamed greedy completion; releases `chunks` once after KILL_AFTER chunks."""
    from openai import OpenAI

    client = OpenAI(base_url=edge.v1, api_key="unused", max_retries=0, timeout=600)
    text, stats, n = "", {}, 0
    for ch in client.completions.create(model="fogline-edge-k20", prompt=ids, max_tokens=N, temperature=0,
                                        stream=True, extra_body={"mode": mode, "ignore_eos": True}):
        text += ch.choices[0].text if ch.choices else ""
        n += 1
        if n == KILL_AFTER:
            chunks.release()
        stats = ch.model_extra.get("fogline") or stats
    out[mode] = (text, stats)


def _run_both(edge, prompts: list[list[int]], during=None) -> dict:
    """cloud mode on prompts[0] and spec mode on prompts[1] at once; `during()` runs once both streamed."""
    out: dict = {}
    chunks = threading.Semaphore(0)
    threads = [threading.Thread(target=_stream, args=(edge, prompts[i], mode, chunks, out))
               for i, mode in enumerate(("cloud", "spec"))]
    for t in threads:
        t.start()
    for _ in threads:
        assert chunks.acquire(timeout=300)
    if during is not None:
        during()
    for t in threads:
        t.join(600)
    assert set(out) == {"cloud", "spec"}, out
    return out


def _unknown_session_errors(port: int) -> dict[str, float]:
    text = _get(port, "/metrics")[1]
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^fogline_cloud_errors_total\{code="unknown_session",replica="([^"]+)"\} (\S+)$', text, re.M)}


@pytest.mark.slow
def test_replica_killed_mid_stream_edge_replays_on_the_other_replica(edge, ray_cloud, chat_prompts):
    import ray

    port = ray_cloud
    health = _health(port)
    assert health["status"] == "ok" and health["replicas"] == 2 and len(health["per_replica"]) == 2
    status, text = _get(port, "/metrics")
    assert status == 200 and "fogline_cloud_replicas 2.0" in text
    for rid in health["per_replica"]:
        assert f'fogline_cloud_sessions{{replica="{rid}"}}' in text

    t0 = time.monotonic()
    calm = _run_both(edge, chat_prompts)
    print(f"\nuninterrupted run: {time.monotonic() - t0:.1f} s")
    for mode, (_, stats) in calm.items():
        assert stats["mode"] == mode and stats["fallback"] is None, stats

    killed: list[str] = []

    def kill_the_edges_replica() -> None:
        # replicas report every REPORT_INTERVAL_S: wait for a report that saw both sessions
        deadline = time.monotonic() + 4 * REPORT_INTERVAL_S
        while True:
            h = _health(port)
            held = [rid for rid, r in h["per_replica"].items() if r["connections"] > 0]
            assert len(held) == 1, h  # the edge's one websocket is pinned to one replica
            if h["per_replica"][held[0]]["sessions"] >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert h["per_replica"][held[0]]["sessions"] >= 2 and h["kv_bytes"] > 0, h
        ray.kill(ray.get_actor(held[0], namespace="serve"), no_restart=True)
        killed.append(held[0])

    t0 = time.monotonic()
    hurt = _run_both(edge, chat_prompts, during=kill_the_edges_replica)
    print(f"run with a replica killed mid-stream: {time.monotonic() - t0:.1f} s")
    for mode in ("cloud", "spec"):
        text, stats = hurt[mode]
        assert stats["mode"] == mode and stats["fallback"] is None, stats
        assert text == calm[mode][0], (mode, text, calm[mode][0])
    # both sessions were rebuilt on the surviving replica from the edge's history
    replayed = {rid: n for rid, n in _unknown_session_errors(port).items() if rid not in killed}
    assert sum(replayed.values()) >= 2, (killed, replayed)


def test_kuberay_manifest_is_a_valid_serve_config():
    """deploy/rayservice.yaml (not run here: no Kubernetes) carries a Serve config that Serve's own
    schema accepts, for the pinned Ray, whose app builder makes a valid app from its args."""
    import importlib
    from importlib.metadata import version

    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert doc["spec"]["rayClusterConfig"]["rayVersion"] == version("ray")
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"])).applications
    module, name = app.import_path.split(":")
    assert isinstance(getattr(importlib.import_module(module), name)(app.args), serve.Application)


def test_ray_settings_are_checked(tmp_path):
    from cloud_runtime.config import CloudConfig, parse_autoscale
    from fogline.cli import main
    from fogline.errors import ConfigError

    b = tmp_path / "cloud"
    assert parse_autoscale("2,8") == (2, 8) and parse_autoscale("") is None
    for kw, msg in ((dict(replicas=2), "only apply with ray"),
                    (dict(ray=True, port=0), "port must be fixed"),
                    (dict(ray=True, max_frame_bytes=32 << 20), "16 MiB"),
                    (dict(ray=True, replicas=2, autoscale="1,4"), "not both"),
                    (dict(ray=True, autoscale="0,4"), "never scale to zero"),
                    (dict(ray=True, autoscale="4"), "MIN,MAX"),
                    (dict(ray=True, num_gpus=1), "must be 'cuda'"),
                    (dict(ray=True, device="cuda:1", num_gpus=1), "must be 'cuda'"),
                    (dict(ray=True, device="cuda"), "needs num_gpus")):
        with pytest.raises(ConfigError, match=msg):
            CloudConfig(bundle=b, **kw)
    CloudConfig(bundle=b, ray=True, device="cuda", num_gpus=0.5, autoscale="1,3")
    assert main(["cloud", "serve", "--bundle", str(b), "--replicas", "2"]) == 2  # no --ray: refused, exit 2


def test_replica_health_and_metrics_aggregate():
    from cloud_runtime.metrics import CloudMetrics
    from cloud_runtime.replica_stats import aggregate_health, merge_metrics

    a = {"status": "ok", "split": 20, "sessions": 3, "kv_bytes": 100, "kv_budget_bytes": 1000, "connections": 2,
         "queued_steps": 1}
    b = dict(a, status="draining", sessions=1, kv_bytes=50, connections=0, queued_steps=0)
    code, body = aggregate_health({"r1": a, "r2": b})
    assert code == 200 and body["status"] == "ok" and (body["replicas"], body["replicas_ok"]) == (2, 1)
    assert (body["sessions"], body["kv_bytes"], body["kv_budget_bytes"], body["connections"]) == (4, 150, 2000, 2)
    assert aggregate_health({"r2": b})[0] == 503 and aggregate_health({})[1]["status"] == "unavailable"
    m1, m2 = CloudMetrics(), CloudMetrics()
    m1.errors.labels("unknown_session").inc(2)
    m2.sessions.set(5)
    text = merge_metrics({"r1": m1.render().decode(), "r2": m2.render().decode()}).decode()
    assert 'fogline_cloud_errors_total{code="unknown_session",replica="r1"} 2.0' in text
    assert 'fogline_cloud_sessions{replica="r2"} 5.0' in text and "fogline_cloud_replicas 2.0" in text
    assert text.count("# TYPE fogline_cloud_sessions gauge") == 1  # one family, both replicas' samples
