"""The benchmarks' PNG figures, written next to their JSON (one call per benchmark).

    latency_vs_rtt(results, path)        tools/bench_collab.py: per mode, latency against the link's RTT
    exit_calibration(rows, path, target) tools/bench_exit.py: the exit calibration curve per split
    tokens_vs_streams(result, path)      tools/bench_edge.py: aggregate tokens/s against concurrent streams
    draft_trees(result, path)            tools/bench_exit.py --bundle: spec tokens per round trip per draft tree

Drawing helpers and the calibration curve are shared with `fogline inspect --plot` (fogline/plots.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fogline.plots import COLOURS, calibration_curves, figure, save

BASELINE_STYLE = {"ls": "--", "marker": "s"}


def latency_vs_rtt(results: dict[str, dict[str, dict[str, float]]], path: str | os.PathLike[str],
                   mbit: float | None = None) -> Path:
    """bench_collab's {rtt_ms: {mode: row}}: wall time per request and inter-token latency (medians)."""
    rtts = sorted(results, key=float)
    modes = list(dict.fromkeys(m for r in rtts for m in results[r]))
    link = f", {mbit:g} Mbit/s" if mbit else ""
    fig, (wall, itl) = figure(2, f"latency vs round-trip time per mode (medians{link})")
    for mode in modes:
        xs = [float(r) for r in rtts if mode in results[r]]
        style = BASELINE_STYLE if mode in ("cloud-only", "naive split") else {"marker": "o"}
        for ax, key in ((wall, "wall_s"), (itl, "itl_ms")):
            ax.plot(xs, [results[r][mode][key] for r in rtts if mode in results[r]], label=mode,
                    color=COLOURS.get(mode), **style)
    wall.set(xlabel="RTT (ms)", ylabel="wall time per request (s)")
    itl.set(xlabel="RTT (ms)", ylabel="inter-token latency (ms)")
    for ax in (wall, itl):
        ax.set_ylim(bottom=0)
        ax.set_xticks([float(r) for r in rtts])
    fig.legend(*wall.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(modes),
               fontsize=9, frameon=False)  # below both panels: no curve hidden behind it
    return save(fig, path)


def exit_calibration(rows: list[dict[str, Any]], path: str | os.PathLike[str], target: float) -> Path:
    """bench_exit's rows (each with the adapter's calibration `curve`): one curve per K, and the
    target agreement the default τ was chosen for."""
    r0 = rows[0]
    title = (f"exit calibration per split ({r0['answers']} held-out answers, {r0['positions']} positions, "
             f"{r0['quant']}, {r0['blocks']}-block adapter)")
    return calibration_curves([(f"K={r['K']} ({r['edge_compute_fraction']:.0%} edge compute)",
                                {**r["adapter"], "curve": r["curve"], "target_agreement": target}) for r in rows],
                              path, title)


def tokens_vs_streams(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """bench_edge's {"streams": [...], "aggregate": {where: [tok/s per stream count]}, "single": {...}}."""
    streams = result["streams"]
    labels = {"raw": "raw llama_decode (no sampling)", "engine": "fogline engine", "http": "fogline over HTTP"}
    n = result["threads"]
    fig, (ax,) = figure(1, f"edge throughput vs concurrent streams ({n} thread{'s' * (n != 1)}, medians)")
    for where, values in result["aggregate"].items():
        ax.plot(streams, values, marker="o", label=labels.get(where, where), ls=":" if where == "raw" else "-")
    plain = result["single"].get("a")
    if plain is not None:
        ax.axhline(plain["decode_tps"], ls="--", color="#7f7f7f", lw=1,
                   label=f"llama-cpp-python, 1 stream, decode only: {plain['decode_tps']:.1f}")
    ax.set(xlabel="concurrent streams", ylabel="completion tokens/s (all streams)")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(streams)
    ax.set_xticklabels([str(s) for s in streams])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=9)
    return save(fig, path)


def draft_trees(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """bench_exit --bundle's `diverse_trees`: tokens per spec round trip against the nodes drafted (and
    verified) per round; chains joined by a line, trees as labelled points."""
    trees = result["diverse_trees"]
    d = result["diverse"]
    fig, (ax,) = figure(1, f"spec tokens per round trip by draft tree (diverse set, {d['answers']} answers, "
                           f"{d['positions']} positions, greedy replay)")
    chains = [t for t in trees if set(t["widths"]) == {1}]
    ax.plot([t["nodes"] for t in chains], [t["tokens_per_round"] for t in chains], marker="o",
            label="chain (γ = nodes)", color=COLOURS.get("spec"))
    others = [t for t in trees if set(t["widths"]) != {1}]
    ax.scatter([t["nodes"] for t in others], [t["tokens_per_round"] for t in others], marker="s", color="#2ca02c",
               label="tree (children per depth)", zorder=3)
    for i, t in enumerate(others):  # labels alternate below / above their point: neighbours do not overlap
        ax.annotate("(" + ",".join(map(str, t["widths"])) + ")", (t["nodes"], t["tokens_per_round"]),
                    textcoords="offset points", xytext=(4, -11 if i % 2 == 0 else 5), fontsize=8)
    ax.set(xlabel="drafted nodes per round (h_K rows verified)", ylabel="tokens per round trip (incl. the cloud's)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=1)
    ax.legend(fontsize=9)
    return save(fig, path)
