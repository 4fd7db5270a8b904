"""tools/bench_edge.py --quick end to end: it runs every variant once and writes the TTFT of
fogline's edge endpoint (and of llama_cpp.server beside it, where llama-cpp-python's [server]
extra is installed) into its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_edge_quick_writes_ttft_fields(demo_bundle, subprocess_env, tmp_path):
    out = tmp_path / "edge.json"
    r = subprocess.run([sys.executable, str(REPO / "tools/bench_edge.py"), "--bundle", str(demo_bundle / "edge"),
                        "--threads", "1", "--quick", "--json", str(out)],
                       capture_output=True, text=True, env=subprocess_env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ttft = json.loads(out.read_text())["ttft"]
    fog = ttft["fogline"]
    assert fog["n"] == 3 and 0 < fog["p50_ms"] <= fog["p95_ms"] < 60_000
    assert "TTFT, short chat prompt" in r.stdout
    if "llama_cpp.server" in ttft:  # the baseline ran: its figures and the ratio are there
        base = ttft["llama_cpp.server"]
        assert base["n"] == 3 and 0 < base["p50_ms"] <= base["p95_ms"]
        assert ttft["ratio_p50"] == pytest.approx(fog["p50_ms"] / base["p50_ms"])
    else:  # it could not start here: the JSON and the print say why
        assert ttft["ratio_p50"] is None and ttft["baseline_missing"]
        assert "llama_cpp.server unavailable" in r.stdout
