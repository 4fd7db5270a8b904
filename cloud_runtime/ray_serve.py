"""`fogline cloud serve --ray`: the cloud as a Ray Serve application (the fogline[ray] extra).

    edge ──ws──▶ Serve proxy (each node, --host:--port) ──▶ CloudReplica ×N (one cloud runtime each)
                                                               │ health + metrics, every second
                                                               ▼
                                                          ReplicaDirectory (one actor, no route)

Each replica is one cloud runtime — deep model, batcher, session store, reaper
(`server.open_runtime`) — speaking the protocol through the same
`connection.Connections` as the plain aiohttp server: same hello, auth token,
fingerprint and K checks, same error frames. A websocket is one ASGI request to
Serve, so the proxy pins it, and every session multiplexed on it, to one replica
for its lifetime; nothing in fogline routes sessions. A replica that dies
mid-stream closes its websockets; the edge reconnects through the proxy (to a live
replica), is told `unknown_session` and replays its h_K history
(edge_runtime/cloud_generation.py). Serve sends no new connection to a replica it
is stopping (scale-down, redeploy); that replica's open websockets keep being
served until `shutdown_grace_s`, then close, and their edges replay elsewhere.

GET /health and /metrics, answered by whichever replica the proxy picks, cover
every live replica (cloud_runtime/replica_stats.py): totals and a per-replica
list; Prometheus samples carry a `replica` label. Serve's own health check calls
`check_health`: a replica whose model makes no pass while steps wait is replaced.
"""

# No `from __future__ import annotations` here: Serve rebinds the route methods and FastAPI must
# then still see `websocket: WebSocket` as a class, not a string, to inject the websocket.
import asyncio
import logging
import os
import signal
import threading
import time
from contextlib import AsyncExitStack
from typing import Any

import ray
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.websockets import WebSocketDisconnect, WebSocketState

from cloud_runtime.config import CloudConfig, load_config, parse_autoscale
from cloud_runtime.connection import Connections, Frame
from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.replica_stats import REPORT_INTERVAL_S, STALE_AFTER_S, aggregate_health, merge_metrics
from cloud_runtime.server import LOG_FORMAT, WS_PATH, CloudRuntime, health_body, open_runtime
from fogline import sd_notify
from fogline.aio import cancel_and_wait
from fogline.errors import ConfigError

log = logging.getLogger("fogline.cloud.ray")

APP_NAME = "fogline"  # the Serve application
# Serve counts an open websocket as an ongoing request; its default cap (5) would queue the 6th
# edge. The runtime bounds its own load (max_queue, the KV budget: typed `overloaded`).
MAX_ONGOING = 10_000
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

api = FastAPI(title="fogline cloud", docs_url=None, redoc_url=None, openapi_url=None)


class StarletteTransport:
    """cloud_runtime.connection.Transport over Starlette's WebSocket (what Serve's ingress hands us)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        self.authorization = ws.headers.get("authorization", "")

    @property
    def closed(self) -> bool:
        return WebSocketState.DISCONNECTED in (self.ws.client_state, self.ws.application_state)

    async def receive(self, timeout: float | None = None) -> Frame:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg["type"] != "websocket.receive":
            return None  # websocket.disconnect
        data = msg.get("bytes")
        return data if data is not None else msg.get("text") or ""

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError, WebSocketDisconnect):
            pass  # the peer went away

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code=code, reason=reason)
        except (ConnectionError, RuntimeError, WebSocketDisconnect):
            pass  # already closed by the peer


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class ReplicaDirectory:
    """The replicas' latest reports (health body + Prometheus text), for the aggregated endpoints."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict[str, Any], str]] = {}

    def report(self, replica: str, health: dict[str, Any], metrics: str) -> None:
        self._reports[replica] = (time.monotonic(), health, metrics)

    def live(self) -> dict[str, tuple[dict[str, Any], str]]:
        """Reports of the replicas heard from within STALE_AFTER_S (older ones are dropped)."""
        now = time.monotonic()
        for rid in [r for r, (t, _, _) in self._reports.items() if now - t > STALE_AFTER_S]:
            del self._reports[rid]
        return {rid: (h, m) for rid, (_, h, m) in self._reports.items()}


@serve.deployment
@serve.ingress(api)
class CloudReplica:
    """One cloud runtime behind Serve's proxy."""

    async def __init__(self, config: CloudConfig, directory: DeploymentHandle) -> None:
        logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
        self.metrics = CloudMetrics()
        self._stack = AsyncExitStack()
        self.rt: CloudRuntime = await self._stack.enter_async_context(open_runtime(config, self.metrics))
        self.conns = Connections(self.metrics)
        self.directory = directory
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()  # the replica actor's name
        self._stalled = sd_notify.ProgressWatch(progress=lambda: self.rt.batcher.passes,
                                                busy=lambda: self.rt.batcher.queued > 0)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever(), name="fogline-report")

    def _health(self) -> dict[str, Any]:
        return health_body(self.rt, len(self.conns))

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.directory.report.remote(self.replica, self._health(), self.metrics.render().decode())
            except Exception as e:  # the directory restarting: the next report re-registers
                log.warning("replica %s: report to the directory failed: %s: %s", self.replica, type(e).__name__, e)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _live(self) -> dict[str, tuple[dict[str, Any], str]]:
        live = await self.directory.live.remote()
        live[self.replica] = (self._health(), self.metrics.render().decode())  # ours, fresh
        return live

    @api.websocket(WS_PATH)
    async def edge(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await self.conns.serve(StarletteTransport(websocket), self.rt)

    @api.get("/health")
    async def health(self) -> JSONResponse:
        code, body = aggregate_health({rid: h for rid, (h, _) in (await self._live()).items()})
        body["answered_by"] = self.replica
        return JSONResponse(body, status_code=code)

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        texts = {rid: m for rid, (_, m) in (await self._live()).items()}
        return Response(merge_metrics(texts), media_type=PROMETHEUS_TEXT)

    def check_health(self) -> None:
        """Serve's periodic health check: unhealthy once steps wait and the model makes no pass."""
        if not self._stalled():
            raise RuntimeError(f"no forward pass for {self._stalled.stale} health checks with "
                               f"{self.rt.batcher.queued} step(s) queued")

    async def __del__(self) -> None:
        """Serve's graceful stop (after its drain): bye to any edge still here, then free the runtime.
        The directory forgets this replica once its reports stop (STALE_AFTER_S)."""
        await cancel_and_wait(self._reporter)
        await self.conns.drain(self.rt, "replica stopping")
        await self._stack.aclose()


def build_app(config: CloudConfig) -> serve.Application:
    """The Serve application: CloudReplica ×(replicas | autoscaled) + the directory."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.threads or 1, "num_gpus": config.num_gpus},
        "max_ongoing_requests": MAX_ONGOING,
        "graceful_shutdown_timeout_s": config.shutdown_grace_s,
    }
    if (scale := parse_autoscale(config.autoscale)) is not None:
        opts["autoscaling_config"] = {"min_replicas": scale[0], "max_replicas": scale[1],
                                      "target_ongoing_requests": config.edges_per_replica}
    else:
        opts["num_replicas"] = config.replicas
    return CloudReplica.options(**opts).bind(config, ReplicaDirectory.bind())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The app for Serve config files (`serve run`/`serve deploy`, KubeRay's serveConfigV2):
    `import_path: cloud_runtime.ray_serve:app_builder`, `args`: CloudConfig fields (bundle
    required). The HTTP host/port then come from the config file's http_options."""
    return build_app(load_config(overrides={**args, "ray": True}))


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def run(config: CloudConfig) -> int:
    """Deploy on Ray (a local one unless `ray_address`), serve until SIGINT/SIGTERM, then delete the app."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report unless the operator asks for one
    if config.ray_address:
        try:
            ray.init(address=config.ray_address)
        except ConnectionError as e:
            raise ConfigError(f"cannot join the Ray cluster at {config.ray_address}: {e}") from None
    else:  # a one-node cluster for this machine: its internal traffic stays on the loopback
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        scale = f"autoscaling {config.autoscale} replicas" if config.autoscale else f"{config.replicas} replica(s)"
        print(f"fogline cloud: serving {config.bundle} on Ray Serve ({scale}) at http://{config.host}:{config.port} "
              f"(websocket {WS_PATH})", flush=True)
        sd_notify.ready(f"Ray Serve app {APP_NAME!r} on {config.host}:{config.port}")
        _wait_for_signal()
        print("fogline cloud: shutting down (deleting the Serve app)", flush=True)
        sd_notify.stopping("deleting the Serve app")
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
    return 0
