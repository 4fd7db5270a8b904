"""PNG figures: the shared drawing helpers, and the exit calibration curve (`fogline inspect --plot`).

matplotlib is imported only when a figure is drawn, so this module is importable
wherever `fogline/` is (no torch, no matplotlib needed to import it); a missing
matplotlib is a ConfigError that names the extra to install. The benchmark
figures live in tools/plots.py on top of these helpers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fogline.errors import ConfigError

# one colour per mode / curve, kept the same across figures (matplotlib's tab10)
COLOURS = {"edge": "#2ca02c", "collab": "#ff7f0e", "spec": "#9467bd", "cloud": "#1f77b4",
           "cloud-only": "#7f7f7f", "naive split": "#d62728"}


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("drawing a PNG needs matplotlib: pip install 'fogline[plots]'") from None
    return plt


def figure(n_panels: int, title: str) -> tuple[Any, list[Any]]:
    plt = pyplot()
    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 4.6), squeeze=False)
    fig.suptitle(title, fontsize=12)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return fig, list(axes[0])


def save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write the PNG atomically (a temporary sibling renamed into place) and free the figure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")  # keeps legends placed outside the axes
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        pyplot().close(fig)
    return path


def calibration_curves(curves: Sequence[tuple[str, dict[str, Any]]], path: str | os.PathLike[str],
                       title: str) -> Path:
    """Exit calibration, one curve per (label, manifest `calibration`): the agreement of exited
    tokens with the full model against the share of tokens that exit, and the share against τ;
    the target agreement dashed, each curve's default τ ringed."""
    if not curves:
        raise ConfigError("no calibration to plot")
    fig, (trade, rate) = figure(2, title)
    target = None
    for label, cal in curves:
        pts = sorted(cal["curve"], key=lambda p: p["tau"])
        tau = [p["tau"] for p in pts]
        exit_rate = [100 * p["exit_rate"] for p in pts]
        agree = [float("nan") if p.get("agreement") is None else 100 * p["agreement"] for p in pts]
        line, = trade.plot(exit_rate, agree, marker=".", label=label)
        rate.plot(tau, exit_rate, marker=".", color=line.get_color(), label=label)
        default = next((p for p in pts if p["tau"] == cal.get("default_tau")), None)
        if default is not None and default.get("agreement") is not None:
            trade.plot([100 * default["exit_rate"]], [100 * default["agreement"]], "o", ms=11, mfc="none",
                       color=line.get_color())
            rate.plot([default["tau"]], [100 * default["exit_rate"]], "o", ms=11, mfc="none", color=line.get_color())
        target = cal.get("target_agreement", target)
    if target is not None:
        trade.axhline(100 * target, ls="--", color="#555", lw=1, label=f"target {target:.0%}")
    trade.set(xlabel="tokens that exit at the edge (%)", ylabel="agreement of exited tokens with the full model (%)",
              xlim=(-1, 102))
    rate.set(xlabel="confidence threshold τ", ylabel="tokens that exit at the edge (%)", xlim=(-0.02, 1.02),
             ylim=(0, 102))
    trade.legend(fontsize=9)
    rate.legend(fontsize=9, title="circle: default τ", title_fontsize=8)
    return save(fig, path)
