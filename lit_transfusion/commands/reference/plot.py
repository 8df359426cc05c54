"""band.png and overlay.png: a panel per metric against step, the band shaded, a run drawn on top."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lit_transfusion.commands.sweep.direction import arrow


def draw(path: Path, rows: list[dict[str, Any]], tags: tuple[str, ...] | list[str], title: str,
         run: dict[str, dict[int, float]] | None = None, run_label: str = "run") -> None:
    """One panel per tag: the seeds' min-max shaded (the band a run is read against), the mean over seeds (line)
    and its Student t 95 % interval (dashed; with few seeds often wider than the seeds' range); with ``run``
    ({tag: {step: value}}) its values on top. One legend for all panels, below them."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    cols = 3
    nrows = math.ceil(len(tags) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.1 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    legend: dict[str, Any] = {}
    for ax, tag in zip(axes, tags, strict=False):
        mine = sorted((r for r in rows if r["tag"] == tag), key=lambda r: r["step"])
        steps = [r["step"] for r in mine]
        if mine:
            legend.setdefault("band", ax.fill_between(steps, [r["min"] for r in mine], [r["max"] for r in mine],
                                                      color="C0", alpha=0.3, linewidth=0))
            (legend["mean"],) = ax.plot(steps, [r["mean"] for r in mine], color="C0", marker="o", ms=2.5, lw=1.2)
            if all(r["low"] is not None and not math.isnan(r["low"]) for r in mine):
                for key in ("low", "high"):
                    (legend["interval"],) = ax.plot(steps, [r[key] for r in mine], color="C0", ls="--", lw=0.8)
        points = sorted((run or {}).get(tag, {}).items())
        if points:
            (legend["run"],) = ax.plot([s for s, _ in points], [v for _, v in points], color="C3", marker="o", ms=3,
                                       lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{tag} {arrow(tag)}")
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {tag} at a step every run has", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(tags):]:
        ax.set_visible(False)
    n = max((r["n"] for r in rows), default=0)
    labels = {"band": f"seed min–max (the band, n = {n})", "mean": "mean over seeds",
              "interval": "95 % interval of the mean (Student t)", "run": run_label}
    keys = [k for k in labels if k in legend]
    if keys:
        fig.legend([legend[k] for k in keys], [labels[k] for k in keys], loc="outside lower center", ncols=len(keys))
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
