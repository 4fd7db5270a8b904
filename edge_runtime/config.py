"""The edge daemon's configuration: one frozen dataclass, three sources.

Precedence, lowest to highest: the defaults below, a TOML file
(`--config edge.toml`, flat keys or an `[edge]` table), `FOGLINE_EDGE_<KEY>`
environment variables, command-line flags. Every value is checked once, at
startup, and a bad one is rejected with its key and the reason, so a daemon
that started is a daemon whose configuration made sense.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fogline.errors import ConfigError

log = logging.getLogger("fogline.edge.config")
ENV_PREFIX = "FOGLINE_EDGE_"
# Where `fogline cloud serve` accepts edges; a cloud_url with no path means this.
CLOUD_WS_PATH = "/ws"
MODES = ("edge", "collab", "spec", "cloud", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")


def physical_cores() -> int:
    """Threads default to physical cores: llama.cpp gains nothing from SMT siblings."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is part of the edge extra
        n = None
    return max(1, n or os.cpu_count() or 1)


@dataclass(frozen=True)
class EdgeConfig:
    """Everything `fogline edge serve` can be told. Field comments are the documentation."""

    # The edge half of an export (a directory with manifest.json and edge.gguf).
    bundle: str = ""
    # Where the OpenAI-compatible HTTP API listens.
    host: str = "127.0.0.1"
    port: int = 8080
    # llama.cpp compute threads; 0 means "the number of physical cores".
    threads: int = 0
    # Sequences decoded together in one batch (llama.cpp KV sequences / slots).
    parallel: int = 4
    # Tokens (prompt + completion) one request may use; the KV cache holds parallel x ctx_size.
    ctx_size: int = 2048
    # Most tokens fed to llama.cpp per step (prompt chunks + one row per decoding sequence).
    batch_size: int = 512
    # Requests allowed to wait for a free sequence; beyond it the API answers 429.
    queue_size: int = 32
    # Retry-After (seconds) sent with a 429.
    retry_after_s: int = 1
    # If set, /v1/* and /api/* (the Ollama API) require `Authorization: Bearer <api_key>`.
    api_key: str = ""
    # Model id served by /v1/models, /api/tags and reported in every response; empty: "fogline-edge-k<K>".
    model_name: str = ""
    # Refuse requests naming another model (OpenAI: 400 model_not_found, Ollama: 404). Off (the
    # default, like llama.cpp's server): one model is served, so any name means this one.
    strict_model_name: bool = False
    # Mode used when a request does not say (edge|collab|spec|cloud|auto).
    default_mode: str = "edge"
    # Keep h_K (fp16) for every position so it can be uploaded to a cloud later.
    # With a bundle whose tapped block is the GGUF's last one this costs a Python
    # callback per graph node and full-vocabulary logits for prompt tokens.
    capture_hidden: bool = False
    # Re-hash the bundle's files against its manifest before loading (slow for big GGUFs).
    verify_bundle: bool = True
    # Largest accepted request body.
    max_body_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"
    # --- the cloud half (collab / spec / cloud modes); empty cloud_url: edge only.
    # Websocket URL of `fogline cloud serve`, e.g. ws://cloud:8700/ws (no path: /ws). Setting it
    # turns capture_hidden on.
    cloud_url: str = ""
    # Bearer token the cloud expects in the handshake.
    cloud_token: str = ""
    # Hidden-state codec on the wire: fp16 (default), int8 (blockwise absmax), fp32.
    cloud_codec: str = "fp16"
    # A cloud answer slower than this (ms) makes the request finish in edge mode (0: no deadline).
    cloud_deadline_ms: int = 5000
    # h_K rows (fp16) kept per request to replay to a cloud that lost the session; longer
    # requests fall back to edge mode when a replay would be needed.
    replay_history_tokens: int = 4096
    # Collab threshold on the exit head's max probability; used when neither the request
    # (fogline_tau) nor the bundle's calibration gives one.
    tau: float = 0.9
    # Spec mode: initial draft block length (adapted per request within [1, 2*spec_gamma]).
    spec_gamma: int = 4
    # Spec mode: draft a token only when the exit head's max probability is at least this; a
    # block ends at the first unsure position (0: always draft, the plain chain). Fewer rejected
    # drafts cost the cloud fewer rows per token, at fewer tokens per round trip. 0.5: 23% fewer
    # deep passes per token than 0 and no latency cost measured at RTT 20-100 ms (README, spec).
    spec_stop: float = 0.5
    # Greedy decoding mixes the exit head with a copy of the context (prompt lookup, weights fitted
    # at export: the manifest's calibration.prompt_lookup); false: the exit head alone.
    prompt_lookup: bool = True
    # Collab: share of the edge-emitted tokens the cloud checks against the deep model's greedy
    # token (one extra head row each, no extra round trip): the live agreement `auto` learns from.
    collab_check_share: float = 0.25
    # Seconds between RTT pings on the cloud link.
    cloud_ping_s: float = 2.0
    # --- the auto mode and the device monitor
    # auto: per-token latency target (ms/token) for requests that send no `fogline_slo_ms`.
    slo_ms: float = 100.0
    # auto: least expected agreement with the full model's tokens (0: meet the SLO at the least cloud cost).
    min_quality: float = 0.9
    # auto: the policy's seed (its choices are deterministic given the seed and the request sequence).
    policy_seed: int = 0
    # Seconds between device samples (temperature, memory, load, power) for /health, /metrics and auto.
    device_sample_s: float = 5.0
    # auto: a board at/above this temperature (degrees C), or throttling, is hot (fewer local tokens).
    hot_c: float = 75.0

    def effective_threads(self) -> int:
        return self.threads or physical_cores()

    def served_model_name(self, split: int) -> str:
        return self.model_name or f"fogline-edge-k{split}"

    def redacted(self) -> dict[str, Any]:
        """The values worth logging at startup (the API key and the cloud token are not among them)."""
        d = dataclasses.asdict(self)
        d["api_key"] = "***" if self.api_key else ""
        d["cloud_token"] = "***" if self.cloud_token else ""
        d["threads"] = self.effective_threads()
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(EdgeConfig)}


def _coerce(key: str, value: Any, from_text: bool) -> Any:
    """Convert one raw value to the field's type, or say why it cannot be."""
    kind = type(_FIELDS[key].default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _validate(cfg: EdgeConfig) -> None:
    def need(ok: bool, key: str, reason: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {reason} (got {getattr(cfg, key)!r})")

    need(bool(cfg.bundle), "bundle", "required: the edge bundle directory")
    need(Path(cfg.bundle).is_dir(), "bundle", "is not a directory")
    need(bool(cfg.host.strip()), "host", "must not be empty")
    need(0 <= cfg.port <= 65535, "port", "must be in 0..65535 (0: any free port)")
    need(0 <= cfg.threads <= 512, "threads", "must be in 0..512 (0: physical cores)")
    need(1 <= cfg.parallel <= 64, "parallel", "must be in 1..64")
    need(16 <= cfg.ctx_size <= 1 << 20, "ctx_size", "must be in 16..1048576")
    need(8 <= cfg.batch_size <= 8192, "batch_size", "must be in 8..8192")
    need(cfg.batch_size >= cfg.parallel, "batch_size", f"must be >= parallel ({cfg.parallel}): "
         "every decoding sequence needs a row in each step")
    need(0 <= cfg.queue_size <= 100_000, "queue_size", "must be in 0..100000")
    need(0 <= cfg.retry_after_s <= 3600, "retry_after_s", "must be in 0..3600")
    need(cfg.default_mode in MODES, "default_mode", f"must be one of {', '.join(MODES)}")
    need(cfg.log_level in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    need(cfg.cloud_codec in ("fp16", "int8", "fp32"), "cloud_codec", "must be fp16, int8 or fp32")
    need(cfg.cloud_url == "" or cfg.cloud_url.startswith(("ws://", "wss://")), "cloud_url",
         "must be a ws:// or wss:// URL (or empty)")
    need(0 <= cfg.cloud_deadline_ms <= 3_600_000, "cloud_deadline_ms", "must be in 0..3600000")
    need(16 <= cfg.replay_history_tokens <= 1 << 20, "replay_history_tokens", "must be in 16..1048576")
    need(0.0 <= cfg.tau <= 1.0, "tau", "must be in 0..1")
    need(1 <= cfg.spec_gamma <= 32, "spec_gamma", "must be in 1..32")
    need(0.0 <= cfg.spec_stop <= 1.0, "spec_stop", "must be in 0..1")
    need(0.0 <= cfg.collab_check_share <= 1.0, "collab_check_share", "must be in 0..1")
    need(0.05 <= cfg.cloud_ping_s <= 3600, "cloud_ping_s", "must be in 0.05..3600")
    need(0 < cfg.slo_ms <= 3_600_000, "slo_ms", "must be in (0, 3600000] ms/token")
    need(0.0 <= cfg.min_quality <= 1.0, "min_quality", "must be in 0..1")
    need(0.05 <= cfg.device_sample_s <= 3600, "device_sample_s", "must be in 0.05..3600")
    need(0 < cfg.hot_c <= 150, "hot_c", "must be in (0, 150] degrees C")
    need(1024 <= cfg.max_body_bytes <= 1 << 30, "max_body_bytes", "must be in 1024..1073741824")


def normalize_cloud_url(url: str) -> str:
    """A ws(s):// URL with no path (or just "/") means the cloud's websocket path, /ws."""
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss") and parts.netloc and parts.path in ("", "/"):
        return urlunsplit(parts._replace(path=CLOUD_WS_PATH))
    return url


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    if "edge" in data and isinstance(data["edge"], dict):
        data = {**{k: v for k, v in data.items() if k != "edge" and not isinstance(v, dict)}, **data["edge"]}
    unknown = sorted(k for k in data if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {path} (known: {', '.join(_FIELDS)})")
    return data


def load_config(toml_path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> EdgeConfig:
    """Build the effective config: defaults < TOML < FOGLINE_EDGE_* env < overrides (flags).

    `overrides` values of None mean "flag not given".
    """
    values: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        for k, v in _read_toml(path).items():
            values[k] = _coerce(k, v, from_text=False)
        if "bundle" in values and not Path(values["bundle"]).is_absolute():
            values["bundle"] = str((path.parent / values["bundle"]).resolve())
    env = os.environ if env is None else env
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in _FIELDS:
            raise ConfigError(f"{name}: unknown setting (known: {', '.join(k.upper() for k in _FIELDS)})")
        values[key] = _coerce(key, raw, from_text=True)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in _FIELDS:
            raise ConfigError(f"{k}: unknown setting")
        values[k] = _coerce(k, v, from_text=isinstance(v, str))
    url = values.get("cloud_url", "")
    if normalize_cloud_url(url) != url:
        values["cloud_url"] = normalize_cloud_url(url)
        log.info("cloud_url %s has no path: using %s (the cloud's websocket)", url, values["cloud_url"])
    cfg = EdgeConfig(**values)
    _validate(cfg)
    return cfg
