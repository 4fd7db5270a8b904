"""`fogline edge serve`: flags -> EdgeConfig -> the aiohttp daemon, until SIGINT/SIGTERM.

The bundle is checked against its manifest before the server listens (a bad
bundle is a startup error, exit code 2); the model itself then loads in the
background while /health answers 503.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from edge_runtime.config import LOG_LEVELS, MODES, EdgeConfig, load_config

log = logging.getLogger("fogline.edge")

# flag -> config field; each flag overrides TOML and FOGLINE_EDGE_* when given
_FLAGS: dict[str, str] = {
    "bundle": "bundle", "host": "host", "port": "port", "threads": "threads", "parallel": "parallel",
    "ctx_size": "ctx_size", "batch_size": "batch_size", "queue_size": "queue_size", "api_key": "api_key",
    "model_name": "model_name", "strict_model_name": "strict_model_name", "mode": "default_mode",
    "capture_hidden": "capture_hidden", "verify_bundle": "verify_bundle", "log_level": "log_level",
    "cloud_url": "cloud_url", "cloud_token": "cloud_token", "cloud_codec": "cloud_codec",
    "cloud_deadline_ms": "cloud_deadline_ms", "tau": "tau", "spec_gamma": "spec_gamma", "spec_stop": "spec_stop",
    "prompt_lookup": "prompt_lookup",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="edge bundle directory (export output's edge/)")
    p.add_argument("--config", help="TOML file with EdgeConfig keys (flat or under [edge])")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8080; 0 picks a free one)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: physical cores)")
    p.add_argument("--parallel", type=int, help="sequences decoded together (default 4)")
    p.add_argument("--ctx-size", type=int, help="tokens per request, prompt + completion (default 2048)")
    p.add_argument("--batch-size", type=int, help="most tokens per decode step (default 512)")
    p.add_argument("--queue-size", type=int, help="requests that may wait for a sequence before 429 (default 32)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer <key>' on /v1/* and /api/*")
    p.add_argument("--model-name", help="model id to serve (default fogline-edge-k<K>)")
    p.add_argument("--strict-model-name", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse requests that name another model (default off: any name means the served one)")
    p.add_argument("--mode", choices=MODES, help="default mode for requests that name none (default edge)")
    p.add_argument("--capture-hidden", action=argparse.BooleanOptionalAction, default=None,
                   help="keep h_K of every position for a later cloud upload (default off)")
    p.add_argument("--verify-bundle", action=argparse.BooleanOptionalAction, default=None,
                   help="re-hash the bundle's files against its manifest at startup (default on)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    g = p.add_argument_group("cloud (collab / spec / cloud modes)")
    g.add_argument("--cloud-url", help="websocket URL of `fogline cloud serve`, e.g. ws://cloud:8700/ws (default: none)")
    g.add_argument("--cloud-token", help="bearer token the cloud expects in the handshake")
    g.add_argument("--cloud-codec", choices=("fp16", "int8", "fp32"), help="h_K wire codec (default fp16)")
    g.add_argument("--cloud-deadline-ms", type=int,
                   help="a cloud answer slower than this finishes the request in edge mode (default 5000; 0: none)")
    g.add_argument("--tau", type=float,
                   help="collab confidence threshold when neither the request nor the bundle gives one (default 0.9)")
    g.add_argument("--spec-gamma", type=int, help="spec mode: initial draft block length (default 4)")
    g.add_argument("--spec-stop", type=float,
                   help="spec mode: draft only while the edge's confidence is at least this (default 0.5; 0: always)")
    p.add_argument("--prompt-lookup", action=argparse.BooleanOptionalAction, default=None,
                   help="greedy decoding mixes the exit head with a copy of the context, weights from the "
                        "bundle's calibration (default on)")


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    overrides = {field: getattr(args, flag, None) for flag, field in _FLAGS.items()}
    return load_config(getattr(args, "config", None), overrides=overrides)


def main(args: argparse.Namespace) -> int:
    # INFO until the config says otherwise: what loading the config itself reports is kept
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    logging.getLogger().setLevel(cfg.log_level.upper())
    log.info("effective config: %s", json.dumps(cfg.redacted(), sort_keys=True))
    from edge_runtime.loader import open_bundle

    open_bundle(cfg.bundle, verify=cfg.verify_bundle)  # refuse a bad bundle before listening
    return asyncio.run(_serve(cfg))


async def _serve(cfg: EdgeConfig) -> int:
    from aiohttp import web

    from edge_runtime.server import RUNTIME, create_app
    from fogline import sd_notify

    app = create_app(cfg)
    watchdog = None
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        for sock in getattr(site._server, "sockets", None) or ():  # the real port when port=0
            host, port = sock.getsockname()[:2]
            log.info("listening on http://%s:%d", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        slot = app[RUNTIME]
        assert slot.done is not None
        await slot.done
        if slot.error is not None:
            log.error("exiting: %s", slot.error)
            sd_notify.status(f"model failed to load: {slot.error}")
            return 2
        rt = slot.runtime
        assert rt is not None
        # systemd (Type=notify): started once the model is loaded; the watchdog is fed while the
        # engine is alive and, when it has work, makes steps (a wedged llama.cpp decode stops it)
        sd_notify.ready(f"serving {rt.model_name} on {cfg.host}:{cfg.port}")
        progress = sd_notify.ProgressWatch(progress=lambda: rt.engine.steps,
                                           busy=lambda: rt.engine.n_running + rt.engine.n_waiting > 0)
        watchdog = sd_notify.start_watchdog(lambda: rt.engine.dead is None and progress())
        await stop.wait()
        log.info("shutting down")
        return 0
    finally:
        if watchdog is not None:
            watchdog.cancel()
        sd_notify.stopping("shutting down")
        await runner.cleanup()
