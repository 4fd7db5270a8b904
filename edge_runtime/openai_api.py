"""The OpenAI surface: request bodies -> typed requests, engine events -> response JSON.

No aiohttp here: this module is the schema (what we accept, with which types
and ranges; what we answer, field by field), so it can be read and tested on
its own. Unknown fields are ignored as OpenAI's own API does; fields we cannot
honour (n > 1, tools, ...) are refused with a 400 that names them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_runtime.chat import normalize_messages
from edge_runtime.config import MODES
from edge_runtime.engine import FoglineStats, StreamEvent
from edge_runtime.errors import ApiError, ErrorKind, invalid
from edge_runtime.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenChoice
from fogline.constraint import ConstraintError, schema_of

Kind = Literal["chat", "completion"]
MAX_STOP = 4
Piece = Callable[[int], bytes]


@dataclass(frozen=True)
class ApiRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    kind: Kind
    model: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    mode: str = "edge"
    tau: float | None = None  # fogline_tau: collab confidence threshold for this request
    slo_ms: float | None = None  # fogline_slo_ms: auto's per-token latency target (None: config slo_ms)
    timeline: bool = False  # fogline_timeline: per-event spec timestamps in the `fogline` stats (off: no cost)
    messages: list[dict[str, Any]] | None = None  # chat
    prompt_text: str | None = None  # completions, text prompt
    prompt_tokens: list[int] | None = None  # completions, token prompt
    echo: bool = False  # completions: prepend the prompt to the text
    # structured output: the JSON schema the completion must follow (response_format; None: text)
    response_schema: dict[str, Any] | None = None


# --------------------------------------------------------------------------- field readers


def _get_number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"'{key}' must be a number, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise invalid(f"'{key}' must be between {lo:g} and {hi:g}, got {v!r}", key)
    return float(v)


def _get_int(body: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise invalid(f"'{key}' must be an integer, got {type(v).__name__}", key)
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise invalid(f"'{key}' must be {bound}, got {v}", key)
    return v


def _get_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"'{key}' must be a boolean, got {type(v).__name__}", key)
    return v


def _refuse(body: dict[str, Any], key: str, allowed: Callable[[Any], bool], why: str) -> None:
    if key in body and body[key] is not None and not allowed(body[key]):
        raise invalid(f"'{key}' is not supported: {why}", key)


def _stop(body: dict[str, Any], limit: int = MAX_STOP) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid("'stop' must be a string or an array of strings", "stop")
    if len(v) > limit:
        raise invalid(f"'stop' takes at most {limit} sequences, got {len(v)}", "stop")
    return tuple(s for s in v if s)


def _logit_bias(body: dict[str, Any], n_vocab: int) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    out = {}
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' key {k!r} is not a token id", "logit_bias") from None
        if not 0 <= tok < n_vocab:
            raise invalid(f"'logit_bias' token id {tok} is outside the vocabulary (0..{n_vocab - 1})", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise invalid(f"'logit_bias' value for {k} must be a number in -100..100", "logit_bias")
        out[tok] = float(b)
    return out


def _common(body: Any, kind: Kind, n_vocab: int, default_mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string", "model")
    n = _get_int(body, "n", 1)
    if n is not None and n != 1:
        raise invalid(f"'n' must be 1: this server returns one choice per request (got {n})", "n")
    _refuse(body, "best_of", lambda v: v == 1, "only best_of=1")
    _refuse(body, "tools", lambda v: v == [], "this edge model has no tool calling")
    _refuse(body, "functions", lambda v: v == [], "this edge model has no function calling")
    try:
        response_schema = schema_of(body.get("response_format"))
    except ConstraintError as e:
        raise invalid(str(e), "response_format") from None
    _refuse(body, "suffix", lambda v: v == "", "no insertion mode")
    mode = body.get("mode", default_mode)
    if mode not in MODES:
        raise invalid(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    stream = _get_bool(body, "stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise invalid("'stream_options' must be an object", "stream_options")
        include_usage = _get_bool(so, "include_usage")
    max_tokens = _get_int(body, "max_tokens", 1)
    if kind == "chat":
        mct = _get_int(body, "max_completion_tokens", 1)
        max_tokens = mct if mct is not None else max_tokens
    if kind == "chat":
        logprobs = _get_bool(body, "logprobs")
        top = _get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if top and not logprobs:
            raise invalid("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    else:
        lp = _get_int(body, "logprobs", 0, 5)  # completions: the number of alternatives
        logprobs, top = lp is not None, lp or 0
    seed = _get_int(body, "seed", -(2 ** 63), 2 ** 64 - 1)
    params = SamplingParams(
        temperature=_get_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_get_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_get_int(body, "top_k", 0) or 0,
        seed=None if seed is None else seed % (2 ** 64),
        presence_penalty=_get_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_get_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body, n_vocab),
        logprobs=logprobs, top_logprobs=top, max_tokens=max_tokens, stop=_stop(body),
        ignore_eos=_get_bool(body, "ignore_eos"))
    if response_schema is not None and params.ignore_eos:
        raise invalid("'ignore_eos' cannot be combined with 'response_format': a finished JSON value "
                      "allows only the end-of-generation token", "ignore_eos")
    tau: float | None = _get_number(body, "fogline_tau", -1.0, 0.0, 1.0)
    tau = None if tau is None or tau < 0 else tau
    slo: float | None = _get_number(body, "fogline_slo_ms", -1.0, 0.001, 3_600_000.0)
    slo = None if slo is None or slo < 0 else slo
    return body, dict(kind=kind, model=model, params=params, stream=stream, include_usage=include_usage, mode=mode,
                      tau=tau, slo_ms=slo, response_schema=response_schema,
                      timeline=_get_bool(body, "fogline_timeline"))


def parse_chat(body: Any, *, n_vocab: int, default_mode: str) -> ApiRequest:
    body, common = _common(body, "chat", n_vocab, default_mode)
    return ApiRequest(messages=normalize_messages(body.get("messages")), **common)


def parse_completion(body: Any, *, n_vocab: int, default_mode: str) -> ApiRequest:
    body, common = _common(body, "completion", n_vocab, default_mode)
    prompt = body.get("prompt")
    # OpenAI accepts a batch of prompts; this server answers one prompt per request.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    echo = _get_bool(body, "echo")
    if isinstance(prompt, str):
        return ApiRequest(prompt_text=prompt, echo=echo, **common)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise invalid(f"'prompt' token {bad[0]} is outside the vocabulary (0..{n_vocab - 1})", "prompt")
        return ApiRequest(prompt_tokens=list(prompt), echo=echo, **common)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise invalid("'prompt' must be one prompt (a string or an array of token ids); "
                      "send one request per prompt", "prompt")
    raise invalid("'prompt' is required: a string or an array of token ids", "prompt")


# --------------------------------------------------------------------------- responses


def _piece_text(piece: Piece, token: int) -> tuple[str, list[int]]:
    b = piece(token)
    return b.decode("utf-8", errors="replace"), list(b)


@dataclass
class ResponseBuilder:
    """Shapes one request's engine events into OpenAI JSON (chunks, or one final object)."""

    kind: Kind
    model: str
    piece: Piece
    fingerprint: str
    logprobs: bool = False
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    text_parts: list[str] = field(default_factory=list)
    lp_entries: list[dict[str, Any]] = field(default_factory=list)  # chat logprobs content
    lp_tokens: list[tuple[str, float, dict[str, float]]] = field(default_factory=list)  # completion logprobs
    text_offset: int = 0
    origin: str | None = None  # where the latest token was computed (TokenChoice.origin)

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.rid

    def _head(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _logprob_piece(self, choice: TokenChoice) -> dict[str, Any]:
        text, raw = _piece_text(self.piece, choice.token)
        if self.kind == "chat":
            return {"content": [{"token": text, "logprob": choice.logprob, "bytes": raw,
                                 "top_logprobs": [dict(zip(("token", "bytes"), _piece_text(self.piece, t)), logprob=lp)
                                                  for t, lp in choice.top_logprobs]}]}
        return {"tokens": [text], "token_logprobs": [choice.logprob],
                "top_logprobs": [{_piece_text(self.piece, t)[0]: lp for t, lp in choice.top_logprobs}],
                "text_offset": [self.text_offset]}

    def add(self, ev: StreamEvent, is_eog: bool) -> dict[str, Any] | None:
        """Account one event; return its logprobs fragment (or None)."""
        self.text_parts.append(ev.text)
        if ev.choice is not None:
            self.origin = ev.choice.origin
        frag = None
        if self.logprobs and ev.choice is not None and not is_eog:
            frag = self._logprob_piece(ev.choice)
            if self.kind == "chat":
                self.lp_entries.extend(frag["content"])
            else:
                top = frag["top_logprobs"][0]
                self.lp_tokens.append((frag["tokens"][0], ev.choice.logprob, top))
        self.text_offset += len(ev.text)
        return frag

    # ---- streaming

    def role_chunk(self) -> dict[str, Any]:
        return {**self._head(), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}

    def chunk(self, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None = None,
              stats: FoglineStats | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": text} if text or finish_reason is None else {},
                      "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        out = {**self._head(), "choices": [choice]}
        if stats is not None:
            out["fogline"] = stats.as_dict()
        elif text and self.origin is not None:
            out["fogline"] = {"origin": self.origin}  # the extension the chat page colours tokens by
        return out

    def usage_chunk(self, ev: StreamEvent) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage(ev),
                "fogline": ev.stats.as_dict() if ev.stats else None}

    # ---- whole response

    def final(self, ev: StreamEvent, echo_text: str = "") -> dict[str, Any]:
        text = "".join(self.text_parts)
        head = self._head()
        if self.kind == "chat":
            head["object"] = "chat.completion"
            lp = {"content": self.lp_entries} if self.logprobs else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": ev.finish_reason}
        else:
            lp = None
            if self.logprobs:
                offsets, pos = [], len(echo_text)
                for tok_text, _, _ in self.lp_tokens:
                    offsets.append(pos)
                    pos += len(tok_text)
                lp = {"tokens": [t for t, _, _ in self.lp_tokens], "token_logprobs": [x for _, x, _ in self.lp_tokens],
                      "top_logprobs": [t for _, _, t in self.lp_tokens], "text_offset": offsets}
            choice = {"index": 0, "text": echo_text + text, "logprobs": lp, "finish_reason": ev.finish_reason}
        return {**head, "choices": [choice], "usage": usage(ev),
                "fogline": ev.stats.as_dict() if ev.stats else None}


def usage(ev: StreamEvent) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def finish_error(ev: StreamEvent) -> ApiError | None:
    """The error a finished event stands for, if it did not finish normally."""
    if ev.finish_reason == "cancelled":
        return ApiError(ErrorKind.UNAVAILABLE, "the edge engine stopped before the request finished")
    if ev.finish_reason == "error":
        return ApiError(ErrorKind.INTERNAL, f"generation failed: {ev.error}")
    return None


def models_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "fogline"}]}
