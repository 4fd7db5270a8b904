"""tools/bench_collab.py: spec's pipeline bound (bound_ratio per RTT in the JSON) and the opt-in
per-event timeline of one spec request, end to end on the demo bundle; the bound's arithmetic."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench_collab import _spec_bound, _timeline_summary

REPO = Path(__file__).resolve().parent.parent


def test_spec_bound_arithmetic():
    # 2 verifies of 4 drafts, 6 accepted: 4 tokens per cycle; draft 10 ms/step, verify 70 ms at RTT 50
    specs = [{"verifies": 1, "drafted": 4, "accepted": 4, "verify_s": 0.07, "draft_s": 0.04, "draft_steps": 4},
             {"verifies": 1, "drafted": 4, "accepted": 2, "verify_s": 0.07, "draft_s": 0.04, "draft_steps": 4}]
    b = _spec_bound(specs, 0.05, 0.035)
    assert b["tokens_per_cycle"] == 4 and b["gamma"] == 4
    assert b["t_verify_ms"] == pytest.approx(20.0)
    assert b["bound_ms_per_tok"] == pytest.approx(70 / 4)  # max(4·10, 70) / 4
    assert b["bound_ratio"] == pytest.approx(35 / 17.5)
    assert math.isnan(_spec_bound([], 0.05, 0.03)["bound_ratio"])


def test_timeline_summary_idle_and_wakeup():
    ev = [["draft", 0.0, 1], ["draft", 0.01, 2], ["verify_sent", 0.011, 2], ["draft", 0.02, 3],
          ["verdict", 0.071, 2], ["kept", 0.073, 2], ["token", 0.073, "draft"]]
    s = _timeline_summary(ev, 0.05)
    assert s["verifies"] == 1 and s["kept"] == 1 and s["rolled_back"] == 0
    assert s["verify_rt_ms"] == pytest.approx(60.0)
    assert s["verdict_to_applied_ms"] == pytest.approx(2.0)
    assert s["idle_waiting_verdict_s"] == pytest.approx(0.051)  # last draft 0.02 -> verdict 0.071


@pytest.mark.slow
def test_bench_collab_json_carries_bound_ratio(demo_bundle, subprocess_env, tmp_path):
    out, tl = tmp_path / "collab.json", tmp_path / "timeline.json"
    r = subprocess.run([sys.executable, "-m", "tools.bench_collab", "--bundle", str(demo_bundle), "--rtt", "20",
                        "--prompts", "1", "--tokens", "12", "--json", str(out), "--timeline", str(tl)],
                       capture_output=True, text=True, env=subprocess_env, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    spec = json.loads(out.read_text())["20"]["spec"]
    assert spec["bound_ratio"] > 0 and spec["bound_ms_per_tok"] > 0 and spec["tokens_per_cycle"] >= 1
    assert spec["bound_ratio"] == pytest.approx(spec["spec_ms_per_tok"] / spec["bound_ms_per_tok"])
    assert "bound_ratio" in r.stdout
    events = json.loads(tl.read_text())["20"]["events"]
    kinds = {e[0] for e in events}
    assert {"draft", "verify_sent", "verdict", "token"} <= kinds and kinds & {"kept", "rolled_back", "settled"}


def test_timeline_off_by_default_costs_nothing():
    from edge_runtime.engine import FoglineStats

    s = FoglineStats(mode="spec")
    s.mark("draft", 3)
    assert s.timeline is None and "timeline" not in s.as_dict() and "spec" not in s.as_dict()
    s = FoglineStats(mode="spec", timeline=[])
    s.mark("draft", 3)
    assert s.as_dict()["timeline"][0][0] == "draft"
