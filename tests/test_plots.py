"""The PNG figures: each benchmark's drawing from its JSON shape, `fogline inspect --plot` end to
end on a real bundle, atomic writes, and matplotlib staying out of the import path until a
figure is drawn (the edge extra does not carry it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


from tests.edge_server_util import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def _curve(shift: float) -> list[dict]:
    """A calibration curve shaped like the manifest's: exit rate falls and agreement rises with τ."""
    return [{"tau": t / 10, "exit_rate": round(1 - t / 10 * (1 - shift), 4), "agreement": round(0.5 + t / 25, 4)}
            for t in range(11)]


def _calibration(shift: float = 0.0) -> dict:
    return {"curve": _curve(shift), "default_tau": 0.8, "target_agreement": 0.95, "positions": 6430,
            "agreement_top1": 0.58, "exit_rate_at_target": 0.28, "spec_mean_accepted": 2.15}


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 10_000 and not list(path.parent.glob(f".{path.name}.tmp"))


def test_benchmark_figures(tmp_path):
    from tools import plots

    modes = ("edge", "collab", "spec", "cloud", "cloud-only", "naive split")
    collab = {str(rtt): {mode: {"wall_s": 0.5 + k * rtt / 100, "itl_ms": 10 + k * rtt / 4}
                         for k, mode in enumerate(modes)} for rtt in (20, 50, 100)}
    assert _is_png(plots.latency_vs_rtt(collab, tmp_path / "collab.png", 20.0))
    rows = [{"K": k, "quant": "Q8_0", "blocks": 1, "edge_compute_fraction": f, "answers": 50, "positions": 6430,
             "adapter": _calibration(), "curve": _curve(s)} for k, f, s in ((10, 0.5, 0.0), (20, 0.76, 0.3))]
    assert _is_png(plots.exit_calibration(rows, tmp_path / "exit.png", 0.95))
    edge = {"threads": 2, "streams": [1, 2, 4, 8], "single": {"a": {"decode_tps": 80.0, "prompt_tps": 900.0}},
            "aggregate": {"raw": [90, 160, 260, 330], "engine": [75, 130, 210, 260], "http": [70, 120, 190, 240]}}
    assert _is_png(plots.tokens_vs_streams(edge, tmp_path / "edge.png"))
    trees = {"diverse": {"answers": 67, "positions": 7400},
             "diverse_trees": [{"widths": w, "nodes": n, "depth": len(w), "tokens_per_round": t}
                               for w, n, t in (([1] * 4, 4, 1.95), ([1] * 8, 8, 2.0), ([2, 1, 1, 1], 8, 2.2))]}
    assert _is_png(plots.draft_trees(trees, tmp_path / "trees.png"))


def _fogline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fogline.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_inspect_plot(demo_bundle, tmp_path):
    # the demo bundle has no adapter, so no calibration: a clear error, exit 2, nothing written
    out = tmp_path / "none.png"
    r = _fogline("inspect", str(demo_bundle), "--plot", str(out))
    assert r.returncode == 2 and "no exit calibration" in r.stderr and not out.exists()
    # the same bundle's edge half with a calibration in its manifest (not a hashed file)
    edge = tmp_path / "edge"
    shutil.copytree(demo_bundle / "edge", edge)
    m = json.loads((edge / "manifest.json").read_text())
    m["calibration"] = _calibration()
    (edge / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "calib.png"
    r = _fogline("inspect", str(edge), "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert f"plot         {out}" in r.stdout and _is_png(out)


def test_matplotlib_is_imported_only_to_draw():
    code = ("import sys, fogline.plots, fogline.inspect, tools.plots; "
            "assert 'matplotlib' not in sys.modules, 'imported too early'; "
            "fogline.plots.pyplot(); assert 'matplotlib' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)}, timeout=60)
