"""What llama.cpp should be told on this host, decided from facts alone.

On virtualised Sapphire/Granite Rapids hosts (the common x86 cloud VM) the
AMX "extra buffer type" of the llama.cpp that llama-cpp-python 0.3.36 builds
natively crashes on the first `llama_decode` (llama.cpp issue 20824; Ollama
17006/17205/17249). A build that has AMX says `AMX_INT8 = 1` in
`llama_print_system_info()`, so the decision needs nothing but that string:
with AMX in the build, every load passes `use_extra_bufts = False`. That also
turns off CPU_REPACK (llama.cpp has one switch for all extra buffer types),
which costs decode speed on some quant types (docs/boards.md has the
measurements), so every other build keeps the extra buffer types.

Pure functions (strings in, a decision out) so the table is pinned by tests;
`edge_runtime.llama_backend` applies it to every model load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fogline.errors import ConfigError

EXTRA_BUFTS_ENV = "FOGLINE_LLAMA_EXTRA_BUFTS"
_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class LoadDecision:
    """llama_model_params fogline sets on every load, and why (printed by `fogline doctor`)."""

    use_extra_bufts: bool
    reason: str
    # True when the choice came from FOGLINE_LLAMA_EXTRA_BUFTS rather than the system info.
    overridden: bool = False
    # True when the automatic rule turned the extra buffer types off (worth one WARNING).
    guarded: bool = False


def system_features(system_info: str) -> dict[str, str]:
    """Parse llama.cpp's system info ("CPU : SSE3 = 1 | AMX_INT8 = 1 | REPACK = 1 | ...")."""
    features: dict[str, str] = {}
    for part in system_info.replace("\n", "|").split("|"):
        if "=" not in part:
            continue
        key, _, value = part.rpartition("=")
        key = key.rsplit(":", 1)[-1].strip()  # "CPU : SSE3" -> "SSE3"
        if key:
            features[key] = value.strip()
    return features


def build_has_amx(system_info: str) -> bool:
    return system_features(system_info).get("AMX_INT8") == "1"


def decide_load(system_info: str, env: Mapping[str, str]) -> LoadDecision:
    """The model params for a llama.cpp whose system info is `system_info`.

    `env[FOGLINE_LLAMA_EXTRA_BUFTS]`: "on" / "off" force the extra buffer types
    (AMX and CPU_REPACK) on or off; "auto" or unset: off exactly when the build
    has AMX. Anything else is a ConfigError.
    """
    raw = env.get(EXTRA_BUFTS_ENV, "").strip().lower() or "auto"
    if raw not in _CHOICES:
        raise ConfigError(f"{EXTRA_BUFTS_ENV}={env[EXTRA_BUFTS_ENV]!r}: must be one of {', '.join(_CHOICES)}")
    amx = build_has_amx(system_info)
    if raw != "auto":
        on = raw == "on"
        risk = " (this build has AMX, which crashes on virtualised Sapphire/Granite Rapids)" if on and amx else ""
        return LoadDecision(on, f"{EXTRA_BUFTS_ENV}={raw}{risk}", overridden=True)
    if amx:
        return LoadDecision(False, "this llama.cpp build has AMX (AMX_INT8 = 1), whose extra buffer type crashes "
                                   "on virtualised Sapphire/Granite Rapids: extra buffer types (AMX, CPU_REPACK) off; "
                                   "rebuild without AMX to keep CPU_REPACK (python -m fogline.llama_build)",
                            guarded=True)
    repack = " (CPU_REPACK kept)" if system_features(system_info).get("REPACK") == "1" else ""
    return LoadDecision(True, f"no AMX in this llama.cpp build: extra buffer types on{repack}")
