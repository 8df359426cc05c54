"""Equal-compute comparison of model families: each metric's final value against training FLOPs (6·N·D) per family
and budget, a power law per family, and the FLOP ratio at which a family matches a reference family.

A sweep with ``budgets`` and ``compare: {reference, metrics}`` (``schema.py``) gets ``equal_flops.md`` and
``equal_flops.png`` from :func:`results.collect`, which calls :func:`equal_flops` and the two writers here.
The fit is log(metric) = a + b·log(C) through every seed's (6·N·D, final value) point of a family (the paper's
scaling-curve fits, Transfusion Figure 5); :func:`parity_ratio` solves the family's line for the reference's fitted
value at the reference's largest budget and divides by that budget (Transfusion Table 3: "FLOP ratio to match").
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from lit_transfusion.commands.sweep.direction import arrow, higher_is_better
from lit_transfusion.commands.sweep.panel import finish_panel

FLAT_SLOPE = 1e-3  # |b| of a log-log fit below this: flat, it reaches no other value
FAR = 10.0  # a match at more than FAR times the largest (or below 1/FAR of the smallest) measured compute: flagged


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """``metric = exp(a) · C^b``: the least-squares line log(metric) = a + b·log(C) (natural logs) through
    ``points`` (compute, metric) pairs whose compute spans ``low``..``high``; ``r2`` on the log scale."""

    a: float
    b: float
    r2: float
    points: int
    low: float
    high: float

    def value_at(self, compute: float) -> float:
        return math.exp(self.a + self.b * math.log(compute))

    def compute_at(self, value: float) -> float:
        """The compute at which the fit reaches ``value`` (``b`` must not be 0)."""
        return math.exp((math.log(value) - self.a) / self.b)


def fit_power_law(compute: list[float], values: list[float]) -> PowerLaw:
    """Fit log(value) = a + b·log(compute) (``np.polyfit``) through the pairs whose both numbers are finite.
    ValueError, with the reason, when a power law cannot be fitted: a value or compute <= 0 (no logarithm) or
    fewer than 2 distinct compute values."""
    import numpy as np

    pairs = [(float(c), float(v)) for c, v in zip(compute, values, strict=True)
             if c is not None and v is not None and math.isfinite(c) and math.isfinite(v)]
    if any(c <= 0 for c, _ in pairs):
        raise ValueError("compute <= 0")
    if any(v <= 0 for _, v in pairs):
        raise ValueError(f"values <= 0 (lowest {min(v for _, v in pairs):.4g}): no power law on a log scale")
    if len({c for c, _ in pairs}) < 2:
        raise ValueError(f"{len(pairs)} point(s) at fewer than 2 compute values")
    x, y = np.log([c for c, _ in pairs]), np.log([v for _, v in pairs])
    b, a = np.polyfit(x, y, 1)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - (a + b * x)) ** 2).sum()) / spread if spread > 0 else 1.0
    return PowerLaw(float(a), float(b), r2, len(pairs), min(c for c, _ in pairs), max(c for c, _ in pairs))


@dataclasses.dataclass(frozen=True)
class Parity:
    """Where a family's fit reaches the reference's fitted metric ``target`` at the reference's ``budget``:
    ``compute`` and ``ratio = compute / budget`` (the paper's "FLOP ratio to match": 0.029 means 1/34 of the
    reference's compute). ``ratio`` None: no match, ``reason`` says why. ``extrapolated``: the match lies more than
    ``far`` times beyond the compute the family was measured at."""

    ratio: float | None
    compute: float | None
    target: float
    budget: float
    reason: str = ""
    extrapolated: bool = False


def parity_ratio(family: PowerLaw, reference: PowerLaw, budget: float, higher_is_better: bool,
                 far: float = FAR, flat: float = FLAT_SLOPE) -> Parity:
    """The FLOP ratio at which ``family`` matches ``reference`` (see :class:`Parity`). A fit flatter than ``flat``
    (|b|), or whose slope goes the wrong way (a lower-is-better metric that rises with compute, or the reverse),
    matches nothing: its power law says more compute makes the metric no better."""
    target = reference.value_at(budget)
    if abs(family.b) < flat:
        return Parity(None, None, target, budget, f"flat fit (slope {family.b:+.2g}): never reaches {target:.4g}")
    if (family.b > 0) != higher_is_better:
        way = "rises" if family.b > 0 else "falls"
        return Parity(None, None, target, budget, f"slope {family.b:+.3g}: the metric {way} with compute, the wrong "
                                                  f"way ({'higher' if higher_is_better else 'lower'} is better), so "
                                                  f"more compute never reaches {target:.4g}")
    compute = family.compute_at(target)
    extrapolated = compute > far * family.high or compute < family.low / far
    return Parity(compute / budget, compute, target, budget, extrapolated=extrapolated)


def equal_flops(runs: list[dict], reference: str, metrics: list[str]) -> dict[str, Any]:
    """The equal-compute analysis of a sweep's finished budget runs: {"reference", "metrics", "families":
    {family: {budget: [runs]}}, "fits": {metric: {family: PowerLaw | reason}}, "parity": {metric: {family: Parity
    | reason}}, "budget": the reference's largest budget (None without reference runs)}. Each fit goes through
    every seed's (flops_6nd, final value) point."""
    families: dict[str, dict[float, list[dict]]] = {}
    for r in runs:
        if r["status"] == "finished" and r.get("budget") is not None:
            families.setdefault(r["family"], {}).setdefault(float(r["budget"]), []).append(r)
    families = {f: dict(sorted(b.items())) for f, b in families.items()}
    budget = max(families[reference]) if reference in families else None
    fits: dict[str, dict[str, Any]] = {}
    parity: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        fits[metric], parity[metric] = {}, {}
        for family, by_budget in families.items():
            points = [(r["flops_6nd"], r["final"].get(metric), b) for b, rs in by_budget.items() for r in rs
                      if r["flops_6nd"] and r["final"].get(metric) is not None]
            if len({b for _, _, b in points}) < 2:
                fits[metric][family] = f"fewer than 2 budgets with {metric} ({len(points)} run(s))"
                continue
            try:
                fits[metric][family] = fit_power_law([c for c, _, _ in points], [v for _, v, _ in points])
            except ValueError as e:
                fits[metric][family] = str(e)
        ref = fits[metric].get(reference, f"no finished runs of the reference {reference!r}")
        for family, fit in fits[metric].items():
            if isinstance(fit, str):
                parity[metric][family] = fit
            elif isinstance(ref, str):
                parity[metric][family] = f"reference: {ref}"
            else:
                parity[metric][family] = parity_ratio(fit, ref, budget, higher_is_better(metric))
    return {"reference": reference, "metrics": metrics, "families": families, "fits": fits, "parity": parity,
            "budget": budget}


def _spread(values: list) -> str:
    """``mean [min, max]`` of the known values, 4 significant digits; one value alone; — for none."""
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return "—"
    mean = statistics.fmean(known)
    return f"{mean:.4g}" if len(known) == 1 else f"{mean:.4g} [{min(known):.4g}, {max(known):.4g}]"


def write_equal_flops_markdown(analysis: dict, path: Path, title: str = "sweep") -> None:
    """equal_flops.md: the runs per family and budget, then per metric each family's fit and FLOP ratio."""
    reference, metrics, budget = analysis["reference"], analysis["metrics"], analysis["budget"]
    lines = [f"# Equal compute: {title}", "",
             "Training compute C = 6·N·D (N: the parameters a position uses; D: the non-pad positions trained on, "
             "each text token, image patch or image code counting one) and measured (FlopCounterMode on the first "
             "step × steps). Compute and metrics (final validation values): mean over the finished seeds [lowest, "
             "highest]; ↓ lower is better, ↑ higher.", "",
             "| family | budget | seeds | steps | C = 6·N·D | measured FLOPs | "
             + " | ".join(f"{m} {arrow(m)}" for m in metrics) + " |",
             "|" + "---|" * (6 + len(metrics))]
    for family, by_budget in analysis["families"].items():
        for b, rs in by_budget.items():
            cells = [family, f"{b:.4g}", ", ".join(str(r["seed"]) for r in rs),
                     "/".join(sorted({str(r["steps"]) for r in rs}, key=int)),
                     _spread([r["flops_6nd"] for r in rs]), _spread([r["flops_measured"] for r in rs])]
            cells += [_spread([r["final"].get(m) for r in rs]) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    if not analysis["families"]:
        lines += ["", "No finished runs with a budget."]
    lines += ["", f"## FLOP ratio to match `{reference}`", "",
              "Per family, log(metric) = a + b·log(C) fitted (least squares) through every seed's point. The "
              "target is the reference's fitted value at its largest budget C* = "
              + (f"{budget:.4g}" if budget is not None else "— (no finished reference runs)")
              + "; the ratio is the compute at which the family's fit reaches it, divided by C* (below 1: the "
              "family needs less compute than the reference; the paper's Table 3 has Transfusion matching "
              f"Chameleon's FID at 0.029×). ⚠: the match lies more than {FAR:g}× beyond the family's measured "
              "compute (an extrapolation). n/a: why there is no ratio.", "",
              "| metric | family | a | b | R² | points | target | ratio to match | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for metric in metrics:
        for family, fit in analysis["fits"][metric].items():
            result = analysis["parity"][metric][family]
            name = f"{family} (reference)" if family == reference else family
            if isinstance(fit, str):
                lines.append(f"| {metric} {arrow(metric)} | {name} | — | — | — | — | — | n/a | {fit} |")
                continue
            head = (f"| {metric} {arrow(metric)} | {name} | {fit.a:.4g} | {fit.b:.4g} | {fit.r2:.3f} | {fit.points} "
                    f"| ")
            if isinstance(result, str):
                lines.append(head + f"— | n/a | {result} |")
            elif result.ratio is None:
                lines.append(head + f"{result.target:.4g} | n/a | {result.reason} |")
            else:
                note = (f"matches at C = {result.compute:.4g}, beyond the measured {fit.low:.4g}–{fit.high:.4g}"
                        if result.extrapolated else f"matches at C = {result.compute:.4g}")
                flag = " ⚠" if result.extrapolated else ""
                lines.append(head + f"{result.target:.4g} | {result.ratio:.3g}×{flag} | {note} |")
    path.write_text("\n".join(lines) + "\n")


def write_equal_flops_figure(analysis: dict, path: Path) -> None:
    """equal_flops.png: a panel per metric, final value against training FLOPs (log-log where every value is
    positive); per family each seed's point at 6·N·D (filled) and at the measured FLOPs (hollow), and its fit."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import FuncFormatter

    metrics = analysis["metrics"]
    fig = Figure(figsize=(5.2 * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        values = []
        for i, (family, by_budget) in enumerate(analysis["families"].items()):
            color = f"C{i % 10}"
            rs = [r for b_runs in by_budget.values() for r in b_runs if r["final"].get(metric) is not None]
            ys = [r["final"][metric] for r in rs]
            values += ys
            fit = analysis["fits"][metric].get(family)
            result = analysis["parity"][metric].get(family)
            label = family + (" (reference)" if family == analysis["reference"] else "")
            if isinstance(result, Parity) and result.ratio is not None:
                label += f": b={fit.b:.3g}, ×{result.ratio:.3g}" + (" ⚠" if result.extrapolated else "")
            elif isinstance(fit, PowerLaw):
                label += f": b={fit.b:.3g}, n/a"
            ax.plot([r["flops_6nd"] for r in rs], ys, "o", color=color, label=label)
            measured = [(r["flops_measured"], y) for r, y in zip(rs, ys, strict=True) if r["flops_measured"]]
            if measured:
                ax.plot(*zip(*measured, strict=True), "s", mfc="none", color=color)
            if isinstance(fit, PowerLaw):
                xs = np.geomspace(fit.low, fit.high, 20)
                ax.plot(xs, [fit.value_at(x) for x in xs], "-", color=color, lw=1)
                if isinstance(result, Parity) and result.ratio is not None and not result.extrapolated:
                    xs = np.geomspace(min(fit.high, result.compute), max(fit.low, result.compute), 20)
                    ax.plot(xs, [fit.value_at(x) for x in xs], ":", color=color, lw=1)
        target = next((p for p in analysis["parity"][metric].values() if isinstance(p, Parity)), None)
        if target is not None:
            ax.axhline(target.target, color="grey", ls="--", lw=0.8)
            ax.plot([target.budget], [target.target], "*", color="black", ms=10,
                    label=f"target: reference fit at C* = {target.budget:.3g}")
        ax.set_xscale("log")
        if values and min(values) > 0:
            ax.set_yscale("log")
            if max(values) < 10 * min(values):  # under a decade: plain numbers, not 8.3×10⁰
                plain = FuncFormatter(lambda v, _: f"{v:.3g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
        finish_panel(ax, "training FLOPs (filled: 6·N·D, hollow: measured)", f"final {metric} {arrow(metric)}",
                     bool(values), f"no {metric} in any finished budget run", which="both")
    fig.suptitle(f"{path.parent.name}: equal compute, reference {analysis['reference']}")
    fig.savefig(path, dpi=100)
