"""A thin, typed layer over llama.cpp's C API (through llama-cpp-python's ctypes).

The high-level `llama_cpp.Llama` class cannot install an eval callback nor run
several sequences in one batch, so the edge talks to the C API directly. This
module owns every ctypes detail; the engine above it sees numpy arrays.

Every llama.cpp model fogline loads (edge daemon, export, benchmarks, tests)
gets its params from `model_params()`, which applies the host decision of
`fogline.host` (the AMX guard) once per process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.hidden_tap import HiddenStateTap, LayerInputTap, layer_input_supported
from fogline.errors import BundleError, FoglineError, HiddenStateContractError
from fogline.host import LoadDecision, decide_load

log = logging.getLogger("fogline.edge.llama")
_backend_lock = threading.Lock()
_decision: LoadDecision | None = None  # set once, by the first _init_backend()


def _init_backend() -> LoadDecision:
    """Initialise llama.cpp once per process and decide its model params for this host."""
    global _decision
    with _backend_lock:
        if _decision is not None:
            return _decision
        import llama_cpp
        import llama_cpp._logger as llama_logger

        llama_logger.set_verbose(os.environ.get("FOGLINE_LLAMA_VERBOSE") == "1")
        llama_cpp.llama_backend_init()
        decision = decide_load(system_info(), os.environ)
        if decision.guarded:
            log.warning("llama.cpp: %s", decision.reason)
        elif decision.overridden:
            log.info("llama.cpp: %s", decision.reason)
        _decision = decision
        return decision


def system_info() -> str:
    """llama.cpp's compile-time feature list ("CPU : SSE3 = 1 | ... | REPACK = 1 |")."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def load_decision() -> LoadDecision:
    """The host decision every load in this process uses (initialises llama.cpp)."""
    return _init_backend()


def model_params(n_gpu_layers: int = 0) -> Any:
    """llama_model_params for one load: llama.cpp's defaults plus the host decision."""
    decision = _init_backend()
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_extra_bufts = decision.use_extra_bufts
    return params


@contextlib.contextmanager
def host_params_for_llama_class() -> Iterator[LoadDecision]:
    """Give `llama_cpp.Llama(...)` (the benchmark baseline) the same host decision.

    Llama.__init__ of 0.3.36 takes no use_extra_bufts (unknown keywords are
    dropped) and fills its params from `llama_model_default_params()`; inside
    this block that function returns params with the decision applied.
    Construct the Llama inside the block; it keeps the params it loaded with.
    """
    decision = _init_backend()
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def with_decision() -> Any:
        params = original()
        params.use_extra_bufts = decision.use_extra_bufts
        return params

    lib.llama_model_default_params = with_decision
    try:
        yield decision
    finally:
        lib.llama_model_default_params = original


class DecodeError(FoglineError):
    """llama_decode failed (no KV slot, or an internal error)."""

    code = "decode"
    recoverable = True


class LlamaModel:
    """One GGUF file loaded once; contexts are created from it."""

    def __init__(self, path: str | os.PathLike[str], n_gpu_layers: int = 0) -> None:
        params = model_params(n_gpu_layers)
        import llama_cpp

        self._llama = llama_cpp
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"GGUF file {self.path} does not exist")
        self.use_extra_bufts: bool = params.use_extra_bufts
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise BundleError(f"llama.cpp could not load {self.path} (corrupt or unsupported GGUF)")
        self.ptr = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_embd: int = llama_cpp.llama_model_n_embd(model)
        self.n_layer: int = llama_cpp.llama_model_n_layer(model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(model)
        self.eos: int = llama_cpp.llama_vocab_eos(self.vocab)
        self.bos: int = llama_cpp.llama_vocab_bos(self.vocab)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        tmpl = self._llama.llama_model_chat_template(self.ptr, None)
        return tmpl.decode("utf-8") if tmpl else None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self._llama.llama_token * cap)()
        n = self._llama.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self._llama.llama_token * cap)()
            n = self._llama.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._llama.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class DecodeResult:
    """What one llama_decode produced.

    logits: [n_outputs, n_vocab] for the batch rows marked as outputs, in batch order.
    hidden: [n_tokens, n_embd] h_K of every batch row, or None when not captured.
    """

    logits: np.ndarray
    hidden: np.ndarray | None


@dataclass
class BatchRow:
    token: int
    pos: int
    seq: int
    output: bool


class LlamaContext:
    """A llama.cpp context with up to `n_seq` independent KV sequences.

    If `tap_layer` is given, h_K (the residual stream after that block) can be
    captured on any decode with `capture_hidden=True`. `hidden_via` picks how:
    "callback" (the eval-callback tap: works for any block, costs a Python call
    per graph node while installed), "layer_input" (llama.cpp copies the next
    block's input out natively; needs a block after the tapped one), or "auto"
    (layer_input when possible).
    """

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_batch: int = 512, n_seq: int = 1,
                 n_threads: int | None = None, tap_layer: int | None = None,
                 kv_unified: bool = False, hidden_via: str = "callback") -> None:
        # kv_unified=False (llama.cpp's default) gives every sequence its own KV stream: a
        # sequence's cells then always hold positions 0..n in order, so its results do not
        # depend on what else shares the batch. llama.cpp then splits a mixed batch into
        # micro-batches by sequence (see `ubatch_order`).
        llama_cpp = model._llama
        self._llama = llama_cpp
        self.model = model
        threads = n_threads or max(1, os.cpu_count() or 1)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch  # one ubatch per decode keeps h_K rows in one chunk
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        params.kv_unified = kv_unified
        self.tap: HiddenStateTap | None = None
        self.layer_tap: LayerInputTap | None = None
        native = False
        if tap_layer is not None:
            if not 0 <= tap_layer < model.n_layer:
                raise BundleError(f"tap layer {tap_layer} outside the GGUF's {model.n_layer} blocks")
            if hidden_via not in ("auto", "callback", "layer_input"):
                raise ValueError(f"hidden_via={hidden_via!r}")
            has_next = tap_layer + 1 < model.n_layer
            if hidden_via == "layer_input" and not has_next:
                raise BundleError(f"block {tap_layer} is the GGUF's last: its output is no block's input")
            native = has_next and (hidden_via == "layer_input" or (hidden_via == "auto" and layer_input_supported()))
            if not native:
                self.tap = HiddenStateTap(tap_layer, model.n_embd)
                params.cb_eval = self.tap.callback
                params.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise BundleError("llama.cpp could not create a context (out of memory?)")
        self.ptr = ctx
        if native:
            assert tap_layer is not None
            self.layer_tap = LayerInputTap(ctx, tap_layer, model.n_embd)
        self.can_capture = tap_layer is not None
        self.n_ctx: int = llama_cpp.llama_n_ctx(ctx)
        self.n_batch = n_batch
        self.n_seq = n_seq
        self.kv_unified = kv_unified
        self.memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # If the tapped block is the GGUF's last, llama.cpp keeps only output rows there.
        self.tap_needs_all_outputs = self.tap is not None and tap_layer == model.n_layer - 1

    def decode(self, rows: list[BatchRow], capture_hidden: bool = False) -> DecodeResult:
        """Run one batch; rows may belong to different sequences."""
        n = len(rows)
        if not 0 < n <= self.n_batch:
            raise DecodeError(f"batch of {n} rows; must be 1..{self.n_batch}")
        capture = capture_hidden and self.can_capture
        force_all = capture and self.tap_needs_all_outputs
        b = self._batch
        n_out = 0
        out_index = []
        for i, r in enumerate(rows):
            b.token[i] = r.token
            b.pos[i] = r.pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = r.seq
            is_out = r.output or force_all
            b.logits[i] = is_out
            if is_out:
                if r.output:
                    out_index.append(n_out)
                n_out += 1
        b.n_tokens = n
        if capture and self.tap is not None:
            self.tap.begin()
        rc = self._llama.llama_decode(self.ptr, b)
        hidden = None
        if capture:
            hidden = self.tap.take() if self.tap is not None else self.layer_tap.read(n)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc} (KV cache full or batch invalid)")
        if hidden is not None and self.tap is not None and not self.kv_unified and self.n_seq > 1:
            hidden = self._to_batch_order(rows, hidden)  # (the layer-input copy is already in batch order)
        if n_out:
            ptr = self._llama.llama_get_logits(self.ptr)
            all_logits = np.ctypeslib.as_array(ptr, shape=(n_out, self.model.n_vocab))
            logits = all_logits[out_index] if force_all else all_logits.copy()
        else:
            logits = np.empty((0, self.model.n_vocab), dtype=np.float32)
        if hidden is not None and hidden.shape[0] != n:
            raise DecodeError(f"captured {hidden.shape[0]} rows of h_K for a batch of {n}")
        return DecodeResult(logits=logits, hidden=hidden)

    def _to_batch_order(self, rows: list[BatchRow], hidden: np.ndarray) -> np.ndarray:
        """The tap sees rows micro-batch by micro-batch; put them back in batch order."""
        order, sizes = ubatch_order(rows, self.n_batch)
        assert self.tap is not None
        if self.tap.chunk_rows != sizes:
            raise HiddenStateContractError(
                f"llama.cpp split a batch into micro-batches of {self.tap.chunk_rows} rows, expected {sizes}; "
                "the pinned llama.cpp's batch splitting changed")
        if order == list(range(len(rows))):
            return hidden
        out = np.empty_like(hidden)
        out[order] = hidden
        return out

    def remove(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        """Drop positions [p0, p1) of a sequence from the KV cache (p1=-1: to the end)."""
        self._llama.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        return int(self._llama.llama_memory_seq_pos_max(self.memory, seq))

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._llama.llama_batch_free(self._batch)
            self._llama.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def ubatch_order(rows: list[BatchRow], n_ubatch: int) -> tuple[list[int], list[int]]:
    """Batch indices in the order llama.cpp computes them with per-sequence KV streams.

    Mirrors `llama_batch_allocr::split_equal(n_ubatch, sequential=true)` of the
    pinned llama.cpp for batches whose rows each belong to one sequence: a
    micro-batch takes sequences with consecutive ids in batch order and the
    same number of tokens from each, grouped by sequence. Returns (order,
    micro-batch sizes); tests/test_edge_engine.py checks it against the tap.
    """
    by_seq: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_seq.setdefault(r.seq, []).append(i)
    used = [False] * len(rows)
    nxt = {s: 0 for s in by_seq}  # next unused index into by_seq[s]
    order: list[int] = []
    sizes: list[int] = []
    while len(order) < len(rows):
        seqs: list[int] = []
        for i, r in enumerate(rows):
            if used[i] or r.seq in seqs or (seqs and r.seq != seqs[-1] + 1):
                continue
            seqs.append(r.seq)
            if len(seqs) > n_ubatch:
                break
        per_seq: list[list[int]] = [[] for _ in seqs]
        while all(nxt[s] < len(by_seq[s]) for s in seqs):
            for k, s in enumerate(seqs):
                idx = by_seq[s][nxt[s]]
                per_seq[k].append(idx)
                used[idx] = True
                nxt[s] += 1
            if (len(per_seq[0]) + 1) * len(seqs) > n_ubatch:
                break
        chunk = [i for lst in per_seq for i in lst]
        order.extend(chunk)
        sizes.append(len(chunk))
    return order, sizes


def prefill(ctx: LlamaContext, tokens: list[int], seq: int = 0, start: int = 0,
            capture_hidden: bool = True, all_logits: bool = False) -> DecodeResult:
    """Decode a prompt in chunks of n_batch; returns logits (last or all) and h_K of every token."""
    logits_parts, hidden_parts = [], []
    for off in range(0, len(tokens), ctx.n_batch):
        chunk = tokens[off: off + ctx.n_batch]
        last = off + len(chunk) == len(tokens)
        rows = [BatchRow(t, start + off + i, seq, all_logits or (last and i == len(chunk) - 1))
                for i, t in enumerate(chunk)]
        res = ctx.decode(rows, capture_hidden=capture_hidden)
        logits_parts.append(res.logits)
        if res.hidden is not None:
            hidden_parts.append(res.hidden)
    logits = np.concatenate(logits_parts, axis=0)
    hidden = np.concatenate(hidden_parts, axis=0) if hidden_parts else None
    return DecodeResult(logits=logits, hidden=hidden)
