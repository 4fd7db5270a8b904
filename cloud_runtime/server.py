"""`fogline cloud serve`: the deep layers behind an aiohttp websocket.

    GET /ws       the edge protocol (fogline/wire/protocol.py): hello, then
                  append / infer / verify / truncate / close / ping frames
    GET /health   JSON: status, model, sessions, KV bytes
    GET /metrics  Prometheus text

The runtime's lifetime (`open_runtime`: the model with its session store,
batcher and worker thread, and the TTL reaper) is an aiohttp `cleanup_ctx`
here and a Ray Serve replica's lifetime in cloud_runtime/ray_serve.py, which
serves the same runtime and the same protocol (cloud_runtime/connection.py)
behind Serve's proxy. Shutdown drains: new work is refused with
`shutting_down`, in-flight steps finish (up to `shutdown_grace_s`), then every
edge gets a `bye` frame and a 1001 close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch
from aiohttp import web
from torch import Tensor

from cloud_runtime.batcher import Batcher, Step
from cloud_runtime.config import CloudConfig
from cloud_runtime.connection import Connections, Frame
from cloud_runtime.deep_model import DeepModel, load_deep_model
from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.sampling import allowed_tokens, judge, masked, pick, token_logprobs, top_probs
from cloud_runtime.sessions import SessionStore
from fogline import __version__, sd_notify
from fogline.aio import cancel_and_wait
from fogline.arch import ArchSpec
from fogline.constraint import unpack_mask
from fogline.errors import BundleError, ConfigError
from fogline.manifest import Manifest, load_manifest, verify_files
from fogline.wire.codecs import decode_hidden
from fogline.wire.errors import BadFrame, PositionGap, ShuttingDown, TooLarge
from fogline.wire.protocol import (Ack, Append, Close, HelloOk, Infer, Message, TokenReply, Truncate, Verdict,
                                   Verify)

log = logging.getLogger("fogline.cloud")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WS_PATH = "/ws"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


# --- the model and its sessions ---------------------------------------------------


def load_bundle_model(config: CloudConfig) -> tuple[Manifest, DeepModel]:
    """Read the cloud bundle through its manifest and build the deep model (blocking)."""
    from safetensors.torch import load_file

    bundle = Path(config.bundle)
    manifest = load_manifest(bundle, role="cloud")
    if config.verify_bundle and (problems := verify_files(bundle, manifest)):
        raise BundleError(f"{bundle} does not match its manifest: {'; '.join(problems[:3])}")
    shards = sorted(f for f in manifest.files if f.endswith(".safetensors"))
    if len(shards) != 1:
        raise BundleError(f"{bundle} manifest lists {len(shards)} safetensors files; expected one deep shard")
    try:
        hf_config = json.loads((bundle / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{bundle}/config.json is unreadable: {e}") from None
    spec = ArchSpec.from_hf_config(hf_config)
    if (spec.n_layers, spec.hidden_size) != (manifest.n_layers, manifest.hidden_size):
        raise BundleError(f"{bundle}: config.json ({spec.n_layers} layers, d={spec.hidden_size}) disagrees "
                          f"with the manifest ({manifest.n_layers}, d={manifest.hidden_size})")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        model = load_deep_model(spec, manifest.split, load_file(str(bundle / shards[0])),
                                dtype=DTYPES[config.dtype], device=config.device)
    except ValueError as e:
        raise BundleError(str(e)) from None
    if config.fast_gemv and not model.enable_fast_gemv():
        log.warning("fast_gemv requested but torch.compile is unavailable here; using eager matmuls")
    return manifest, model


@dataclass(eq=False)
class CloudRuntime:
    """What the websocket handlers need: model facts, the store, the batcher."""

    config: CloudConfig
    manifest: Manifest
    model: DeepModel
    store: SessionStore
    batcher: Batcher
    metrics: CloudMetrics
    max_context: int
    started: float = field(default_factory=time.monotonic)
    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def hello_ok(self) -> HelloOk:
        m, c = self.manifest, self.config
        return HelloOk(server=f"fogline-cloud/{__version__}", fingerprint=m.fingerprint, split=m.split,
                       n_layers=m.n_layers, hidden_size=m.hidden_size, vocab_size=m.vocab_size,
                       max_frame=c.max_frame_bytes, max_rows=c.max_rows_per_frame, max_context=self.max_context,
                       session_ttl_s=c.session_ttl_s, codecs=tuple(c.codecs))

    async def handle(self, msg: Message) -> Message | None:
        if self.draining:
            raise ShuttingDown("server is shutting down", retry_after=1.0)
        self.inflight += 1
        self.idle.clear()
        try:
            if isinstance(msg, (Append, Infer, Verify)):
                return await self._step(msg)
            if isinstance(msg, Truncate):
                return await self._truncate(msg)
            if isinstance(msg, Close):
                s = self.store.get(msg.session)
                if s is not None:
                    async with self.store.use(s):
                        self.store.drop(msg.session, "closed by the edge")
                return Ack(id=msg.id, session=msg.session, length=0)
            raise BadFrame(f"{msg.KIND} is not a request")
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def _truncate(self, msg: Truncate) -> Ack:
        s = self.store.get(msg.session)
        if s is None:
            if msg.length == 0:
                return Ack(id=msg.id, session=msg.session, length=0)
            raise self.store.unknown(msg.session)
        async with self.store.use(s):
            if msg.length > s.length:
                raise PositionGap(f"cannot truncate session {msg.session} to {msg.length}: it holds "
                                  f"{s.length} positions", expected=s.length)
            s.cache.truncate(msg.length)
            return Ack(id=msg.id, session=msg.session, length=s.length)

    async def _step(self, msg: Append | Infer | Verify) -> Message | None:
        h, c = msg.h, self.config
        if str(h.codec) not in c.codecs:
            raise BadFrame(f"codec {h.codec} is not accepted here (accepted: {', '.join(c.codecs)})")
        if h.dim != self.manifest.hidden_size:
            raise BadFrame(f"h has {h.dim} columns; this model's hidden size is {self.manifest.hidden_size}")
        if h.rows > c.max_rows_per_frame:
            raise TooLarge(f"{h.rows} rows in one frame; the limit is {c.max_rows_per_frame}")
        if msg.start + h.rows > self.max_context:
            raise TooLarge(f"positions up to {msg.start + h.rows} exceed the context of {self.max_context}")
        allowed = self._allowed(msg)
        x = decode_hidden(h)
        s = self.store.get(msg.session)
        if s is None:
            if msg.start != 0:
                raise self.store.unknown(msg.session)
            s = self.store.open(msg.session)
        async with self.store.use(s):
            if msg.start != s.length:
                raise PositionGap(f"session {msg.session} holds {s.length} positions; got start={msg.start}",
                                  expected=s.length)
            self.store.reserve(s, msg.start + h.rows)
            pos_next = msg.start + h.rows  # the position the answer's token will take
            if isinstance(msg, Append):
                step = Step(s, msg.start, x, "none", lambda _lg: None)
            elif isinstance(msg, Infer):
                step = Step(s, msg.start, x, "last", _infer_answer(msg, pos_next, allowed))
            else:
                step = Step(s, msg.start, x, "all", _verify_answer(msg, allowed))
            if not isinstance(msg, Verify) and msg.check:
                step.check = tuple((pos - msg.start, tok) for pos, tok in msg.check)
            result = await self.batcher.submit(step)
            self.store.sync(s)
            if step.check:
                s.checked += len(step.check)
                s.agreed += step.agreed
                self.metrics.agreement_checks.labels("agreed").inc(step.agreed)
                self.metrics.agreement_checks.labels("disagreed").inc(len(step.check) - step.agreed)
            checked, agreed = s.take_checks() if (not isinstance(msg, Append) or msg.ack) else (None, None)
            load = {"queue_ms": round(step.queue_s * 1000, 3), "step_ms": round(step.pass_s * 1000, 3),
                    "checked": checked, "agreed": agreed}
            end = msg.start + h.rows
            fresh = max(0, end - max(msg.start, s.high))
            s.high = max(s.high, end)
            self.metrics.rows.labels("new").inc(fresh)
            if h.rows > fresh:
                self.metrics.rows.labels("repeat").inc(h.rows - fresh)
            if isinstance(msg, Append):
                return Ack(id=msg.id, session=msg.session, length=s.length, **load) if msg.ack else None
            if isinstance(msg, Infer):
                token, top, lps = result
                return TokenReply(id=msg.id, session=msg.session, token=token, length=s.length, top=top,
                                  logprob=None if lps is None else lps[0][0],
                                  top_logprobs=None if lps is None else lps[1][0], **load)
            judgement, lps = result
            s.cache.truncate(msg.start + judgement.accepted + 1)
            return Verdict(id=msg.id, session=msg.session, accepted=judgement.accepted, token=judgement.token,
                           length=s.length, logprobs=None if lps is None else lps[0],
                           top_logprobs=None if lps is None or msg.logprobs == 0 else lps[1], **load)

    def _allowed(self, msg: Append | Infer | Verify) -> torch.Tensor | None:
        """Structured output: the token masks the edge sent (Infer.mask, Verify.masks) as bool [n, V]."""
        packed = [msg.mask] if isinstance(msg, Infer) and msg.mask is not None else (
            list(msg.masks) if isinstance(msg, Verify) and msg.masks is not None else None)
        if packed is None:
            return None
        vocab = self.manifest.vocab_size
        try:
            bits = [unpack_mask(m, vocab) for m in packed]
        except ValueError as e:
            raise BadFrame(f"{msg.KIND}: {e} (vocab {vocab})") from None
        if len({len(b) for b in bits}) > 1:
            raise BadFrame(f"{msg.KIND}: token masks of different sizes")
        return allowed_tokens(bits, vocab)

    async def wait_idle(self, timeout: float) -> bool:
        if self.inflight == 0:
            return True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


def _infer_answer(msg: Infer, pos_next: int, allowed: Tensor | None) -> Callable[[Tensor], Any]:
    """The model-thread work of an infer: pick (among the tokens a structured-output mask
    allows), the top-n probabilities, and (if asked) logprobs of the model's own distribution."""
    sampling, top_n, n_lp = msg.sampling, msg.top_n, msg.logprobs

    def answer(lg: Tensor) -> Any:
        row = masked(lg, allowed)[0]
        token = pick(row, sampling, pos_next)
        lps = None if n_lp is None else token_logprobs(lg[:1], [token], n_lp)
        return token, top_probs(row, top_n), lps
    return answer


def _verify_answer(msg: Verify, allowed: Tensor | None) -> Callable[[Tensor], Any]:
    """The model-thread work of a verify: the judgement, and (if asked) the logprobs of the
    tokens it settles (row i predicts start+i+1: accepted drafts, then the cloud's token)."""
    draft, sampling, probs, start, n_lp = msg.draft, msg.sampling, msg.draft_probs, msg.start, msg.logprobs

    def answer(lg: Tensor) -> Any:
        j = judge(masked(lg, allowed), draft, sampling, start, probs)
        lps = None
        if n_lp is not None:
            lps = token_logprobs(lg[:j.accepted + 1], [*draft[:j.accepted], j.token], n_lp)
        return j, lps
    return answer


# --- the aiohttp websocket as a Transport --------------------------------------------


class AiohttpTransport:
    """cloud_runtime.connection.Transport over aiohttp's server-side websocket."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.peer = request.remote or "?"
        self.authorization = request.headers.get("Authorization", "")

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def receive(self, timeout: float | None = None) -> Frame:
        m = await self.ws.receive(timeout=timeout)
        if m.type == aiohttp.WSMsgType.BINARY:
            return bytes(m.data)
        if m.type == aiohttp.WSMsgType.TEXT:
            return str(m.data)
        return None  # CLOSE, CLOSING, CLOSED, ERROR: aiohttp has already answered the close

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            pass  # the peer went away

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())


# --- the app ----------------------------------------------------------------------------

@asynccontextmanager
async def open_runtime(config: CloudConfig, metrics: CloudMetrics) -> AsyncIterator[CloudRuntime]:
    """The runtime's lifetime: the model (loaded in its worker thread), the session store, the
    batcher and the TTL reaper; on exit the reaper and the batcher stop and the worker thread ends."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fogline-model")
    loop = asyncio.get_running_loop()
    try:
        manifest, model = await loop.run_in_executor(executor, load_bundle_model, config)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    model.kv_pool.reserve_bytes(min(config.kv_budget_bytes, 1 << 30))  # grows by doubling past that
    store = SessionStore(model.new_cache, config.kv_budget_bytes, config.session_ttl_s, metrics)
    batcher = Batcher(model, metrics, window_s=config.batch_window_ms / 1000, max_tokens=config.max_batch_tokens,
                      max_queue=config.max_queue, executor=executor, schedule=config.schedule,
                      step_deadline_s=config.step_deadline_ms / 1000)
    max_context = config.max_context or model.spec.max_position_embeddings
    rt = CloudRuntime(config, manifest, model, store, batcher, metrics, max_context)
    rt.idle.set()
    batcher.start()
    reaper = loop.create_task(_reap(rt), name="fogline-reaper")
    log.info("cloud ready: %s layers [%d, %d) on %s/%s", manifest.source or "model", manifest.split,
             manifest.n_layers, config.device, config.dtype)
    try:
        yield rt
    finally:
        await cancel_and_wait(reaper)
        await batcher.stop()
        executor.shutdown(wait=True)


async def _reap(rt: CloudRuntime) -> None:
    while True:
        await asyncio.sleep(rt.config.reap_interval_s)
        if n := rt.store.reap():
            log.info("reaped %d idle session(s)", n)


def health_limit(config: CloudConfig) -> int:
    """Queued steps at which /health reports overloaded."""
    return config.health_max_queue or max(1, config.max_queue * 3 // 4)


def health_status(rt: CloudRuntime) -> str:
    """ok | draining | overloaded: what a load balancer must know (only "ok" is a 200)."""
    if rt.draining:
        return "draining"
    if rt.batcher.queued >= health_limit(rt.config):
        return "overloaded"
    return "ok"


def health_body(rt: CloudRuntime, connections: int) -> dict[str, Any]:
    """What /health reports for one runtime (the Ray Serve app lists one of these per replica)."""
    m = rt.manifest
    return {
        "status": health_status(rt), "queue_limit": health_limit(rt.config),
        "fingerprint": m.fingerprint, "split": m.split, "n_layers": m.n_layers,
        "device": rt.config.device, "dtype": rt.config.dtype, "fast_gemv": rt.model.fast_gemv,
        "sessions": len(rt.store), "kv_bytes": rt.store.kv_bytes, "kv_budget_bytes": rt.store.budget,
        "connections": connections, "queued_steps": rt.batcher.queued,
        "uptime_s": round(time.monotonic() - rt.started, 3),
    }


# --- the app ----------------------------------------------------------------------------

CONFIG = web.AppKey("fogline_cloud_config", CloudConfig)
METRICS = web.AppKey("fogline_cloud_metrics", CloudMetrics)
RUNTIME = web.AppKey("fogline_cloud_runtime", CloudRuntime)
CONNECTIONS = web.AppKey("fogline_cloud_connections", Connections)


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_runtime(app[CONFIG], app[METRICS]) as rt:
        app[RUNTIME] = rt
        yield


async def _on_shutdown(app: web.Application) -> None:
    rt = app.get(RUNTIME)
    if rt is not None:
        await app[CONNECTIONS].drain(rt, "server shutting down")


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    # aiohttp enforces a hard cap above ours, so an oversized frame still gets a typed too_large first.
    ws = web.WebSocketResponse(max_msg_size=2 * app[CONFIG].max_frame_bytes, heartbeat=30.0)
    await ws.prepare(request)
    await app[CONNECTIONS].serve(AiohttpTransport(ws, request), app[RUNTIME])
    return ws


async def health(request: web.Request) -> web.Response:
    """200 only while this runtime takes new work: 503 while draining or overloaded (body says which)."""
    body = health_body(request.app[RUNTIME], len(request.app[CONNECTIONS]))
    return web.json_response(body, status=200 if body["status"] == "ok" else 503,
                             headers=None if body["status"] == "ok" else {"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_app(config: CloudConfig) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[METRICS] = CloudMetrics()
    app[CONNECTIONS] = Connections(app[METRICS])
    app.cleanup_ctx.append(_runtime_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get(WS_PATH, ws_handler)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(config: CloudConfig) -> None:
    """Run until SIGINT/SIGTERM; prints the bound address once listening."""
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown_grace_s + 5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"fogline cloud: serving {config.bundle} on http://{host}:{port} (websocket {WS_PATH})", flush=True)
        rt = app[RUNTIME]
        sd_notify.ready(f"serving K={rt.manifest.split} on {host}:{port}")
        # systemd's watchdog: healthy unless steps wait while the model makes no pass at all
        watchdog = sd_notify.start_watchdog(sd_notify.ProgressWatch(progress=lambda: rt.batcher.passes,
                                                                    busy=lambda: rt.batcher.queued > 0))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("fogline cloud: shutting down (draining)", flush=True)
        if watchdog is not None:
            watchdog.cancel()
        sd_notify.stopping("draining sessions")
    finally:
        await runner.cleanup()


def main(args: Any) -> int:
    from cloud_runtime.config import config_from_args

    config = config_from_args(args)
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    if config.ray:
        try:
            from cloud_runtime.ray_serve import run
        except ImportError as e:
            raise ConfigError(f"--ray needs Ray Serve: pip install 'fogline[ray]' ({e})") from None
        return run(config)
    asyncio.run(serve(config))
    return 0
