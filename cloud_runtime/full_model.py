"""The whole model at the cloud: the `cloud-only` baseline (text up, tokens streamed down).

    python -m cloud_runtime.full_model --source demo --port 8701 [--threads N] [--dtype float32]

The deployment CE-CoLLM compares against: the edge does nothing but tokenise; the cloud runs
ALL layers — token embedding, layers [0, L), final norm, LM head — built from the source
weights with `cloud_runtime.deep_model` (`split=0`). It is served by the same runtime as the
deep layers: each request is a session of a `SessionStore` (KV blocks from the same pool) and
every prefill/decode step goes through the same `Batcher` (steps carry token ids, embedded in
the model thread), so N concurrent cloud-only requests are batched exactly like N split
sessions and the capacity ratio measures the split, not the engineering.

    GET /v1/generate  websocket. The client sends one JSON text message
                        {"prompt": [ids], "max_tokens": n, "stop": [ids],
                         "temperature": t, "top_p": p, "top_k": k, "seed": s}
                      and receives one JSON text message per token {"token": id}, then
                      {"done": true, "tokens": n, "prompt_tokens": m}; or {"error": "..."}.
                      A connection may carry several requests, one after another.
    GET /health       {"status": "ok", "model": ..., "layers": [0, L]}
    GET /metrics      fogline_full_positions_total (token-passes through all L layers),
                      fogline_full_requests_total

Requests on any number of connections run concurrently (one model thread, batched passes);
one connection's requests run one after another. Sampling reuses cloud_runtime.sampling.pick
(same seeded rule as the deep layers). No auth: a benchmark endpoint, bind it to localhost.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from aiohttp import WSMsgType, web

from cloud_runtime.batcher import Batcher, Step
from cloud_runtime.deep_model import DeepModel, load_deep_model
from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.sampling import pick
from cloud_runtime.sessions import SessionStore
from fogline.wire.errors import ProtocolError
from fogline.wire.protocol import Sampling

log = logging.getLogger("fogline.cloud.full")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)
class FullRuntime:
    """The whole model with the deep layers' machinery: session store, batcher, metrics."""

    model: DeepModel
    store: SessionStore
    batcher: Batcher
    metrics: CloudMetrics
    description: str
    positions: int = 0  # token-passes through all L layers
    requests: int = 0
    ids: itertools.count[int] = field(default_factory=itertools.count)


RUNTIME: web.AppKey[FullRuntime] = web.AppKey("full_runtime", FullRuntime)


def build_full_model(source: str, dtype: str = "float32", device: str = "cpu") -> tuple[DeepModel, str]:
    """Embedding + every layer + norm + head from the source weights (blocking)."""
    from quantize.source import load_source

    src = load_source(source)
    try:
        return load_deep_model(src.spec, 0, src.state, dtype=DTYPES[dtype], device=device), src.description
    finally:
        src.close()


async def generate(rt: FullRuntime, prompt: list[int], max_tokens: int, stop: set[int], sampling: Sampling,
                   emit: Callable[[int], Awaitable[None]]) -> int:
    """Prefill + decode as one session of the store, every step through the batcher; await
    emit(token) after each step. Returns tokens made."""
    sid = f"full-{next(rt.ids)}"
    s = rt.store.open(sid)
    ids = np.asarray(prompt, dtype=np.int64)
    pos, n = 0, 0
    try:
        async with rt.store.use(s):
            while n < max_tokens:
                rt.store.reserve(s, pos + len(ids))
                nxt = pos + len(ids)  # the position the answer's token takes
                tok = await rt.batcher.submit(Step(s, pos, None, "last",
                                                   lambda lg, at=nxt: pick(lg[0], sampling, at), tokens=ids))
                rt.store.sync(s)
                pos = nxt
                n += 1
                await emit(tok)
                if tok in stop:
                    break
                ids = np.asarray([tok], dtype=np.int64)
    finally:
        rt.store.drop(sid, "finished")
    rt.positions += pos
    rt.requests += 1
    return n


async def ws_generate(request: web.Request) -> web.WebSocketResponse:
    rt = request.app[RUNTIME]
    ws = web.WebSocketResponse(max_msg_size=16 << 20, compress=False)
    await ws.prepare(request)
    async for m in ws:
        if m.type != WSMsgType.TEXT:
            break
        try:
            req = json.loads(m.data)
            prompt = [int(t) for t in req["prompt"]]
            max_tokens = int(req.get("max_tokens", 16))
            if not prompt or max_tokens < 1:
                raise ValueError("need a non-empty prompt and max_tokens >= 1")
            if any(not 0 <= t < rt.model.spec.vocab_size for t in prompt):
                raise ValueError(f"token ids must be in [0, {rt.model.spec.vocab_size})")
            sampling = Sampling(temperature=float(req.get("temperature", 0.0)), top_p=float(req.get("top_p", 1.0)),
                                top_k=int(req.get("top_k", 0)), seed=req.get("seed"))
            stop = {int(t) for t in req.get("stop", ())}
        except (ValueError, KeyError, TypeError) as e:
            await ws.send_str(json.dumps({"error": f"bad request: {e}"}))
            continue

        async def emit(tok: int) -> None:
            await ws.send_str(json.dumps({"token": tok}))

        try:
            n = await generate(rt, prompt, max_tokens, stop, sampling, emit)
        except ProtocolError as e:  # overloaded (queue or KV budget), shutting down, model failure
            await ws.send_str(json.dumps({"error": f"{e.code}: {e}"}))
            continue
        except (ConnectionError, RuntimeError) as e:  # the client went away mid-stream
            log.info("generation stopped: %s", e)
            break
        await ws.send_str(json.dumps({"done": True, "tokens": n, "prompt_tokens": len(prompt)}))
    return ws


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return web.json_response({"status": "ok", "model": rt.description, "layers": [0, rt.model.spec.n_layers],
                              "sessions": len(rt.store), "queued_steps": rt.batcher.queued})


async def metrics(request: web.Request) -> web.Response:
    """fogline_full_* totals, then the runtime's own fogline_cloud_* series (batching, KV, passes)."""
    rt = request.app[RUNTIME]
    text = (f"fogline_full_positions_total {rt.positions}\n"
            f"fogline_full_requests_total {rt.requests}\n") + rt.metrics.render().decode()
    return web.Response(text=text, content_type="text/plain")


def create_app(model: DeepModel, description: str = "", *, batch_window_ms: float = 2.0,
               max_batch_tokens: int = 4096, max_queue: int = 1024, kv_budget_bytes: int = 2 << 30) -> web.Application:
    """The app over a loaded whole model; the batcher and its model thread live with the app."""
    app = web.Application()

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fogline-full")
        metrics = CloudMetrics()
        model.kv_pool.reserve_bytes(min(kv_budget_bytes, 1 << 30))
        store = SessionStore(model.new_cache, kv_budget_bytes, ttl_s=3600.0, metrics=metrics)
        batcher = Batcher(model, metrics, window_s=batch_window_ms / 1000, max_tokens=max_batch_tokens,
                          max_queue=max_queue, executor=executor)
        app[RUNTIME] = FullRuntime(model, store, batcher, metrics, description)
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            executor.shutdown(wait=True)

    app.cleanup_ctx.append(runtime_ctx)
    app.router.add_get("/v1/generate", ws_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the whole model at the cloud (cloud-only baseline)")
    ap.add_argument("--source", default="demo", help="HF directory, .gguf file or 'demo' (as fogline export)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8701)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    ap.add_argument("--batch-window-ms", type=float, default=2.0, help="as `fogline cloud serve`")
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--kv-budget-bytes", type=int, default=2 << 30)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, desc = build_full_model(args.source, args.dtype, args.device)
    log.info("whole model loaded: %s, %d layers, %s on %s", desc, model.spec.n_layers, model.dtype, model.device)
    app = create_app(model, desc, batch_window_ms=args.batch_window_ms, max_batch_tokens=args.max_batch_tokens,
                     kv_budget_bytes=args.kv_budget_bytes)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
