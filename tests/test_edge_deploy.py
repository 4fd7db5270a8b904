"""The edge daemon as systemd and an operator see it, from outside: the real `fogline edge serve`
subprocess speaking sd_notify to a socket this test listens on, /health's `device` object and the
device gauges in /metrics, and `auto` mode through the openai client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request

import openai
import pytest
from edge_server_util import EdgeServer, start_edge_server
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.device_monitor import DeviceMonitor

CTX = 256


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket; like systemd it
    reads every datagram as it arrives (a thread), so the sender's buffer never fills."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fl-notify-", dir="/tmp")  # sun_path is at most 107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            with self._mu:
                self.messages.append(data.decode())

    def clear(self) -> None:
        with self._mu:
            self.messages.clear()

    def wait_for(self, line: str, timeout: float) -> list[str]:
        """Wait until a datagram contains `line`; returns everything received so far."""
        end = time.monotonic() + timeout
        while True:
            with self._mu:
                got = list(self.messages)
            if any(line in m.split("\n") for m in got):
                return got
            if time.monotonic() > end:
                raise AssertionError(f"no {line!r} within {timeout} s; got {got}")
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def notify():
    n = NotifyListener()
    yield n
    n.close()


@pytest.fixture(scope="module")
def server(demo_bundle, tmp_path_factory, notify) -> EdgeServer:
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    s = start_edge_server(demo_bundle / "edge", tmp_path_factory.mktemp("edge") / "server.log",
                          "--threads", "1", "--parallel", "2", "--ctx-size", str(CTX), "--batch-size", "64",
                          env=env)
    yield s
    if s.proc.poll() is None:
        assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.health()[1]["model"]


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


# --------------------------------------------------------------------------- sd_notify


def test_sd_notify_ready_after_load_then_watchdog(server, notify):
    msgs = notify.wait_for("WATCHDOG=1", timeout=30)
    lines = [line for m in msgs for line in m.split("\n")]
    assert "READY=1" in lines, msgs
    first_ready = lines.index("READY=1")
    assert "WATCHDOG=1" not in lines[:first_ready], "a watchdog ping before READY=1"
    ready_msg = next(m for m in msgs if "READY=1" in m.split("\n"))
    assert "STATUS=serving " in ready_msg  # systemctl status shows what is served
    assert server.health()[0] == 200  # READY=1 came once the model was loaded
    # the pings keep coming while healthy (WATCHDOG_USEC=0.4 s: one every 0.2 s)
    n = sum(m.split("\n").count("WATCHDOG=1") for m in msgs)
    notify.clear()
    notify.wait_for("WATCHDOG=1", timeout=5)
    assert n >= 1


# --------------------------------------------------------------------------- device monitor


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}")
    else:
        yield prefix, obj


def test_health_reports_the_device_with_absent_sensors_null(server):
    status, body = server.health()
    assert status == 200
    dev = body["device"]
    assert dev is not None and dev["taken_at"] > 0
    here = DeviceMonitor("/").sample().to_health()
    # same machine: a sensor is present in the daemon's report exactly when it is here
    skip = {".taken_at", ".temperature_c.zones"}
    for path, value in _leaves(here):
        if path in skip or path.startswith(".temperature_c.zones"):
            continue
        got = dev
        for part in path.strip(".").split("."):
            got = got[part]
        assert (got is None) == (value is None), (path, got, value)
    assert dev["memory"]["total_bytes"] == here["memory"]["total_bytes"] > 0
    assert dev["load"]["cpus"] == here["load"]["cpus"]


def test_metrics_export_present_device_sensors_only(server):
    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    snap = DeviceMonitor("/").sample()
    assert samples["fogline_device_memory_total_bytes"] == snap.mem_total_bytes
    assert samples["fogline_device_cpus_online"] == snap.cpus_online
    assert samples["fogline_device_snapshot_timestamp_seconds"] > 0
    for name, value in (("fogline_device_cpu_temperature_celsius", snap.cpu_temp_c),
                        ("fogline_device_on_battery", snap.on_battery),
                        ("fogline_device_undervoltage", snap.undervoltage),
                        ("fogline_device_battery_ratio", snap.battery_percent)):
        assert (name in samples) == (value is not None), name  # absent: no sample at all, not a 0


# --------------------------------------------------------------------------- auto mode


def _fogline(obj) -> dict:
    return obj.model_extra["fogline"]


def test_auto_without_cloud_picks_edge_and_says_why(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "List three colours."}],
                                       max_tokens=8, temperature=0,
                                       extra_body={"mode": "auto", "fogline_slo_ms": 250})
    f = _fogline(r)
    auto = f["auto"]
    assert auto["arm"] == "edge" and auto["mode"] == "edge"
    assert "cloud unreachable" in auto["reason"] and auto["slo_ms"] == 250
    assert f["mode"] == "edge" and f["fallback"] is None  # chosen, not fallen back to
    assert f["edge_tokens"] == r.usage.completion_tokens > 0 and f["cloud_round_trips"] == 0
    # a plain edge request carries no auto object; the config's SLO applies when the request names none
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       extra_body={"mode": "edge"})
    assert "auto" not in _fogline(r)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            stream=True, extra_body={"mode": "auto"})
    last = [c for c in stream][-1]
    assert last.model_extra["fogline"]["auto"]["arm"] == "edge"
    assert last.model_extra["fogline"]["auto"]["slo_ms"] == 100  # EdgeConfig.slo_ms


def test_auto_rejects_a_bad_slo(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"mode": "auto", "fogline_slo_ms": -5})
    assert e.value.body["param"] == "fogline_slo_ms"


def test_auto_with_an_unreachable_cloud_picks_edge(demo_bundle, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = start_edge_server(demo_bundle / "edge", tmp_path / "server.log", "--threads", "1", "--parallel", "1",
                            "--ctx-size", str(CTX), "--batch-size", "64", "--mode", "auto",
                            env=dict(os.environ, FOGLINE_EDGE_CLOUD_URL=f"ws://127.0.0.1:{port}/ws",
                                     FOGLINE_EDGE_CLOUD_DEADLINE_MS="1000"))
    try:
        assert srv.health()[1]["cloud"]["configured"] is True
        c = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120)
        m = srv.health()[1]["model"]
        r = c.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                      temperature=0)  # no mode: the default, auto
        f = _fogline(r)
        assert f["auto"]["arm"] == "edge" and "cloud unreachable" in f["auto"]["reason"]
        assert f["mode"] == "edge" and f["cloud_round_trips"] == 0
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_sends_stopping(server, notify):
    notify.clear()
    assert server.stop() == 0, server.log()
    notify.wait_for("STOPPING=1", timeout=10)


def test_notifier_never_blocks_on_a_full_socket(tmp_path):
    """A reader that does not drain (a wedged systemd) must not block the daemon's event loop."""
    from fogline.sd_notify import Notifier

    d = tempfile.mkdtemp(prefix="fl-full-", dir="/tmp")
    path = os.path.join(d, "n")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    try:
        n = Notifier({"NOTIFY_SOCKET": path})
        t0 = time.monotonic()
        results = [n.watchdog() for _ in range(5000)]
        assert time.monotonic() - t0 < 5
        assert results[0] is True and results[-1] is False  # the buffer filled: reported, not waited on
        n.close()
    finally:
        sink.close()
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- the cloud daemon


def test_cloud_serve_speaks_sd_notify(demo_bundle, tmp_path):
    """`fogline cloud serve`: READY=1 once the deep layers are loaded and it listens, STOPPING=1 on SIGTERM."""
    import subprocess
    import sys

    from edge_server_util import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = NotifyListener()
    log = tmp_path / "cloud.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=listener.path)
    with open(log, "wb") as f:
        cloud = subprocess.Popen([sys.executable, "-m", "fogline.cli", "cloud", "serve", "--bundle",
                                  str(demo_bundle / "cloud"), "--port", str(port), "--threads", "1"],
                                 stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        listener.wait_for("READY=1", timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        cloud.terminate()
        assert cloud.wait(30) == 0, log.read_text()
        listener.wait_for("STOPPING=1", timeout=10)
        listener.close()
