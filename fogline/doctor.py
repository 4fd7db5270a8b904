"""`fogline doctor`: check this host the way a user debugging an install needs.

One line per check, `ok` / `warn` / `fail`; exit 1 when anything fails. llama.cpp
is only ever loaded in a child (edge_runtime/smoke.py), so a build that crashes
on this host is reported rather than taking the doctor down; torch is imported
only by the torch check (the edge never needs it).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib.util
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from fogline.errors import FoglineError

Verdict = Literal["ok", "warn", "fail"]
MiB = 1 << 20


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str

    def line(self) -> str:
        return f"{self.verdict:<4}  {self.name:<9} {self.detail}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_runtime.config import EdgeConfig  # torch- and llama-free

    p.add_argument("--bundle", help="an export directory (with edge/) or its edge half; default: the demo model")
    p.add_argument("--cloud-url", help="check the handshake with this cloud (ws://host:8700/ws); needs --bundle")
    p.add_argument("--cloud-token", default=None,
                   help="bearer token for the cloud (default: $FOGLINE_EDGE_CLOUD_TOKEN)")
    p.add_argument("--host", default=EdgeConfig.host, help="address the edge will listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=EdgeConfig.port, help="port the edge will listen on (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    checks = run_checks(args.bundle, args.cloud_url, args.cloud_token or os.environ.get("FOGLINE_EDGE_CLOUD_TOKEN", ""),
                        args.host, args.port)
    return 1 if any(c.verdict == "fail" for c in checks) else 0


def run_checks(bundle: str | None, cloud_url: str | None, cloud_token: str, host: str, port: int,
               emit=print) -> list[Check]:
    """Run every check, printing each line as soon as it is known."""
    checks: list[Check] = []

    def add(new: list[Check]) -> None:
        for c in new:
            emit(c.line())
            checks.append(c)

    edge_dir, manifest, found = _bundle_check(bundle)
    add(found)
    gguf = _gguf(edge_dir, manifest, add)
    smoke = None
    if gguf is not None:
        smoke = _smoke(gguf)
        add(llama_checks(gguf, smoke))
    add([check_torch()])
    add([check_memory(smoke, edge_dir, manifest)])
    if cloud_url:
        add([check_cloud(cloud_url, cloud_token, manifest)])
    add([check_port(host, port)])
    return checks


# --------------------------------------------------------------------------- bundle + llama.cpp


def _bundle_check(bundle: str | None):
    if bundle is None:
        return None, None, []
    from edge_runtime.loader import open_bundle  # reads the manifest; does not load llama.cpp

    root = Path(bundle)
    edge_dir = root / "edge" if (root / "edge" / "manifest.json").is_file() else root
    try:
        manifest, gguf = open_bundle(edge_dir, verify=True)
    except FoglineError as e:
        return edge_dir, None, [Check("bundle", "fail", str(e))]
    blocks = (manifest.exit_adapter or {}).get("blocks", 0)
    adapter = f", exit adapter {blocks} block(s)" if blocks else ", bare exit head"
    return edge_dir, manifest, [Check("bundle", "ok", f"{edge_dir}: K={manifest.split} of {manifest.n_layers}, "
                                                     f"{manifest.quant}{adapter}, files match the manifest")]


def _gguf(edge_dir: Path | None, manifest, add) -> Path | None:
    """The GGUF to decode: the bundle's, else the demo model (None: nothing to decode)."""
    if manifest is not None:
        return edge_dir / next(rel for rel in manifest.files if rel.endswith(".gguf"))
    if edge_dir is not None:
        return None  # a broken bundle was already reported
    from fogline.demo_model import demo_gguf_path

    try:
        return demo_gguf_path()
    except FoglineError as e:
        add([Check("decode", "fail", f"no --bundle, and no demo model to decode: {e}")])
        return None


def _smoke(gguf: Path):
    """Decode the GGUF in a child in the daemon's default context (its peak RSS: what a
    fresh `fogline edge serve` holds); None when llama-cpp-python is not installed."""
    from edge_runtime.config import EdgeConfig, physical_cores
    from edge_runtime.smoke import SmokeShape, run_smoke

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    d = EdgeConfig()
    shape = SmokeShape(n_ctx=d.parallel * d.ctx_size, n_seq=d.parallel, n_batch=d.batch_size, prefill=d.batch_size,
                       tokens=16, threads=physical_cores())
    return run_smoke(gguf, shape, timeout=300)


def llama_checks(gguf: Path, smoke) -> list[Check]:
    """llama.cpp's version and system info, the load params decided from them, the decode."""
    from fogline.host import build_has_amx
    from fogline.llama_build import VERSION

    if smoke is None:
        return [Check("llama.cpp", "fail", "llama-cpp-python is not installed: pip install 'fogline[edge]' "
                                           "(or `make setup`)")]
    if smoke.version is None:
        return [Check("llama.cpp", "fail", smoke.summary)]
    out = []
    pinned = smoke.version == VERSION
    out.append(Check("llama.cpp", "ok" if pinned else "fail",
                     f"llama-cpp-python {smoke.version}{'' if pinned else f' (fogline needs {VERSION})'}; "
                     f"{smoke.system_info}"))
    amx = build_has_amx(smoke.system_info or "")
    risky = amx and smoke.use_extra_bufts
    out.append(Check("params", "warn" if amx or not smoke.use_extra_bufts else "ok",
                     f"use_extra_bufts={smoke.use_extra_bufts}: {smoke.decision}"
                     + ("; this may crash in llama_decode" if risky else "")))
    out.append(Check("decode", "ok" if smoke.ok else "fail", f"{gguf.name}: {smoke.summary}"))
    return out


# --------------------------------------------------------------------------- torch, memory


def check_torch() -> Check:
    if importlib.util.find_spec("torch") is None:
        return Check("torch", "ok", "not installed (only `fogline cloud serve` and export need it: "
                                    "pip install 'fogline[cloud]')")
    import torch  # only here: the doctor's torch check

    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return Check("torch", "ok", f"torch {torch.__version__}; devices: {', '.join(devices)}")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _estimate(edge_dir: Path | None, manifest) -> tuple[int | None, str]:
    """quantize/budget.py's resident-memory estimate for the bundle, or why there is none."""
    if manifest is None:
        return None, "no bundle: no estimate"
    config = edge_dir.parent / "cloud" / "config.json"
    if not config.is_file():
        return None, "no estimate (it needs the export's cloud/config.json next to edge/)"
    from fogline.arch import ArchSpec
    from quantize.budget import resident_bytes  # plain Python: works without the quantize extra

    spec = ArchSpec.from_hf_config(json.loads(config.read_text()))
    blocks = manifest.split + (manifest.exit_adapter or {}).get("blocks", 0)
    est = resident_bytes(spec, blocks, manifest.quant)
    return est, f"estimate {est / MiB:.0f} MiB"


def check_memory(smoke, edge_dir: Path | None, manifest, available: int | None = None) -> Check:
    """What the edge needs (measured by the smoke decode; estimated from the bundle) against
    `available` (default: this host's MemAvailable)."""
    from edge_runtime.config import EdgeConfig

    d = EdgeConfig()
    avail = available_memory() if available is None else available
    est, est_text = _estimate(edge_dir, manifest)
    measured = smoke.peak_rss if smoke is not None and smoke.ok else None
    parts = [f"{avail / MiB:.0f} MiB available" if avail is not None else "available memory unknown"]
    if measured is not None:
        parts.append(f"the edge measured {measured / MiB:.0f} MiB after a {d.batch_size}-token prefill in edge "
                     f"serve's default context ({d.parallel} x {d.ctx_size}; its KV cache grows as it fills)")
    parts.append(est_text)
    need = max(x for x in (measured, est, 0) if x is not None)
    if manifest is not None and manifest.budget:
        parts.append(f"exported for a {manifest.budget['budget_bytes'] / MiB:.0f} MiB budget "
                     f"({manifest.budget.get('budget_source', '?')})")
    if avail is None or not need:
        return Check("memory", "warn", "; ".join(parts))
    verdict: Verdict = "fail" if need > avail else "warn" if need > 0.8 * avail else "ok"
    return Check("memory", verdict, "; ".join(parts))


# --------------------------------------------------------------------------- cloud, port


def check_cloud(url: str, token: str, manifest) -> Check:
    """A real handshake with the bundle's fingerprint and K, at the URL the edge would use."""
    from edge_runtime.config import CLOUD_WS_PATH, normalize_cloud_url

    if manifest is None:
        return Check("cloud", "fail", "the handshake carries the bundle's fingerprint and K: give --bundle")
    if not url.startswith(("ws://", "wss://")):
        return Check("cloud", "fail", f"{url}: must be a ws:// or wss:// URL")
    used = normalize_cloud_url(url)
    where = f"{url} -> {used} (no path means {CLOUD_WS_PATH}, as for the edge)" if used != url else used
    try:
        detail = asyncio.run(_handshake(used, token, manifest))
    except FoglineError as e:
        return Check("cloud", "fail", f"{where}: {_explain(e, used, CLOUD_WS_PATH)}")
    return Check("cloud", "ok", f"{where}: {detail}")


async def _handshake(url: str, token: str, manifest) -> str:
    from edge_runtime.cloud_client import CloudLink

    start = time.perf_counter()
    link = CloudLink(url, fingerprint=manifest.fingerprint, split=manifest.split, token=token,
                     connect_timeout=5.0, client_name="fogline-doctor")
    try:
        info = await link.connect()
    finally:
        await link.close()
    ms = (time.perf_counter() - start) * 1000
    return (f"{info.server} serves this bundle (fingerprint {info.fingerprint[:12]}, K={info.split}), "
            f"codecs {', '.join(info.codecs)}, handshake {ms:.0f} ms")


def _explain(e: FoglineError, url: str, ws_path: str) -> str:
    from fogline.wire.errors import AuthError, LinkDown, MismatchError

    if isinstance(e, AuthError):
        return f"the cloud refused the token ({e}); set FOGLINE_EDGE_CLOUD_TOKEN / --cloud-token to its token"
    if isinstance(e, MismatchError):
        return f"wrong bundle for this cloud: {e}; export both halves from the same run"
    if isinstance(e, LinkDown):
        status = asyncio.run(_http_status(url))
        if status == 404:
            return f"HTTP 404: nothing there; the cloud's websocket is at {ws_path} (e.g. {_with_path(url, ws_path)})"
        if status is not None:
            return f"HTTP {status}, not a fogline cloud websocket ({e})"
        return f"unreachable: {e}"
    return str(e)


async def _http_status(url: str) -> int | None:
    """The HTTP status a plain GET of the websocket URL gets (None: nothing answers)."""
    import aiohttp

    parts = urlsplit(url)
    http = urlunsplit(parts._replace(scheme="https" if parts.scheme == "wss" else "http"))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, s.get(http) as r:
            return r.status
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return None


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def check_port(host: str, port: int) -> Check:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the edge's server binds
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return Check("port", "fail", f"{host}:{port} is in use (another edge running? pick --port)")
            return Check("port", "fail", f"cannot listen on {host}:{port}: {e.strerror}")
    return Check("port", "ok", f"{host}:{port} is free")
