"""The cloud process's one configuration object.

Precedence: defaults < TOML file (`--config cloud.toml`, keys = field names) <
environment (`FOGLINE_CLOUD_<FIELD>`, e.g. FOGLINE_CLOUD_TOKEN) < command-line
flags. Torch-free, so `fogline --help` stays light.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogline.errors import ConfigError

ENV_PREFIX = "FOGLINE_CLOUD_"
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SERVE_PROXY_MAX_MESSAGE = 16 << 20  # uvicorn's websocket message limit in Ray Serve's proxy
RAY_ONLY = ("ray_address", "replicas", "autoscale", "edges_per_replica", "num_gpus")  # settings that need ray


@dataclass(frozen=True)
class CloudConfig:
    bundle: Path  # DIR/cloud of an export (deep.safetensors, config.json, manifest.json)
    host: str = "127.0.0.1"  # listen address; 0.0.0.0 to serve other machines
    port: int = 8700  # 0 picks a free port (printed on startup)
    device: str = "cpu"  # "cpu" or "cuda[:n]"
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16" for the deep layers and KV cache
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    fast_gemv: bool = False  # compile a fused single-row matmul (inductor, needs a C++ compiler;
    #                          a lone session's step 0.58-0.69x eager's on CPU; ~15 s first start)
    token: str = ""  # bearer token edges must present ("" = no auth: development only)
    verify_bundle: bool = True  # re-check the bundle's file hashes on startup
    max_frame_bytes: int = 8 << 20  # largest websocket frame accepted
    max_rows_per_frame: int = 4096  # most h_K rows in one append/infer/verify
    max_context: int = 0  # positions per session; 0 = the model's max_position_embeddings
    kv_budget_bytes: int = 2 << 30  # all sessions' KV caches together; LRU eviction beyond
    session_ttl_s: float = 900.0  # an idle session is dropped after this long
    reap_interval_s: float = 5.0  # how often the TTL reaper runs
    batch_window_ms: float = 2.0  # after a step arrives, wait this long for other sessions' steps
    max_batch_tokens: int = 4096  # rows in one forward pass
    max_queue: int = 1024  # steps waiting for the model; beyond this requests get `overloaded`
    # /health answers 503 "overloaded" once this many steps wait for the model, so a load balancer
    # stops sending new edges before the batcher refuses steps; 0 = 3/4 of max_queue
    health_max_queue: int = 0
    schedule: str = "vdf"  # queued steps: "vdf" (value density: nearest deadline, cheapest first) or "fifo"
    step_deadline_ms: float = 250.0  # an infer/verify is due this long after it arrives (lazy appends: 4x)
    max_inflight_per_connection: int = 256  # concurrent requests one websocket may have
    max_bad_frames: int = 64  # malformed frames tolerated per connection before it is closed
    hello_timeout_s: float = 10.0  # a connection must say hello within this long
    shutdown_grace_s: float = 10.0  # on shutdown, wait this long for in-flight steps
    codecs: tuple[str, ...] = ("fp32", "fp16", "int8")  # hidden-state codecs accepted
    log_level: str = "INFO"
    # --- scale-out on Ray Serve (the fogline[ray] extra; docs/scale-out.md) ---
    ray: bool = False  # serve as a Ray Serve app: one runtime per replica, edges enter at Serve's proxy (host:port)
    ray_address: str = ""  # "" = start a local Ray; "auto" = the cluster this node joined; HOST:PORT of a head
    replicas: int = 1  # replicas, fixed (or let Serve scale: `autoscale`)
    autoscale: str = ""  # "MIN,MAX": Serve adds/removes replicas to keep `edges_per_replica` websockets on each
    edges_per_replica: int = 64  # autoscaling target: open edge websockets per replica
    num_gpus: float = 0.0  # GPUs per replica, assigned by Ray (device must then be "cuda")

    def __post_init__(self) -> None:
        if self.dtype in DTYPE_ALIASES:
            object.__setattr__(self, "dtype", DTYPE_ALIASES[self.dtype])
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype {self.dtype!r} must be float32, bfloat16 or float16")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device {self.device!r} must be 'cpu' or 'cuda[:n]'")
        for name in ("max_frame_bytes", "max_rows_per_frame", "kv_budget_bytes", "max_batch_tokens",
                     "max_queue", "max_inflight_per_connection"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is outside [0, 65535]")
        bad = set(self.codecs) - {"fp32", "fp16", "int8"}
        if bad or not self.codecs:
            raise ConfigError(f"codecs must be a non-empty subset of fp32, fp16, int8 (got {sorted(bad)})")
        if self.schedule not in ("vdf", "fifo"):
            raise ConfigError(f"schedule {self.schedule!r} must be 'vdf' or 'fifo'")
        if self.health_max_queue < 0:
            raise ConfigError(f"health_max_queue must not be negative, got {self.health_max_queue}")
        if self.step_deadline_ms <= 0:
            raise ConfigError(f"step_deadline_ms must be positive, got {self.step_deadline_ms}")
        for name in ("session_ttl_s", "reap_interval_s", "batch_window_ms", "hello_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        self._check_ray()

    def _check_ray(self) -> None:
        if not self.ray:
            if given := [f.name for f in dataclasses.fields(self) if f.name in RAY_ONLY
                         and getattr(self, f.name) != f.default]:
                raise ConfigError(f"{', '.join(given)} only apply with ray = true (--ray)")
            return
        if self.port == 0:
            raise ConfigError("with --ray the port must be fixed: every node's Serve proxy listens on it")
        if self.max_frame_bytes > SERVE_PROXY_MAX_MESSAGE:
            raise ConfigError(f"with --ray max_frame_bytes must be <= {SERVE_PROXY_MAX_MESSAGE} (16 MiB): Serve's "
                              f"proxy (uvicorn) closes a websocket that sends a larger message")
        if self.replicas < 1 or self.edges_per_replica < 1:
            raise ConfigError("replicas and edges_per_replica must be at least 1")
        if self.autoscale and self.replicas != 1:
            raise ConfigError("give either replicas (fixed) or autoscale (MIN,MAX), not both")
        parse_autoscale(self.autoscale)
        if self.num_gpus < 0:
            raise ConfigError(f"num_gpus must not be negative, got {self.num_gpus}")
        if self.num_gpus > 0 and self.device != "cuda":
            raise ConfigError(f"with num_gpus > 0 the device must be 'cuda' (Ray assigns each replica its GPU), "
                              f"got {self.device!r}")
        if self.num_gpus == 0 and self.device != "cpu":
            raise ConfigError(f"device {self.device!r} needs num_gpus > 0: a Ray replica sees only the GPUs it "
                              f"was given")


def parse_autoscale(text: str) -> tuple[int, int] | None:
    """(MIN, MAX) replicas from the `autoscale` setting, or None for a fixed count."""
    if not text:
        return None
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"autoscale {text!r} must be MIN,MAX (two integers)") from None
    if not 1 <= lo <= hi:
        raise ConfigError(f"autoscale {text!r} needs 1 <= MIN <= MAX (a replica loads the model for longer than "
                          f"an edge waits to connect, so never scale to zero)")
    return lo, hi


def _coerce(name: str, typ: Any, value: Any) -> Any:
    """Turn a TOML/env/flag value into the field's type (strings from the environment included)."""
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if t == "Path":
            return Path(value)
        if t == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if t == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if t == "float":
            return float(value)
        if t.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(x).strip() for x in items if str(x).strip())
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {t}") from None


def load_config(toml_path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> CloudConfig:
    fields = {f.name: f for f in dataclasses.fields(CloudConfig)}
    values: dict[str, Any] = {}
    if toml_path is not None:
        try:
            data = tomllib.loads(Path(toml_path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {toml_path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{toml_path} is not valid TOML: {e}") from None
        data = data.get("cloud", data)  # either top-level keys or a [cloud] table
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{toml_path}: unknown setting(s) {', '.join(unknown)}")
        values.update(data)
    env = os.environ if env is None else env
    for name in fields:
        if (v := env.get(ENV_PREFIX + name.upper())) is not None:
            values[name] = v
    for name, v in (overrides or {}).items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name}")
        if v is not None:
            values[name] = v
    if "bundle" not in values:
        raise ConfigError("no bundle given (--bundle DIR/cloud, FOGLINE_CLOUD_BUNDLE or `bundle` in the TOML)")
    return CloudConfig(**{k: _coerce(k, fields[k].type, v) for k, v in values.items()})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for `fogline cloud serve` (every one optional: TOML and env fill the rest)."""
    p.add_argument("--bundle", help="the cloud half of an export (DIR/cloud)")
    p.add_argument("--config", help="a TOML file with CloudConfig fields")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", help="cpu or cuda[:n]")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--token", help="bearer token edges must present (prefer FOGLINE_CLOUD_TOKEN)")
    p.add_argument("--kv-budget-bytes", type=int, dest="kv_budget_bytes")
    p.add_argument("--session-ttl-s", type=float, dest="session_ttl_s")
    p.add_argument("--batch-window-ms", type=float, dest="batch_window_ms")
    p.add_argument("--schedule", choices=["vdf", "fifo"], help="order of queued steps (default vdf)")
    p.add_argument("--health-max-queue", type=int, dest="health_max_queue",
                   help="/health is 503 once this many steps wait (default 0: 3/4 of max_queue)")
    p.add_argument("--step-deadline-ms", type=float, dest="step_deadline_ms",
                   help="an infer/verify is due this long after it arrives (default 250)")
    p.add_argument("--fast-gemv", action="store_true", default=None, dest="fast_gemv",
                   help="compile a fused single-row matmul (needs a C++ compiler)")
    p.add_argument("--no-verify-bundle", action="store_false", default=None, dest="verify_bundle")
    p.add_argument("--log-level")
    g = p.add_argument_group("scale-out on Ray Serve (pip install 'fogline[ray]'; docs/scale-out.md)")
    g.add_argument("--ray", action="store_true", default=None,
                   help="deploy as a Ray Serve app: one cloud runtime per replica behind Serve's proxy on --port")
    g.add_argument("--ray-address", dest="ray_address",
                   help="the Ray cluster to join: 'auto' or HOST:PORT (default: start a local one)")
    g.add_argument("--replicas", type=int, help="number of replicas (default 1)")
    g.add_argument("--autoscale", metavar="MIN,MAX", help="let Serve scale between MIN and MAX replicas")
    g.add_argument("--edges-per-replica", type=int, dest="edges_per_replica",
                   help="autoscaling target: open edge websockets per replica (default 64)")
    g.add_argument("--num-gpus", type=float, dest="num_gpus", help="GPUs per replica (with --device cuda)")


def config_from_args(args: argparse.Namespace) -> CloudConfig:
    names = {f.name for f in dataclasses.fields(CloudConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return load_config(args.config, overrides=overrides)
