"""Structured output: one grammar engine (llguidance) that turns a response_format into token masks.

Why one engine, on the edge only: the mask of a position is a function of the grammar and
the tokens before it, and the edge is the one place that knows every token of a request in
every mode (it drafts, it feeds the cloud's tokens back through layers [0, K)). So the edge
runs the matcher and ships the mask of each position the cloud decides on (`mask` on
`infer`, `masks` on `verify`: a zlib-compressed bitmask, one bit per token). The cloud then
applies exactly the mask the edge applied: edge drafts, the cloud's choice and the cloud's
judgement of each drafted prefix all see the same allowed set, which keeps spec identical to
cloud under a schema, with no second matcher to keep in step across replays, truncations
and reconnects.

Bitmask layout (llguidance's): little-endian uint32 words, token t is bit t % 32 of word
t // 32; read as bytes with `np.unpackbits(..., bitorder="little")` it is one bit per token
in token order. Torch-free and llama.cpp-free at import (the edge builds its tokenizer from
the GGUF's vocab with `tokenizer_from_llama`).
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# Compact JSON: the fewest tokens for a small model, and what a parser reads all the same.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
MAX_SCHEMA_CHARS = 64 * 1024


class ConstraintError(ValueError):
    """The response_format cannot be enforced (malformed, or a schema feature the engine lacks)."""


def schema_of(response_format: Any) -> dict[str, Any] | None:
    """OpenAI `response_format` -> the JSON schema to enforce (None: plain text).

    `{"type": "json_object"}` is any JSON object; `{"type": "json_schema", "json_schema":
    {"schema": {...}, "strict": true}}` is that schema. Raises ConstraintError naming the problem.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError("'response_format' must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ConstraintError("'response_format.json_schema' must be an object with a 'schema'")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ConstraintError("'response_format.json_schema.schema' must be a JSON schema object")
        return schema
    raise ConstraintError(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}")


def grammar_of(schema: dict[str, Any]) -> str:
    """A JSON schema -> llguidance grammar text (not yet checked against a tokenizer)."""
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("structured output needs llguidance on this edge "
                              "(pip install 'fogline[edge]')") from None

    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise ConstraintError(f"the JSON schema is longer than {MAX_SCHEMA_CHARS} characters")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConstraintError(f"invalid JSON schema: {e}") from None


class Grammar:
    """A compiled grammar over one tokenizer; makes one fresh `Constraint` per request."""

    def __init__(self, tokenizer: Any, grammar: str, n_vocab: int, eos: Sequence[int] = ()) -> None:
        import llguidance

        err = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if err and not err.startswith("WARNING"):
            raise ConstraintError(f"unsupported JSON schema: {err.strip().splitlines()[0][:300]}")
        self.tokenizer, self.grammar, self.n_vocab = tokenizer, grammar, n_vocab
        self.eos = frozenset(int(t) for t in eos)

    def start(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    """One request's matcher. `sync(completion)` brings it to exactly those tokens (rolling back
    what differs: rejected drafts), `allowed()` is the next position's mask."""

    def __init__(self, grammar: Grammar) -> None:
        import llguidance

        self.n_vocab, self._eos = grammar.n_vocab, grammar.eos
        self._m = llguidance.LLMatcher(grammar.tokenizer, grammar.grammar, log_level=0)
        if self._m.is_error():
            raise ConstraintError(f"unsupported JSON schema: {self._m.get_error()[:300]}")
        self.consumed: list[int] = []
        # llguidance keeps no history entry for an EOS that ends the grammar (it only stops), so an
        # EOS is never fed to it (it is allowed exactly when the grammar accepts): a spec draft of
        # EOS can then be rolled back like any other token

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    def sync(self, completion: Sequence[int]) -> None:
        """Make the matcher's state that after `completion` (the tokens generated so far)."""
        c, n = self.consumed, min(len(self.consumed), len(completion))
        k = 0
        while k < n and c[k] == completion[k]:
            k += 1
        if k < len(c):
            undo = sum(1 for t in c[k:] if t not in self._eos)
            if undo:
                self._m.rollback(undo)
            del c[k:]
        for t in completion[k:]:
            t = int(t)
            if t not in self._eos:
                self._m.consume_token(t)
            c.append(t)

    def bitmask(self) -> bytes:
        """The next position's allowed tokens, one bit per token (see the module doc)."""
        return self._m.compute_bitmask()

    def allowed(self, bits: bytes) -> np.ndarray:
        return allowed_of(bits, self.n_vocab)


def allowed_of(bits: bytes, n_vocab: int) -> np.ndarray:
    """A bitmask -> bool[n_vocab] (tokens past the mask's end are not allowed)."""
    a = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little").astype(bool)
    if len(a) < n_vocab:
        a = np.concatenate([a, np.zeros(n_vocab - len(a), bool)])
    return a[:n_vocab]


def apply_mask(logits: np.ndarray, allowed: np.ndarray) -> None:
    """In place: disallowed tokens get -inf (a masked model cannot pick or be confident in them)."""
    logits[:len(allowed)][~allowed] = -np.inf
    logits[len(allowed):] = -np.inf


def pack_mask(bits: bytes) -> bytes:
    """For the wire: a JSON mask is mostly ones (in a string) or mostly zeros (elsewhere)."""
    return zlib.compress(bits, 1)


def unpack_mask(data: bytes, vocab: int) -> bytes:
    """The wire's mask -> the bitmask, which must cover `vocab` tokens (llguidance may count a
    few more: its vocabulary has room for extra tokens); raises ValueError otherwise."""
    lo, hi = (vocab + 7) // 8, 4 * ((vocab + 31) // 32) + 1024
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, hi + 1)
    except zlib.error:
        raise ValueError("a token mask must be a zlib stream") from None
    if not lo <= len(out) <= hi or len(out) % 4 or d.unconsumed_tail or not d.eof:
        raise ValueError(f"a token mask must be a zlib stream of {lo}..{hi} bytes (a multiple of 4)")
    return out


_tok_lock = threading.Lock()
_tokenizers: dict[int, Any] = {}


def tokenizer_from_llama(model: Any) -> Any:
    """The llguidance tokenizer of a loaded GGUF (edge_runtime LlamaModel), with its full EOG set
    as EOS (~0.25 s once per model, cached)."""
    with _tok_lock:
        tok = _tokenizers.get(id(model))
        if tok is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            tok = _tokenizers[id(model)] = lltokenizer_from_vocab(model.vocab, eos_token=eog_of(model))
        return tok


def eog_of(model: Any) -> list[int]:
    return [t for t in range(model.n_vocab) if model.is_eog(t)]


class Grammars:
    """The edge's compiled grammars, by schema text (a client repeats its schema every request)."""

    def __init__(self, model: Any, capacity: int = 64) -> None:
        self.model, self.capacity = model, capacity
        self._cache: dict[str, Grammar] = {}
        self._lock = threading.Lock()

    def constraint(self, schema: dict[str, Any]) -> Constraint:
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            g = self._cache.get(key)
        if g is None:
            g = Grammar(tokenizer_from_llama(self.model), grammar_of(schema), self.model.n_vocab, eog_of(self.model))
            with self._lock:
                if len(self._cache) >= self.capacity:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = g
        return g.start()
