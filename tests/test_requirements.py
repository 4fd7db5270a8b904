"""fogline.requirements: what `make` installs beside the llama.cpp build, from the real pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from fogline import requirements as req

EXTRAS = tomllib.loads(req.PYPROJECT.read_text())["project"]["optional-dependencies"]


def _names(lines: list[str]) -> set[str]:
    return {req._canonical(req._NAME.match(line).group(0)) for line in lines}


def test_the_demo_set_is_edge_cloud_and_quantize_without_the_llama_build():
    lines = req.requirements(EXTRAS, ["demo"], {"llama_cpp_python"})
    names = _names(lines)
    assert {"torch", "transformers", "aiohttp", "gguf", "llguidance", "msgpack"} <= names
    assert "llama-cpp-python" not in names and "ray" not in names and "pytest" not in names
    assert len(lines) == len(set(lines))  # each requirement once, though three extras name msgpack
    expected = {r for e in ("edge", "cloud", "quantize") for r in EXTRAS[e] if not r.startswith("llama-cpp-python")}
    expected.add(next(r for r in EXTRAS["dev"] if r.startswith("openai")))  # tools/demo.py asks through it
    assert set(lines) == expected


def test_all_expands_the_self_references():
    names = _names(req.requirements(EXTRAS, ["all", "dev"]))
    assert {"ray", "matplotlib", "openai", "llama-cpp-python", "torch"} <= names
    assert not any(line.startswith("fogline") for line in req.requirements(EXTRAS, ["all"]))


def test_unknown_extras_and_cycles_are_errors():
    with pytest.raises(KeyError, match="no extra 'nope'"):
        req.requirements(EXTRAS, ["nope"])
    with pytest.raises(ValueError, match="cycle"):
        req.requirements({"a": ["fogline[b]"], "b": ["fogline[a]"]}, ["a"])
    r = subprocess.run([sys.executable, "-m", "fogline.requirements", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "no extra 'nope'" in r.stderr and r.stdout == ""
