"""Start `fogline edge serve` as a real subprocess for the HTTP tests, and stop it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class EdgeServer:
    proc: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:PORT
    log_path: Path

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def start_edge_server(bundle: Path, log_path: Path, *args: str, env: dict[str, str] | None = None,
                      deadline_s: float = 120.0) -> EdgeServer:
    """Run the CLI on port 0, read the port from its log, wait until /health says ok."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "fogline.cli", "edge", "serve", "--bundle", str(bundle), "--port", "0", *args]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    end = time.monotonic() + deadline_s
    base = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"edge server exited with {proc.returncode}:\n{log_path.read_text()}")
        m = re.search(r"listening on (http://[0-9.]+:\d+)", log_path.read_text(errors="replace"))
        if m:
            base = m.group(1)
            break
        time.sleep(0.1)
    if base is None:
        proc.kill()
        raise RuntimeError(f"edge server did not listen in time:\n{log_path.read_text()}")
    server = EdgeServer(proc, base, log_path)
    while time.monotonic() < end:
        status, body = server.health()
        if status == 200:
            return server
        if body.get("status") == "error":
            break
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"edge server never became healthy:\n{log_path.read_text()}")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def edge_env(url: str, **extra: str) -> dict[str, str]:
    """The environment of an edge daemon on the test machine's budget, linked to the cloud at `url`."""
    env = dict(os.environ, FOGLINE_EDGE_CLOUD_URL=url, FOGLINE_EDGE_THREADS="1", FOGLINE_EDGE_PARALLEL="6",
               FOGLINE_EDGE_CTX_SIZE="256", FOGLINE_EDGE_CLOUD_PING_S="0.5")
    env.update(extra)
    return env


def wait_cloud_connected(edge: EdgeServer, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _, body = edge.health()
        if body["cloud"].get("connected"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"edge never connected to the cloud: {body}")


@contextmanager
def wan_proxy(upstream_port: int, shape=None) -> Iterator:
    """tools/wanem.py's proxy to 127.0.0.1:upstream_port, on an event loop thread of its own
    (tests change `wan.shape` and `wan.upstream` while it forwards)."""
    from tools.wanem import WanEmulator

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    wan = asyncio.run_coroutine_threadsafe(WanEmulator(("127.0.0.1", upstream_port), shape).start(), loop).result(30)
    try:
        yield wan
    finally:
        asyncio.run_coroutine_threadsafe(wan.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


@contextmanager
def edge_server(bundle: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[EdgeServer]:
    """`start_edge_server` for the length of a `with` block (stopped however the block ends)."""
    srv = start_edge_server(bundle, log_path, *args, env=env)
    try:
        yield srv
    finally:
        srv.stop()
