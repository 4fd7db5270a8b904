"""The whole model at the cloud: the `cloud-only` baseline (text up, tokens streamed down).

    python -m cloud_runtime.full_model --source demo --port 8701 [--threads N] [--dtype float32]

The deployment CE-CoLLM compares against: the edge does nothing but tokenise; the cloud runs
ALL layers — token embedding, layers [0, L), final norm, LM head — built from the source
weights with `cloud_runtime.deep_model` (`split=0`), with its own per-request KV cache.

    GET /v1/generate  websocket. The client sends one JSON text message
                        {"prompt": [ids], "max_tokens": n, "stop": [ids],
                         "temperature": t, "top_p": p, "top_k": k, "seed": s}
                      and receives one JSON text message per token {"token": id}, then
                      {"done": true, "tokens": n, "prompt_tokens": m}; or {"error": "..."}.
                      A connection may carry several requests, one after another.
    GET /health       {"status": "ok", "model": ..., "layers": [0, L]}
    GET /metrics      fogline_full_positions_total (token-passes through all L layers),
                      fogline_full_requests_total

One request at a time runs the model (a single worker thread; the benchmark sends them
serially). Sampling reuses cloud_runtime.sampling.pick (same seeded rule as the deep
layers). No auth: a benchmark endpoint, bind it to localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from aiohttp import WSMsgType, web

from cloud_runtime.deep_model import DeepModel, Segment, load_deep_model
from cloud_runtime.sampling import pick
from fogline.wire.protocol import Sampling

log = logging.getLogger("fogline.cloud.full")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL: web.AppKey[DeepModel] = web.AppKey("model", DeepModel)
STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)


def build_full_model(source: str, dtype: str = "float32") -> tuple[DeepModel, str]:
    """Embedding + every layer + norm + head from the source weights (blocking)."""
    from quantize.source import load_source

    src = load_source(source)
    try:
        return load_deep_model(src.spec, 0, src.state, dtype=DTYPES[dtype]), src.description
    finally:
        src.close()


def generate(model: DeepModel, prompt: list[int], max_tokens: int, stop: set[int], sampling: Sampling,
             emit: Any) -> int:
    """Prefill + decode with one KV cache; emit(token) after each step. Returns tokens made."""
    cache = model.new_cache(len(prompt) + max_tokens)
    ids = torch.tensor(prompt, dtype=torch.long)
    pos, n = 0, 0
    with torch.inference_mode():
        while n < max_tokens:
            h = model.embed(ids.to(model.device))
            normed = model.forward_ragged([Segment(h, cache, pos)])
            pos += len(ids)
            tok = pick(model.logits(normed[-1:])[0], sampling, pos)
            n += 1
            emit(tok)
            if tok in stop:
                break
            ids = torch.tensor([tok], dtype=torch.long)
    return n


async def ws_generate(request: web.Request) -> web.WebSocketResponse:
    model, state = request.app[MODEL], request.app[STATE]
    ws = web.WebSocketResponse(max_msg_size=16 << 20, compress=False)
    await ws.prepare(request)
    loop = asyncio.get_running_loop()
    async for m in ws:
        if m.type != WSMsgType.TEXT:
            break
        try:
            req = json.loads(m.data)
            prompt = [int(t) for t in req["prompt"]]
            max_tokens = int(req.get("max_tokens", 16))
            if not prompt or max_tokens < 1:
                raise ValueError("need a non-empty prompt and max_tokens >= 1")
            sampling = Sampling(temperature=float(req.get("temperature", 0.0)), top_p=float(req.get("top_p", 1.0)),
                                top_k=int(req.get("top_k", 0)), seed=req.get("seed"))
            stop = {int(t) for t in req.get("stop", ())}
        except (ValueError, KeyError, TypeError) as e:
            await ws.send_str(json.dumps({"error": f"bad request: {e}"}))
            continue
        q: asyncio.Queue[int | None] = asyncio.Queue()

        def emit(tok: int) -> None:
            loop.call_soon_threadsafe(q.put_nowait, tok)

        def run() -> int:
            try:
                return generate(model, prompt, max_tokens, stop, sampling, emit)
            finally:
                loop.call_soon_threadsafe(q.put_nowait, None)

        fut = loop.run_in_executor(state["pool"], run)
        while (tok := await q.get()) is not None:
            await ws.send_str(json.dumps({"token": tok}))
        try:
            n = await fut
        except Exception as e:  # a model error answers this request only
            log.exception("generation failed")
            await ws.send_str(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            continue
        state["positions"] += len(prompt) + n - 1
        state["requests"] += 1
        await ws.send_str(json.dumps({"done": True, "tokens": n, "prompt_tokens": len(prompt)}))
    return ws


async def health(request: web.Request) -> web.Response:
    model = request.app[MODEL]
    return web.json_response({"status": "ok", "model": request.app[STATE]["description"],
                              "layers": [0, model.spec.n_layers]})


async def metrics(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.Response(text=f"fogline_full_positions_total {s['positions']}\n"
                             f"fogline_full_requests_total {s['requests']}\n", content_type="text/plain")


def create_app(model: DeepModel, description: str = "") -> web.Application:
    app = web.Application()
    app[MODEL] = model
    app[STATE] = {"pool": ThreadPoolExecutor(1, thread_name_prefix="fogline-full"), "positions": 0, "requests": 0,
                  "description": description}
    app.router.add_get("/v1/generate", ws_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def stop_pool(app: web.Application) -> None:
        app[STATE]["pool"].shutdown(wait=False)

    app.on_cleanup.append(stop_pool)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the whole model at the cloud (cloud-only baseline)")
    ap.add_argument("--source", default="demo", help="HF directory, .gguf file or 'demo' (as fogline export)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8701)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, desc = build_full_model(args.source, args.dtype)
    log.info("whole model loaded: %s, %d layers, %s", desc, model.spec.n_layers, model.dtype)
    web.run_app(create_app(model, desc), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
