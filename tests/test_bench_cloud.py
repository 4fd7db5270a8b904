"""tools/bench_cloud.py end to end on the demo model: (a) fogline's runtime over the whole model
against HF generate, same greedy tokens; (b) real `fogline cloud serve` sessions concurrent and one
at a time; the JSON it writes carries the printed figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_cloud_small(demo_bundle, tmp_path, subprocess_env):
    out = tmp_path / "cloud.json"
    cmd = [sys.executable, "tools/bench_cloud.py", "--bundle", str(demo_bundle), "--sessions", "1,4", "--repeats", "1",
           "--new-tokens", "8", "--prefill", "8", "--decode-steps", "4", "--skip-c", "--json", str(out),
           "--b-fast-gemv", "eager,fast_gemv"]
    r = subprocess.run(cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(a) whole model" in r.stdout and "(b) deep layers" in r.stdout
    report = json.loads(out.read_text())
    a = report["a"]
    assert a["served"]["same_tokens_as_hf"] == "8/8", a  # float32, greedy: the same model
    assert all(math.isfinite(a[k]["median_ms"]) and a[k]["median_ms"] > 0 for k in ("hf", "served", "dense"))
    eager, fast = report["b"]  # both server configs, served side by side
    assert (eager["fast_gemv"], fast["fast_gemv"]) == (False, True)
    for b in (eager, fast):
        rows = b["servers"]["this"]["rows"]
        assert [row["sessions"] for row in rows] == [1, 4] and b["split"] == 20
        for row in rows:
            assert row["concurrent_tok_s"] > 0 and row["one_at_a_time_tok_s"] > 0
            assert row["ratio"] == pytest.approx(row["concurrent_tok_s"] / row["one_at_a_time_tok_s"])
        assert rows[1]["sessions_per_pass"] > 1.0  # four concurrent sessions share passes
    assert "fast_gemv / eager" in r.stdout
    assert "c" not in report
