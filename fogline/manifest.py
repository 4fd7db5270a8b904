"""Bundle manifests: what an edge or cloud directory holds and how it pairs.

An export writes one `manifest.json` into each half. The runtimes read it (never
infer formats from file names), refuse to load a bundle whose files do not
match their recorded sha256, and refuse to pair halves whose fingerprint or
split differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fogline import __version__
from fogline.errors import BundleError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
Role = Literal["edge", "cloud"]


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to know about one half of a split model."""

    role: Role
    fingerprint: str  # sha256 over the source weights (name, dtype, shape, bytes)
    architecture: str  # "llama" | "qwen2"
    n_layers: int  # L of the source model
    split: int  # K: the edge runs layers [0, K), the cloud [K, L)
    hidden_size: int
    vocab_size: int
    quant: str  # edge: GGUF type ("Q8_0", "F16", ...); cloud: torch dtype name
    files: dict[str, str]  # relative path -> sha256
    source: str = ""
    exit_adapter: dict[str, Any] | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    fogline_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError("manifest.json is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise BundleError(f"manifest.json lacks {', '.join(missing)}")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise BundleError(f"manifest format_version {data.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; re-export the bundle with this fogline")
        m = cls(**{k: v for k, v in data.items() if k in known})
        if m.role not in ("edge", "cloud"):
            raise BundleError(f"manifest role {m.role!r} is neither 'edge' nor 'cloud'")
        for name in ("n_layers", "split", "hidden_size", "vocab_size"):
            value = getattr(m, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BundleError(f"manifest {name}={value!r} is not a non-negative integer")
        if not 0 < m.split < m.n_layers:
            raise BundleError(f"manifest split K={m.split} is outside [1, {m.n_layers - 1}]")
        if not isinstance(m.files, dict) or not m.files:
            raise BundleError("manifest lists no files")
        return m


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write atomically: a crash leaves either the old manifest or the new one."""
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, directory / MANIFEST_NAME)


def load_manifest(directory: str | os.PathLike[str], role: Role | None = None) -> Manifest:
    """Read and validate a bundle's manifest (file hashes are checked separately)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a bundle directory")
    if not path.is_file():
        raise BundleError(f"{directory} has no {MANIFEST_NAME}; is it an export output?")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    m = Manifest.from_dict(data)
    if role is not None and m.role != role:
        raise BundleError(f"{directory} is a {m.role} bundle, expected a {role} bundle")
    return m


def verify_files(directory: str | os.PathLike[str], manifest: Manifest) -> list[str]:
    """Return one line per file that is missing or whose sha256 differs."""
    directory = Path(directory)
    problems = []
    for rel, expected in sorted(manifest.files.items()):
        p = directory / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif (actual := sha256_file(p)) != expected:
            problems.append(f"{rel}: sha256 {actual[:12]}… != manifest {expected[:12]}…")
    return problems


def check_pair(edge: Manifest, cloud: Manifest) -> None:
    """Refuse to pair halves that were not exported together."""
    if edge.fingerprint != cloud.fingerprint:
        raise BundleError(f"edge fingerprint {edge.fingerprint[:12]} != cloud fingerprint "
                          f"{cloud.fingerprint[:12]}: the bundles come from different models")
    if edge.split != cloud.split:
        raise BundleError(f"edge split K={edge.split} != cloud split K={cloud.split}")
