"""The edge never imports torch or transformers, not even indirectly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EDGE_MODULES = ["edge_runtime.config", "edge_runtime.errors", "edge_runtime.sampling", "edge_runtime.chat",
                "edge_runtime.engine", "edge_runtime.loader", "edge_runtime.metrics", "edge_runtime.openai_api",
                "edge_runtime.server", "edge_runtime.serve", "edge_runtime.llama_backend", "edge_runtime.hidden_tap",
                "edge_runtime.cloud_client", "edge_runtime.cloud_generation", "edge_runtime.cloud_modes",
                "tools.wanem", "fogline.cli", "fogline.manifest", "fogline.errors", "fogline.host",
                "fogline.llama_build", "fogline.doctor", "fogline.demo_model", "edge_runtime.smoke"]

PROBE = """
import contextlib, importlib, io, sys
for name in {modules!r}:
    importlib.import_module(name)
from fogline.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
    try:
        main(["edge", "serve", "--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
assert "edge" in out.getvalue()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("HEAVY", heavy)
"""


def test_edge_modules_and_cli_help_stay_free_of_torch_and_transformers(subprocess_env):
    r = subprocess.run([sys.executable, "-c", PROBE.format(modules=EDGE_MODULES)], capture_output=True, text=True,
                       env=subprocess_env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout


def test_the_probe_can_see_torch(subprocess_env):
    """The check above would notice: importing torch does show up in sys.modules."""
    r = subprocess.run([sys.executable, "-c", "import sys, torch; print('torch' in sys.modules)"],
                       capture_output=True, text=True, env=subprocess_env, cwd=REPO, timeout=300)
    assert r.stdout.strip() == "True", r.stderr
