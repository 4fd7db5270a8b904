"""tools/bench_capacity.py end to end on a tiny configuration: real cloud, real full model, real
edge recording, replay through the WAN emulator; the JSON has the promised shape and real numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tools.loadgen import load_traces

REPO = Path(__file__).resolve().parent.parent
MODES = ("cloud-only", "collab", "spec", "cloud")


@pytest.mark.slow
def test_bench_capacity_tiny(demo_bundle, tmp_path, subprocess_env):
    out, traces = tmp_path / "cap.json", tmp_path / "traces.msgpack"
    cmd = [sys.executable, "-m", "tools.bench_capacity", "--bundle", str(demo_bundle), "--sessions", "1,2",
           "--tokens", "8", "--prompts", "1", "--stagger", "0.1", "--traces", str(traces), "--no-reference",
           "--json", str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sessions at p95 ITL <= 150 ms" in r.stdout, r.stdout[-2000:]

    result = json.loads(out.read_text())
    assert set(result["sessions_at_slo"]) == {"150", "300"}
    for per in result["sessions_at_slo"].values():
        assert set(per) == set(MODES)
        assert all(n in (0, 1, 2) for n in per.values())
    recorded, meta = load_traces(traces)
    assert meta["ignore_eos"] is False  # default: answers end where the model ends them
    per_trace = {t.mode: t.tokens for t in recorded}
    rows = result["rows"]
    assert {(row["mode"], row["sessions"]) for row in rows} <= {(m, n) for m in MODES for n in (1, 2)}
    assert {row["mode"] for row in rows} == set(MODES)
    for row in rows:
        # each simulated edge made its request's tokens, from a real run: positive, finite, no errors
        assert row["errors"] == 0, row
        if row["mode"] == "cloud-only":  # the whole model makes as many tokens as the split's answer has
            assert row["tokens"] == max(t.generated for t in recorded) * row["sessions"], row
        else:  # a replay reproduces the recorded edge's tokens exactly
            assert row["tokens"] == per_trace[row["mode"]] * row["sessions"], row
        assert row["reply_mismatches"] == 0, row
        for key in ("p50_itl_ms", "p95_itl_ms", "tok_s", "cloud_cpu_s_per_tok", "wall_s", "p95_ttft_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["p95_itl_ms"] >= row["p50_itl_ms"]
        if row["mode"] in ("cloud", "cloud-only"):
            assert row["p50_itl_ms"] >= 20.0, row  # every token costs the 20 ms round trip
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    compute = result["compute_bound"]
    assert set(compute) == set(MODES) and compute["cloud"]["ratio_to_cloud_only"] > 1.0, compute
    assert compute["spec"]["head_rows_per_token"] >= 1.0 and compute["collab"]["head_rows_per_token"] <= 1.0 + 1e-9

    # the compute bound counts the recorded rows: cloud mode sends every position (the prompt's and
    # the generated ones) through the deep layers and scores one row per token, as cloud-only does
    # through all layers, so on answers of the same length its ratio lies between 1 and L / (L - K)
    from fogline.arch import ArchSpec
    from tools.bench_capacity import PROMPTS, chat_ids, cloud_compute
    (cloud_trace,) = [t for t in recorded if t.mode == "cloud"]
    assert 1 <= cloud_trace.tokens <= cloud_trace.generated <= 8
    spec = ArchSpec.from_hf_config(json.loads((demo_bundle / "cloud" / "config.json").read_text()))
    same = cloud_compute({"cloud": [cloud_trace]}, {PROMPTS[0]: chat_ids(demo_bundle, PROMPTS[:1])[0]}, 8, spec, 20)
    cloud, base = same["cloud"], same["cloud-only"]
    assert abs(cloud["deep_rows_per_token"] - base["deep_rows_per_token"]) <= 1.0 / cloud_trace.generated + 1e-9
    assert cloud["head_rows_per_token"] == pytest.approx(1.0), same
    assert 1.0 < cloud["ratio_to_cloud_only"] < 30 / (30 - 20), same

    # the recording is real edge traffic: frames with h_K, replies, and think time between events
    assert {t.mode for t in recorded} == {"collab", "spec", "cloud"}
    for t in recorded:
        assert 1 <= t.tokens <= t.generated <= 8
        assert any(e.kind == "send" for e in t.events) and any(e.kind == "recv" for e in t.events)
        assert sum(e.dt for e in t.events) > 0
