"""What every panel of the sweep's figures (curves.png, equal_flops.png) ends with."""

from __future__ import annotations


def finish_panel(ax, xlabel: str, ylabel: str, drawn: bool, nothing: str, which: str = "major") -> None:
    """Axis labels, a light grid (``which`` ticks), and a legend where something was ``drawn``, else the note
    ``nothing`` in the middle of the panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which=which)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, nothing, ha="center", va="center", transform=ax.transAxes)
