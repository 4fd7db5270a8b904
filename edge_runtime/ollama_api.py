"""The Ollama surface: /api/chat and /api/generate bodies -> ApiRequest, engine events -> Ollama JSON.

Schema only, like openai_api.py (no aiohttp): what the Ollama API's clients send
(Open WebUI, Home Assistant, the official `ollama` library), mapped onto the
same engine request as the OpenAI surface. Sampling defaults are Ollama's own
(temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over the last 64
tokens), so a client gets what it would get from Ollama. Options this runtime
cannot honour are refused with a 400 naming them unless they hold their
neutral value; load-time options (num_ctx, num_thread, ...) belong to the
daemon's config and are ignored, and unknown ones are ignored with a warning,
as Ollama does. The fogline extension: `mode`, `fogline_tau`, `fogline_slo_ms`
at the top level or inside `options`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from edge_runtime.chat import normalize_messages
from edge_runtime.config import MODES
from edge_runtime.engine import StreamEvent
from edge_runtime.errors import invalid
from edge_runtime.openai_api import ApiRequest, _get_bool, _get_int, _get_number, _stop
from edge_runtime.sampling import SamplingParams

log = logging.getLogger("fogline.edge.ollama")

# The Ollama release whose request and response fields this surface follows (clients gate
# features on it); the response's `fogline` key says what actually answers.
OLLAMA_VERSION = "0.4.0"
MAX_STOP = 16
# Ollama's defaults for what a request leaves out (also what /api/show reports as parameters)
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}
NO_LIMIT = 1 << 20  # repeat_last_n = -1: the whole completion
# options that configure the model load in Ollama; here the daemon's config decides them
LOAD_TIME = frozenset({"numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                       "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
                       "penalize_newline", "mirostat_tau", "mirostat_eta"})
# samplers this runtime does not have: accepted only at the value that turns them off
NEUTRAL = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "min_p": 0.0}
SAMPLING = frozenset({"temperature", "top_p", "top_k", "seed", "num_predict", "stop", "repeat_penalty",
                      "repeat_last_n", "presence_penalty", "frequency_penalty"})
EXTENSION = ("mode", "fogline_tau", "fogline_slo_ms")
_warned: set[str] = set()

Kind = Literal["chat", "generate"]


@dataclass(frozen=True)
class OllamaRequest:
    """A validated /api/chat or /api/generate body; `api` is None for a bare load request
    (no prompt, no messages), which Ollama answers with done_reason "load"."""

    kind: Kind
    model: str
    stream: bool
    api: ApiRequest | None


def ollama_name(name: str) -> str:
    """Ollama names carry a tag; an untagged served name is `name:latest`."""
    return name if ":" in name else f"{name}:latest"


def _options(body: dict[str, Any]) -> dict[str, Any]:
    opts = body.get("options")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise invalid("'options' must be an object", "options")
    for key, value in opts.items():
        if key in NEUTRAL:
            if value is not None and value != NEUTRAL[key]:
                raise invalid(f"option '{key}' is not supported by this runtime (only {NEUTRAL[key]!r})", key)
        elif key not in SAMPLING and key not in EXTENSION and key not in LOAD_TIME and key not in _warned:
            _warned.add(key)
            log.warning("ignoring unknown Ollama option %r", key)
    return opts


def _sampling(opts: dict[str, Any]) -> SamplingParams:
    seed = _get_int(opts, "seed", -(2 ** 63), 2 ** 64 - 1)
    n = _get_int(opts, "num_predict", -2)
    if n == 0:
        raise invalid("'num_predict' must be >= 1, or -1 (no limit) / -2 (fill the context)", "num_predict")
    last = _get_int(opts, "repeat_last_n", -1)
    top_k = _get_int(opts, "top_k", 0)
    return SamplingParams(
        temperature=_get_number(opts, "temperature", DEFAULTS["temperature"], 0.0, 2.0),
        top_p=_get_number(opts, "top_p", DEFAULTS["top_p"], 0.0, 1.0),
        top_k=DEFAULTS["top_k"] if top_k is None else top_k,
        seed=None if seed is None or seed == -1 else seed % (2 ** 64),
        presence_penalty=_get_number(opts, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_get_number(opts, "frequency_penalty", 0.0, -2.0, 2.0),
        repeat_penalty=_get_number(opts, "repeat_penalty", DEFAULTS["repeat_penalty"], 0.001, 10.0),
        repeat_last_n=DEFAULTS["repeat_last_n"] if last is None else (NO_LIMIT if last == -1 else last),
        max_tokens=None if n is None or n < 0 else n, stop=_stop(opts, MAX_STOP))


def _common(body: Any, default_mode: str) -> tuple[str, bool, dict[str, Any]]:
    """(model, stream, the ApiRequest fields every kind shares) after the checks both endpoints need."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model", body.get("name"))
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string", "model")
    stream = _get_bool(body, "stream", True)
    fmt = body.get("format")
    if fmt in (None, ""):
        schema = None
    elif fmt == "json":
        schema = {"type": "object"}  # Ollama's JSON mode: a JSON object
    elif isinstance(fmt, dict):
        schema = fmt  # a JSON schema
    else:
        raise invalid("'format' must be \"json\" or a JSON schema object", "format")
    if body.get("think") not in (None, False):
        raise invalid(f"{model!r} does not support thinking", "think")
    if body.get("tools"):
        raise invalid(f"{model!r} does not support tools", "tools")
    if body.get("logprobs"):
        raise invalid("'logprobs' are served on /v1/chat/completions and /v1/completions only", "logprobs")
    opts = _options(body)
    ext = {k: opts[k] for k in EXTENSION if k in opts} | {k: body[k] for k in EXTENSION if k in body}
    mode = ext.get("mode", default_mode)
    if mode not in MODES:
        raise invalid(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    tau = _get_number(ext, "fogline_tau", -1.0, 0.0, 1.0)
    slo = _get_number(ext, "fogline_slo_ms", -1.0, 0.001, 3_600_000.0)
    return model, stream, dict(model=model, params=_sampling(opts), stream=stream, mode=mode,
                               tau=None if tau < 0 else tau, slo_ms=None if slo < 0 else slo,
                               response_schema=schema)


def _text_only(m: Any, where: str) -> None:
    if isinstance(m, dict) and m.get("images"):
        raise invalid(f"'{where}images': this model reads text only", f"{where}images")
    if isinstance(m, dict) and m.get("tool_calls"):
        raise invalid(f"'{where}tool_calls': this model has no tool calling", f"{where}tool_calls")


def parse_ollama_chat(body: Any, *, default_mode: str) -> OllamaRequest:
    model, stream, common = _common(body, default_mode)
    raw = body.get("messages")
    if raw is None or raw == []:
        return OllamaRequest("chat", model, stream, None)
    if isinstance(raw, list):
        for i, m in enumerate(raw):
            _text_only(m, f"messages[{i}].")
    return OllamaRequest("chat", model, stream, ApiRequest(kind="chat", messages=normalize_messages(raw), **common))


def parse_ollama_generate(body: Any, *, default_mode: str) -> OllamaRequest:
    model, stream, common = _common(body, default_mode)
    _text_only(body, "")
    for key, why in (("template", "the GGUF's own chat template is used"),
                     ("context", "send the conversation to /api/chat instead"),
                     ("suffix", "no insertion mode")):
        if body.get(key):
            raise invalid(f"'{key}' is not supported: {why}", key)
    prompt, system = body.get("prompt") or "", body.get("system")
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string", "prompt")
    if system is not None and not isinstance(system, str):
        raise invalid("'system' must be a string", "system")
    if not prompt:
        return OllamaRequest("generate", model, stream, None)
    if _get_bool(body, "raw"):
        return OllamaRequest("generate", model, stream, ApiRequest(kind="completion", prompt_text=prompt, **common))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return OllamaRequest("generate", model, stream, ApiRequest(kind="chat", messages=messages, **common))


# --------------------------------------------------------------------------- responses


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


@dataclass
class OllamaBuilder:
    """Shapes one request's engine events into Ollama JSON: NDJSON lines, or one final object."""

    kind: Kind
    model: str
    t0: float  # monotonic arrival time
    text_parts: list[str] = field(default_factory=list)

    def _obj(self, text: str, done: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out["done"] = done
        return out

    def chunk(self, text: str, origin: str | None) -> dict[str, Any]:
        """One streamed piece; `fogline.origin` says where the token that completed it was computed."""
        self.text_parts.append(text)
        out = self._obj(text, False)
        if origin is not None:
            out["fogline"] = {"origin": origin}
        return out

    def load(self) -> dict[str, Any]:
        return {**self._obj("", True), "done_reason": "load"}

    def final(self, ev: StreamEvent, first: float | None, last: float | None, *, whole: bool) -> dict[str, Any]:
        """The last object: the whole text when not streaming (`whole`), counts and measured durations
        (prompt_eval: arrival to first token, queueing included; eval: first to last token)."""
        text = "".join(self.text_parts) if whole else ""
        first = ev.at if first is None else first
        return {**self._obj(text, True), "done_reason": ev.finish_reason,
                "total_duration": _ns(ev.at - self.t0), "load_duration": 0,
                "prompt_eval_count": ev.prompt_tokens, "prompt_eval_duration": _ns(first - self.t0),
                "eval_count": ev.completion_tokens, "eval_duration": _ns((last or first) - first),
                "fogline": ev.stats.as_dict() if ev.stats else None}


@dataclass(frozen=True)
class ServedModel:
    """What /api/tags and /api/show say about the one model served (read from the bundle and the GGUF)."""

    name: str  # the Ollama name (tagged)
    architecture: str
    quant: str
    size_label: str | None  # the GGUF's general.size_label, when it has one
    gguf: str
    size: int  # GGUF bytes
    digest: str  # the GGUF's sha256 from the manifest
    modified: float  # GGUF mtime (epoch seconds)
    template: str
    info: dict[str, Any]  # model_info: architecture facts and the split

    def details(self) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": self.architecture, "families": [self.architecture],
                "parameter_size": self.size_label or "", "quantization_level": self.quant}

    def _modified_at(self) -> str:
        return datetime.fromtimestamp(self.modified, timezone.utc).isoformat().replace("+00:00", "Z")

    def tag(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "modified_at": self._modified_at(), "size": self.size,
                "digest": self.digest, "details": self.details()}

    def show(self) -> dict[str, Any]:
        return {"license": "", "modelfile": f"# served by fogline\nFROM {self.gguf}\n",
                "parameters": "\n".join(f"{k} {v}" for k, v in DEFAULTS.items()), "template": self.template,
                "details": self.details(), "model_info": self.info, "capabilities": ["completion"],
                "modified_at": self._modified_at()}
