"""The edge daemon's HTTP API (aiohttp): OpenAI-compatible endpoints, the Ollama API under
/api/, the chat page at /, /health, /metrics.

`create_app(config)` builds the application; the llama.cpp runtime is a
`cleanup_ctx` resource loaded in a worker thread, so the server answers
/health with 503 while the model loads. Handlers never touch llama.cpp's
decode: they submit to the engine thread and await its events, which the
engine hands over with `loop.call_soon_threadsafe`. A handler that ends for
any reason (finished, client gone, server stopping) cancels its request, which
frees its KV sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from edge_runtime.auto_mode import AutoMode
from edge_runtime.config import EdgeConfig
from edge_runtime.device_monitor import DeviceMonitor, register_device_metrics
from edge_runtime.engine import GenerationRequest, StreamEvent
from edge_runtime.errors import (ApiError, ErrorKind, Surface, as_api_error, error_body, http_status, invalid,
                                 surface_of)
from edge_runtime.loader import EdgeRuntime, load_runtime
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.ollama_api import (OLLAMA_VERSION, OllamaBuilder, OllamaRequest, ServedModel, ollama_name,
                                     parse_ollama_chat, parse_ollama_generate)
from edge_runtime.openai_api import (ApiRequest, ResponseBuilder, finish_error, models_list, parse_chat,
                                     parse_completion)
from fogline import __version__
from fogline.aio import cancel_and_wait
from fogline.constraint import Constraint, ConstraintError, Grammars

log = logging.getLogger("fogline.edge.http")

Loader = Callable[[EdgeConfig], EdgeRuntime]
STATIC = Path(__file__).with_name("static")  # the chat page (package data: no CDN, works offline)
# routes whose requests /metrics counts by status
COUNTED = frozenset({"chat", "completions", "models", "api_chat", "api_generate", "api_tags", "api_show"})


@dataclass
class RuntimeSlot:
    """The runtime once loaded, or why it is not (yet)."""

    runtime: EdgeRuntime | None = None
    error: str | None = None
    started: float = 0.0
    done: asyncio.Future[None] | None = None  # resolves when loading ended, either way
    bridge: Any = None  # CloudBridge when cloud_url is set (collab / spec / cloud modes)


CONFIG = web.AppKey("config", EdgeConfig)
RUNTIME = web.AppKey("runtime", RuntimeSlot)
METRICS = web.AppKey("metrics", EdgeMetrics)
DEVICE = web.AppKey("device", DeviceMonitor)
AUTO = web.AppKey("auto", AutoMode)


def create_app(config: EdgeConfig, *, loader: Loader = load_runtime) -> web.Application:
    app = web.Application(middlewares=[_error_middleware, _auth_middleware, _metrics_middleware],
                          client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[RUNTIME] = RuntimeSlot(started=time.time())
    app[METRICS] = EdgeMetrics()
    app[DEVICE] = DeviceMonitor("/", hot_c=config.hot_c)
    register_device_metrics(app[METRICS].registry, app[DEVICE])
    app[AUTO] = AutoMode(config, app[DEVICE])
    app.cleanup_ctx.append(_device_ctx)
    app.cleanup_ctx.append(_runtime_ctx(loader))
    app.router.add_post("/v1/chat/completions", chat_completions, name="chat")
    app.router.add_post("/v1/completions", completions, name="completions")
    app.router.add_get("/v1/models", list_models, name="models")
    app.router.add_post("/api/chat", ollama_chat, name="api_chat")
    app.router.add_post("/api/generate", ollama_generate, name="api_generate")
    app.router.add_get("/api/tags", ollama_tags, name="api_tags")
    app.router.add_post("/api/show", ollama_show, name="api_show")
    app.router.add_get("/api/version", ollama_version, name="api_version")
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/", chat_page, name="page")
    app.router.add_static("/static/", STATIC, name="static")
    return app


def _runtime_ctx(loader: Loader) -> Callable[[web.Application], AsyncIterator[None]]:
    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        slot, cfg, m = app[RUNTIME], app[CONFIG], app[METRICS]
        loop = asyncio.get_running_loop()
        slot.done = loop.create_future()

        async def load() -> None:
            try:
                rt = await loop.run_in_executor(None, loader, cfg)
            except Exception as e:
                slot.error = str(e)
                log.error("could not load the edge runtime: %s", e)
            else:
                slot.runtime = rt
                if cfg.cloud_url:
                    slot.bridge = _start_bridge(cfg, rt, m, loop)
                app[AUTO].seed(rt.manifest.calibration, slot.bridge)
                m.watch(lambda: rt.engine.n_waiting, lambda: rt.engine.n_running)
                m.ready.set(1)
                log.info("ready: serving %r", rt.model_name)
            finally:
                slot.done.set_result(None)

        task = asyncio.create_task(load())
        yield
        await asyncio.shield(task)  # a thread cannot be interrupted; let loading finish, then free it
        if slot.bridge is not None:
            await slot.bridge.close()
        if slot.runtime is not None:
            m.ready.set(0)
            await loop.run_in_executor(None, slot.runtime.close)
            slot.runtime = None

    return runtime_ctx


async def _device_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample the board now (so /health has it from the start), then every device_sample_s."""
    mon = app[DEVICE]
    try:
        await asyncio.to_thread(mon.sample)
    except Exception:  # a monitor must never keep the daemon from starting
        log.exception("device sample failed")
    task = asyncio.create_task(mon.run(app[CONFIG].device_sample_s), name="fogline-device-monitor")
    yield
    await cancel_and_wait(task)


def _start_bridge(cfg: EdgeConfig, rt: EdgeRuntime, m: EdgeMetrics, loop: asyncio.AbstractEventLoop) -> Any:
    """One CloudLink per process; register the cloud-backed modes on the engine."""
    from edge_runtime.cloud_client import CloudLink
    from edge_runtime.cloud_modes import CloudBridge, register_cloud_modes

    cal = rt.manifest.calibration or {}
    tau = cal.get("default_tau") if isinstance(cal.get("default_tau"), (int, float)) else cfg.tau
    deadline = cfg.cloud_deadline_ms / 1000.0
    link = CloudLink(cfg.cloud_url, fingerprint=rt.manifest.fingerprint, split=rt.manifest.split,
                     token=cfg.cloud_token, codec=cfg.cloud_codec,
                     connect_timeout=max(1.0, min(10.0, deadline or 10.0)),
                     request_timeout=max(1.0, deadline) if deadline else 120.0)
    bridge = CloudBridge(link, loop, deadline_s=deadline, history_limit=cfg.replay_history_tokens,
                         tau=float(tau), spec_gamma=cfg.spec_gamma, spec_stop=cfg.spec_stop, ping_s=cfg.cloud_ping_s,
                         check_share=cfg.collab_check_share)
    register_cloud_modes(rt.engine, bridge)
    m.watch_cloud(bridge)
    bridge.start()
    log.info("cloud modes on: %s (codec %s, deadline %d ms, tau %.3g)", cfg.cloud_url, cfg.cloud_codec,
             cfg.cloud_deadline_ms, tau)
    return bridge


# --------------------------------------------------------------------------- middlewares


def error_response(err: ApiError, surface: Surface = "openai") -> web.Response:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return web.json_response(error_body(err, surface), status=http_status(err, surface), headers=headers)


_HTTP_KINDS = {404: ErrorKind.NOT_FOUND, 405: ErrorKind.METHOD_NOT_ALLOWED, 413: ErrorKind.PAYLOAD_TOO_LARGE}


@web.middleware
async def _error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """The one place where exceptions become error bodies: OpenAI's shape, Ollama's under /api/."""
    surface = surface_of(request.path)
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e, surface)
    except web.HTTPException as e:
        kind = _HTTP_KINDS.get(e.status)
        if kind is None:
            raise
        return error_response(ApiError(kind, f"{request.method} {request.path}: {e.reason}"), surface)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(as_api_error(e), surface)


@web.middleware
async def _auth_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    key = request.app[CONFIG].api_key
    if key and request.path.startswith(("/v1/", "/api/")):
        got = request.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(ErrorKind.UNAUTHORIZED, "missing or wrong API key: send 'Authorization: Bearer <key>'")
    return await handler(request)


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:
    route = request.match_info.route.name or "other"
    status = "499"  # the client went away before an answer
    try:
        resp = await handler(request)
        status = str(resp.status)
        return resp
    except ApiError as e:
        status = str(http_status(e))
        raise
    except web.HTTPException as e:
        status = str(e.status)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        status = "500"
        raise
    finally:
        if route in COUNTED:
            request.app[METRICS].requests.labels(route, status).inc()


# --------------------------------------------------------------------------- handlers


def _ready(request: web.Request) -> EdgeRuntime:
    slot = request.app[RUNTIME]
    if slot.runtime is None:
        why = f"the model failed to load: {slot.error}" if slot.error else "the model is still loading"
        raise ApiError(ErrorKind.UNAVAILABLE, why, retry_after=None if slot.error else 2)
    if slot.runtime.engine.dead is not None:
        raise ApiError(ErrorKind.UNAVAILABLE, f"the edge engine died: {slot.runtime.engine.dead}")
    return slot.runtime


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise invalid("the request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    t0 = time.monotonic()
    rt = _ready(request)
    body = await _json_body(request)
    parse = parse_chat if kind == "chat" else parse_completion
    api = parse(body, n_vocab=rt.model.n_vocab, default_mode=request.app[CONFIG].default_mode)
    async with _submitted(request, rt, api, t0) as gen:
        builder = ResponseBuilder(kind=api.kind, model=rt.model_name, piece=rt.model.token_bytes,
                                  fingerprint=f"fogline-{rt.manifest.fingerprint[:12]}-k{rt.manifest.split}",
                                  logprobs=api.params.logprobs)
        if api.stream:
            return await _stream(request, rt, api, builder, gen.events, gen.timing)
        return await _collect(rt, api, builder, gen.events, gen.timing, gen.echo_text)


def _check_model(request: web.Request, rt: EdgeRuntime, asked: str) -> None:
    """Any name means the one model served, unless strict_model_name is set."""
    if request.app[CONFIG].strict_model_name and asked not in (rt.model_name, ollama_name(rt.model_name)):
        raise ApiError(ErrorKind.MODEL_NOT_FOUND, f"model {asked!r} not found; this server serves {rt.model_name!r}",
                       param="model")


@dataclass
class _Generation:
    """One request handed to the engine: where its events arrive and how they are timed."""

    rid: str
    events: _EventQueue
    timing: _Timing
    echo_text: str


@contextlib.asynccontextmanager
async def _submitted(request: web.Request, rt: EdgeRuntime, api: ApiRequest, t0: float
                     ) -> AsyncIterator[_Generation]:
    """Submit `api` to the engine; leaving the block before its last event (client gone, failure)
    cancels it, which frees its KV sequence."""
    _check_model(request, rt, api.model)
    prompt, echo_text = _prompt_tokens(rt, api)
    m = request.app[METRICS]
    gen = _Generation(uuid.uuid4().hex, _EventQueue(asyncio.get_running_loop()), _Timing(m, t0, request.app[AUTO]),
                      echo_text)
    mode, tau, gamma = api.mode, api.tau, None
    if mode == "auto":  # the policy picks the arm; the request then runs as that mode
        gen.timing.decision = request.app[AUTO].choose(api.slo_ms)
        mode, tau, gamma = AutoMode.plan(gen.timing.decision)
    capture = mode in ("collab", "spec", "cloud") and request.app[RUNTIME].bridge is not None
    constraint = await _constraint(rt, api)
    rt.engine.submit(GenerationRequest(gen.rid, prompt, api.params, mode, capture_hidden=capture, tau=tau,
                                       gamma=gamma, constraint=constraint, timeline=api.timeline), gen.events.emit)
    m.prompt_tokens.inc(len(prompt))
    finished = False
    try:
        yield gen
        finished = True
    finally:
        if not finished or not gen.events.finished:
            rt.engine.cancel(gen.rid)  # client gone or failure: stop generating, free the sequence
            m.finished.labels("cancelled").inc()


_grammars: dict[int, tuple[Any, Grammars]] = {}


async def _constraint(rt: EdgeRuntime, api: ApiRequest) -> Constraint | None:
    """Structured output: the request's grammar matcher (compiled off the event loop, cached per
    schema); a schema the engine cannot enforce is a 400 naming response_format."""
    if api.response_schema is None:
        return None
    if id(rt.model) not in _grammars or _grammars[id(rt.model)][0] is not rt.model:
        _grammars[id(rt.model)] = (rt.model, Grammars(rt.model))
    try:
        return await asyncio.to_thread(_grammars[id(rt.model)][1].constraint, api.response_schema)
    except ConstraintError as e:
        raise invalid(str(e), "response_format") from None


def _prompt_tokens(rt: EdgeRuntime, api: ApiRequest) -> tuple[list[int], str]:
    if api.kind == "chat":
        assert api.messages is not None
        return rt.model.tokenize(rt.template.render(api.messages), add_special=True, parse_special=True), ""
    if api.prompt_tokens is not None:
        return api.prompt_tokens, (rt.model.detokenize(api.prompt_tokens) if api.echo else "")
    assert api.prompt_text is not None
    return (rt.model.tokenize(api.prompt_text, add_special=True, parse_special=True),
            api.prompt_text if api.echo else "")


class _EventQueue:
    """Engine thread -> event loop. `emit` is called on the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._q: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.finished = False

    def emit(self, ev: StreamEvent) -> None:
        self._loop.call_soon_threadsafe(self._q.put_nowait, ev)

    async def next_batch(self) -> list[StreamEvent]:
        """Wait for one event, then take whatever else already arrived (one write for many tokens)."""
        out = [await self._q.get()]
        while not self._q.empty():
            out.append(self._q.get_nowait())
        if out[-1].finish_reason is not None:
            self.finished = True
        return out


class _Timing:
    """Feeds one request's latencies and token counts into the metrics, and the auto policy."""

    def __init__(self, m: EdgeMetrics, t0: float, auto: AutoMode | None = None) -> None:
        self.m, self.t0, self.last, self.first = m, t0, None, None
        self.auto = auto
        self.decision: Any = None  # the auto policy's Decision when the request asked for `auto`
        self.n = 0

    def token(self, ev: StreamEvent) -> None:
        if self.last is None:
            self.m.ttft.observe(ev.at - self.t0)
            self.first = ev.at
        else:
            self.m.itl.observe(ev.at - self.last)
        self.last = ev.at
        self.n += 1
        if ev.choice is not None:
            self.m.tokens.labels(ev.choice.origin).inc()

    def finish(self, ev: StreamEvent, requested_mode: str) -> None:
        self.m.duration.observe(ev.at - self.t0)
        self.m.finished.labels(ev.finish_reason or "unknown").inc()
        if ev.stats is not None and ev.stats.fallback is not None:
            self.m.fallbacks.labels(requested_mode).inc()
        if ev.stats is not None:
            self.m.observe_cloud_bytes(ev.stats.bytes_up, ev.stats.bytes_down, len(ev.stats.fallbacks),
                                       sum(f.get("rejoined_at_token") is not None for f in ev.stats.fallbacks))
        if self.auto is None or ev.stats is None:
            return
        decode_s = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        if ev.stats.mode == "edge" and ev.stats.fallback is None:
            self.auto.observe_edge_speed(self.n, decode_s)
        if self.decision is not None:
            ev.stats.auto = self.decision.to_fogline()
            try:
                self.auto.finish(self.decision, ev.stats, self.n, decode_s)
            except Exception:  # learning must never fail a response
                log.exception("auto policy update failed")


async def _collect(rt: EdgeRuntime, api: ApiRequest, builder: ResponseBuilder, events: _EventQueue,
                   timing: _Timing, echo_text: str) -> web.Response:
    while True:
        for ev in await events.next_batch():
            if ev.choice is not None:
                timing.token(ev)
                builder.add(ev, rt.model.is_eog(ev.choice.token))
            elif ev.text:
                builder.add(ev, False)
            if ev.finish_reason is not None:
                timing.finish(ev, api.mode)
                err = finish_error(ev)
                if err is not None:
                    raise err
                return web.json_response(builder.final(ev, echo_text))


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(request: web.Request, rt: EdgeRuntime, api: ApiRequest, builder: ResponseBuilder,
                  events: _EventQueue, timing: _Timing) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    if api.kind == "chat":
        await resp.write(_sse(builder.role_chunk()))
    while True:
        out: list[bytes] = []
        final: StreamEvent | None = None
        for ev in await events.next_batch():
            frag = None
            if ev.choice is not None:
                timing.token(ev)
                frag = builder.add(ev, rt.model.is_eog(ev.choice.token))
            if ev.finish_reason is not None:
                final = ev
                if ev.text:
                    builder.add(ev, False)
                    out.append(_sse(builder.chunk(ev.text, None)))
                break
            if ev.text or frag is not None:
                out.append(_sse(builder.chunk(ev.text, frag)))
        if final is not None:
            timing.finish(final, api.mode)
            err = finish_error(final)
            if err is not None:
                out.append(_sse(error_body(err)))
            else:
                out.append(_sse(builder.chunk("", None, final.finish_reason, final.stats)))
                if api.include_usage:
                    out.append(_sse(builder.usage_chunk(final)))
            out.append(b"data: [DONE]\n\n")
            await resp.write(b"".join(out))
            await resp.write_eof()
            return resp
        if out:
            await resp.write(b"".join(out))  # raises if the client is gone -> the request is cancelled


async def ollama_chat(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, parse_ollama_chat)


async def ollama_generate(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, parse_ollama_generate)


def _ndjson(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _ollama(request: web.Request, parse: Callable[..., OllamaRequest]) -> web.StreamResponse:
    """/api/chat and /api/generate: NDJSON lines while streaming (Ollama's default), else one object."""
    t0 = time.monotonic()
    rt = _ready(request)
    req = parse(await _json_body(request), default_mode=request.app[CONFIG].default_mode)
    builder = OllamaBuilder(req.kind, ollama_name(rt.model_name), t0)
    if req.api is None:  # no prompt: Ollama's way to ask for the model to be loaded (it is)
        _check_model(request, rt, req.model)
        return web.json_response(builder.load())
    async with _submitted(request, rt, req.api, t0) as gen:
        resp = None
        if req.stream:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
            await resp.prepare(request)
        origin = None
        while True:
            lines = []
            for ev in await gen.events.next_batch():
                if ev.choice is not None:
                    gen.timing.token(ev)
                    origin = ev.choice.origin
                if ev.text:
                    lines.append(builder.chunk(ev.text, origin))
                if ev.finish_reason is None:
                    continue
                gen.timing.finish(ev, req.api.mode)
                err = finish_error(ev)
                final = builder.final(ev, gen.timing.first, gen.timing.last, whole=resp is None)
                if resp is None:
                    if err is not None:
                        raise err
                    return web.json_response(final)
                lines.append(error_body(err, "ollama") if err is not None else final)
                await resp.write(b"".join(map(_ndjson, lines)))
                await resp.write_eof()
                return resp
            if resp is not None and lines:
                await resp.write(b"".join(map(_ndjson, lines)))  # raises if the client is gone -> cancelled


def _served(request: web.Request, rt: EdgeRuntime) -> ServedModel:
    m, gguf = rt.manifest, rt.model.path
    st = gguf.stat()
    digest = next((sha for rel, sha in m.files.items() if rel.endswith(".gguf")), "")
    info = {"general.architecture": m.architecture, f"{m.architecture}.block_count": m.n_layers,
            f"{m.architecture}.embedding_length": m.hidden_size, f"{m.architecture}.vocab_size": m.vocab_size,
            f"{m.architecture}.context_length": request.app[CONFIG].ctx_size, "fogline.split": m.split,
            "fogline.edge_blocks": rt.model.n_layer, "fogline.fingerprint": m.fingerprint}
    return ServedModel(name=ollama_name(rt.model_name), architecture=m.architecture, quant=m.quant,
                       size_label=rt.model.meta("general.size_label"), gguf=str(gguf), size=st.st_size,
                       digest=digest, modified=st.st_mtime, template=rt.template.source, info=info)


async def ollama_tags(request: web.Request) -> web.Response:
    rt = _ready(request)
    return web.json_response({"models": [_served(request, rt).tag()]})


async def ollama_show(request: web.Request) -> web.Response:
    rt = _ready(request)
    body = await _json_body(request)
    name = body.get("model", body.get("name")) if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise invalid("'model' is required and must be a string", "model")
    _check_model(request, rt, name)
    return web.json_response(_served(request, rt).show())


async def ollama_version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION, "fogline": __version__})


async def chat_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": "default-src 'self'",
                                                             "Cache-Control": "no-cache"})


async def list_models(request: web.Request) -> web.Response:
    rt = _ready(request)
    return web.json_response(models_list(rt.model_name, int(request.app[RUNTIME].started)))


async def health(request: web.Request) -> web.Response:
    slot, cfg = request.app[RUNTIME], request.app[CONFIG]
    body: dict[str, Any] = {"status": "loading", "parallel": cfg.parallel, "capture_hidden": cfg.capture_hidden,
                            "default_mode": cfg.default_mode,
                            "cloud": {"configured": False, "connected": False}}
    if slot.bridge is not None:
        body["cloud"] = slot.bridge.state()
    snap = request.app[DEVICE].latest
    body["device"] = None if snap is None else snap.to_health(cfg.hot_c)
    status = 503
    if slot.error is not None:
        body.update(status="error", error=slot.error)
    elif slot.runtime is not None:
        rt = slot.runtime
        body.update(model=rt.model_name, split=rt.manifest.split, fingerprint=rt.manifest.fingerprint,
                    running=rt.engine.n_running, waiting=rt.engine.n_waiting, steps=rt.engine.steps)
        if rt.engine.dead is not None:
            body.update(status="error", error=f"engine died: {rt.engine.dead}")
        else:
            body["status"] = "ok"
            status = 200
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})
