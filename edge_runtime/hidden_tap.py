"""Read the residual stream after layer K (h_K) out of llama.cpp's compute graph.

`llama_get_embeddings` is taken after the final norm, so it is not h_K. Instead
we install llama.cpp's eval callback (`cb_eval`): in the "ask" phase the
scheduler asks, node by node, whether we want to observe a tensor; we say yes
only for `l_out-{K-1}` so the graph is split exactly once, and in the second
phase copy that tensor to host memory with `ggml_backend_tensor_get` from
libggml-base.

This is a contract with a specific llama.cpp version (the graph names its
per-layer residual output `l_out-<il>`, F32, [n_embd, n_tokens]); it is pinned
in pyproject.toml and guarded by tests/test_hidden_contract.py.

Caveat the caller must honour: llama.cpp drops the rows of non-output tokens in
the model's *last* layer. When layer K-1 is the last layer of the GGUF (no exit
adapter), every token whose h_K is needed must be marked as an output.
"""

from __future__ import annotations

import ctypes
import pathlib
from typing import Any

import numpy as np

from fogline.errors import HiddenStateContractError

GGML_TYPE_F32 = 0
GGML_MAX_DIMS = 4


class _GgmlTensorHead(ctypes.Structure):
    """The stable leading fields of `struct ggml_tensor` (ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ]


def _load_ggml_base() -> ctypes.CDLL:
    import llama_cpp  # the edge extra; loads libllama and its ggml libraries first
    from llama_cpp._ctypes_extensions import load_shared_library

    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    lib = load_shared_library("ggml-base", lib_dir)
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


_ggml_base: ctypes.CDLL | None = None


def ggml_base() -> ctypes.CDLL:
    global _ggml_base
    if _ggml_base is None:
        _ggml_base = _load_ggml_base()
    return _ggml_base


def layer_output_name(layer_index: int) -> str:
    """Graph name of the residual stream after block `layer_index` (0-based)."""
    return f"l_out-{layer_index}"


class HiddenStateTap:
    """An eval callback that captures one graph tensor per llama_decode.

    Install `tap.callback` as `llama_context_params.cb_eval` before creating the
    context. Call `begin()` before a decode you want h_K from and `take()` after;
    while not armed the callback declines every tensor, so the graph is not
    split and decoding runs at full speed.
    """

    def __init__(self, layer_index: int, n_embd: int) -> None:
        import llama_cpp

        self.layer_index = layer_index
        self.name = layer_output_name(layer_index).encode()
        self.n_embd = n_embd
        self._lib = ggml_base()
        self._get_name = self._lib.ggml_get_name
        self._tensor_get = self._lib.ggml_backend_tensor_get
        self._armed = False
        self._chunks: list[np.ndarray] = []
        self.chunk_rows: list[int] = []  # rows per micro-batch of the last take()
        self._seen = 0
        self._error: str | None = None
        # Keep a reference: ctypes callbacks are freed when garbage-collected.
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def begin(self) -> None:
        self._armed = True
        self._chunks = []
        self._seen = 0
        self._error = None

    def take(self) -> np.ndarray:
        """Rows of h_K captured since `begin()`, in batch order: [n_rows, n_embd] float32."""
        self._armed = False
        if self._error is not None:
            raise HiddenStateContractError(self._error)
        if self._seen == 0:
            raise HiddenStateContractError(
                f"llama.cpp never offered tensor {self.name.decode()!r} to the eval callback; "
                "the graph naming changed (pinned llama-cpp-python version?) or the layer does not exist")
        chunks, self._chunks = self._chunks, []
        self.chunk_rows = [c.shape[0] for c in chunks]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)

    def _on_eval(self, tensor: Any, ask: bool, _user_data: Any) -> bool:
        if not self._armed:
            return not ask  # decline observation, continue computing
        if self._get_name(tensor) != self.name:
            return not ask
        if ask:
            return True
        self._seen += 1
        head = ctypes.cast(tensor, ctypes.POINTER(_GgmlTensorHead)).contents
        ne0, ne1 = head.ne[0], head.ne[1]
        if head.type != GGML_TYPE_F32 or ne0 != self.n_embd or head.ne[2] != 1 or head.ne[3] != 1 \
                or head.nb[1] != ne0 * 4:
            # Never raise through C: record the problem for `take` to report.
            self._error = (f"tensor {self.name.decode()!r} is type {head.type} shape "
                           f"{list(head.ne)}, expected contiguous F32 [{self.n_embd}, n_tokens]")
            return True
        out = np.empty((ne1, ne0), dtype=np.float32)
        self._tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        self._chunks.append(out)
        return True


def _layer_input_functions() -> tuple[Any, Any] | None:
    """llama.cpp's per-layer input extraction (llama-ext.h, not in llama.h), if this build exports it."""
    from llama_cpp import llama_cpp as lib_mod

    lib = lib_mod._lib
    fns = []
    for names, args, res in (
            (("llama_set_embeddings_layer_inp", "_Z30llama_set_embeddings_layer_inpP13llama_contextjb"),
             [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool], None),
            (("llama_get_embeddings_layer_inp", "_Z30llama_get_embeddings_layer_inpP13llama_contextj"),
             [ctypes.c_void_p, ctypes.c_uint32], ctypes.POINTER(ctypes.c_float))):
        fn = next((getattr(lib, n) for n in names if hasattr(lib, n)), None)
        if fn is None:
            return None
        fn.argtypes, fn.restype = args, res
        fns.append(fn)
    return fns[0], fns[1]


def layer_input_supported() -> bool:
    return _layer_input_functions() is not None


class LayerInputTap:
    """h_K read as the *input* of block K (exactly what block K-1 wrote), copied out by llama.cpp.

    No Python runs per graph node and every batch row is kept, so capture costs
    one memcpy per decode. It needs a block after K-1 in the GGUF: true for an
    edge GGUF with an exit adapter, not for one whose last block is K-1.
    """

    def __init__(self, ctx_ptr: Any, layer_index: int, n_embd: int) -> None:
        fns = _layer_input_functions()
        if fns is None:
            raise HiddenStateContractError("this llama.cpp build has no llama_get_embeddings_layer_inp")
        self._set, self._get = fns
        self.layer_index = layer_index
        self.block = layer_index + 1  # h_K is the input of the block after the tapped one
        self.n_embd = n_embd
        self._ctx = ctx_ptr
        self._set(ctx_ptr, self.block, True)

    def read(self, n_rows: int) -> np.ndarray:
        """h_K of the last decode's rows, in batch order: [n_rows, n_embd] float32."""
        ptr = self._get(self._ctx, self.block)
        if not ptr:
            raise HiddenStateContractError(f"llama.cpp extracted no input for block {self.block}")
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_embd)).copy()
