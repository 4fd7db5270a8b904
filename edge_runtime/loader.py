"""Edge bundle -> a running engine: verify, load the GGUF, size the context, start the loop.

The manifest says what the bundle is (split K, files and their hashes); nothing
is inferred from file names except which listed file is the GGUF. A bundle that
does not match its manifest is refused before llama.cpp sees it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.chat import ChatTemplate
from edge_runtime.config import EdgeConfig
from edge_runtime.engine import Engine
from edge_runtime.llama_backend import LlamaContext, LlamaModel
from fogline.errors import BundleError, ConfigError
from fogline.manifest import Manifest, load_manifest, verify_files
from fogline.prompt_lookup import PromptLookup

log = logging.getLogger("fogline.edge")


@dataclass
class EdgeRuntime:
    """Everything the daemon holds for its lifetime; `close()` releases it in order."""

    manifest: Manifest
    model: LlamaModel
    ctx: LlamaContext
    engine: Engine
    template: ChatTemplate
    model_name: str

    def close(self) -> None:
        self.engine.stop()
        self.ctx.close()
        self.model.close()


def open_bundle(directory: str | Path, verify: bool = True) -> tuple[Manifest, Path]:
    """Read an edge bundle's manifest (and check its file hashes); return it and its GGUF path."""
    directory = Path(directory)
    manifest = load_manifest(directory, role="edge")
    if verify:
        problems = verify_files(directory, manifest)
        if problems:
            raise BundleError(f"{directory} does not match its manifest: {'; '.join(problems)}")
    ggufs = [rel for rel in manifest.files if rel.endswith(".gguf")]
    if len(ggufs) != 1:
        raise BundleError(f"{directory}/manifest.json lists {len(ggufs)} GGUF files, expected exactly 1")
    return manifest, directory / ggufs[0]


def load_runtime(cfg: EdgeConfig) -> EdgeRuntime:
    """Blocking (seconds): meant to run in an executor while /health answers 503."""
    manifest, gguf = open_bundle(cfg.bundle, verify=cfg.verify_bundle)
    model = LlamaModel(gguf)
    try:
        if model.n_layer < manifest.split:
            raise BundleError(f"{gguf} has {model.n_layer} blocks but the manifest says K={manifest.split}")
        if cfg.ctx_size > model.n_ctx_train:
            raise ConfigError(f"ctx_size: must be <= the model's training context {model.n_ctx_train} "
                              f"(got {cfg.ctx_size})")
        # One KV stream of ctx_size cells per sequence: a request's cells always hold its
        # positions in order, so its tokens are bit-identical to decoding it alone.
        ctx = LlamaContext(model, n_ctx=cfg.parallel * cfg.ctx_size, n_batch=cfg.batch_size,
                           n_seq=cfg.parallel, n_threads=cfg.effective_threads(),
                           tap_layer=manifest.split - 1 if cfg.capture_hidden or cfg.cloud_url else None,
                           kv_unified=False, hidden_via="auto")
        if ctx.n_ctx < cfg.parallel * cfg.ctx_size:
            ctx.close()
            raise ConfigError(f"ctx_size: llama.cpp gave {ctx.n_ctx} KV cells for {cfg.parallel} x {cfg.ctx_size}")
    except BaseException:
        model.close()
        raise
    engine = Engine(model, ctx, parallel=cfg.parallel, ctx_size=cfg.ctx_size, batch_size=cfg.batch_size,
                    queue_size=cfg.queue_size, retry_after_s=cfg.retry_after_s)
    engine.lookup = prompt_lookup(cfg, manifest)
    template = ChatTemplate(model.chat_template(), _special(model, model.bos), _special(model, model.eos))
    engine.start()
    name = cfg.served_model_name(manifest.split)
    log.info("loaded %s: K=%d, %d blocks, vocab %d, n_ctx %d (%d x %d), threads %d, capture_hidden %s",
             gguf, manifest.split, model.n_layer, model.n_vocab, ctx.n_ctx, cfg.parallel, cfg.ctx_size,
             cfg.effective_threads(), cfg.capture_hidden)
    return EdgeRuntime(manifest=manifest, model=model, ctx=ctx, engine=engine, template=template, model_name=name)


def prompt_lookup(cfg: EdgeConfig, manifest: Manifest) -> PromptLookup | None:
    """The bundle's fitted prompt-lookup mixture, unless config turns it off. A bundle without
    one (exported before it existed) runs the exit head alone, and says so."""
    entry = (manifest.calibration or {}).get("prompt_lookup")
    lookup = PromptLookup.from_manifest(entry)
    if not cfg.prompt_lookup:
        log.info("prompt lookup off (config prompt_lookup = false): greedy tokens from the exit head alone")
        return None
    if lookup is None:
        if entry is not None:
            log.error("bundle calibration.prompt_lookup is malformed (%r): greedy tokens from the exit head "
                      "alone; re-export the bundle", entry)
        else:
            log.warning("bundle has no calibration.prompt_lookup (exported before fogline had it): greedy tokens "
                        "from the exit head alone; re-export to get it")
        return None
    log.info("prompt lookup on: λ by match length %s", list(lookup.lambdas))
    return lookup


def _special(model: LlamaModel, token: int) -> str:
    return model.token_bytes(token, special=True).decode("utf-8", errors="replace") if token >= 0 else ""
