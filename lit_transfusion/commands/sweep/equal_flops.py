"""Equal-compute comparison of model families: each metric's final value against training FLOPs (6·N·D) per family
and budget, a power law per family, and the FLOP ratio at which a family matches a reference family.

A sweep with ``budgets`` and ``compare: {reference, metrics}`` (``schema.py``) gets ``equal_flops.md`` and
``equal_flops.png`` from :func:`results.collect`, which calls :func:`equal_flops` and the two writers here.
The fit is log(metric) = a + b·log(C) through every seed's (6·N·D, final value) point of a family (the paper's
scaling-curve fits, Transfusion Figure 5); :func:`parity_ratio` solves the family's line for the reference's
*observed* value at the reference's largest budget C* (the mean over its seeds there, not its fitted value, which a
poor fit would move) and divides by C* (Transfusion Table 3: "FLOP ratio to match"). The target's interval over
the reference's seeds gives the ratio's interval (solved at both bounds); a target whose interval touches the
metric's floor (``compare.floors``: chance level or control) gives "not resolved" instead of a number.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from lit_transfusion.commands.sweep.claims import claims_markdown
from lit_transfusion.commands.sweep.direction import arrow, higher_is_better
from lit_transfusion.commands.sweep.draws import DRAWS_RULE
from lit_transfusion.commands.sweep.panel import finish_panel
from lit_transfusion.stats import RULE, Interval, mean_interval

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
    """Where a family's fit reaches the reference's observed metric ``target`` at the reference's ``budget``."""

    ratio: float | None
    """``compute / budget``, the paper's "FLOP ratio to match" (0.029: 1/34 of the reference's compute); None: no
    match, ``reason`` says why"""
    compute: float | None
    """the compute at which the family's fit reaches ``target``"""
    target: float
    """the reference's observed value at ``budget`` (mean over its seeds)"""
    budget: float
    """C*: the reference's largest budget"""
    reason: str = ""
    """why there is no ratio (starts with "not resolved" when the floor rule withholds it)"""
    extrapolated: bool = False
    """the match lies more than ``far`` times beyond the compute the family was measured at"""
    target_interval: Interval | None = None
    """(mean, low, high) of the reference's seeds at ``budget``"""
    ratio_interval: tuple[float, float] | None = None
    """the ratios at the target interval's bounds, (low, high); None where a bound is undefined or unreachable"""


def _overlaps(interval: Interval, floor: Interval) -> bool:
    """Whether two (mean, low, high) intervals share a point (an undefined bound: they may)."""
    bounds = (interval[1], interval[2], floor[1], floor[2])
    return any(math.isnan(v) for v in bounds) or (interval[1] <= floor[2] and floor[1] <= interval[2])


def _ratio_interval(family: PowerLaw, interval: Interval | None, budget: float) -> tuple[float, float] | None:
    """The ratios at which the family's fit reaches the target interval's bounds, low first."""
    if interval is None or any(math.isnan(v) or v <= 0 for v in interval[1:]):
        return None
    low, high = sorted(family.compute_at(v) / budget for v in interval[1:])
    return low, high


def parity_ratio(family: PowerLaw, target: float, budget: float, higher_is_better: bool, far: float = FAR,
                 flat: float = FLAT_SLOPE, target_interval: Interval | None = None,
                 floor: Interval | None = None) -> Parity:
    """The FLOP ratio at which ``family`` reaches the reference's observed ``target`` at ``budget`` (see
    :class:`Parity`). A fit flatter than ``flat`` (|b|), or whose slope goes the wrong way (a lower-is-better metric
    that rises with compute, or the reverse), matches nothing: its power law says more compute makes the metric no
    better. With a ``floor``, a ``target_interval`` that touches it gives no ratio ("not resolved")."""
    if floor is not None and target_interval is not None and _overlaps(target_interval, floor):
        return Parity(None, None, target, budget, f"not resolved: the target {_interval_text(target_interval)} is "
                                                  f"within its interval of the floor {_interval_text(floor)}",
                      target_interval=target_interval)
    if not target > 0:  # a power law exp(a)·C^b is positive: a gap of 0 or below (an untrained arm) is never reached
        return Parity(None, None, target, budget, f"target {target:.4g} <= 0: a power law never reaches it",
                      target_interval=target_interval)
    if abs(family.b) < flat:
        return Parity(None, None, target, budget, f"flat fit (slope {family.b:+.2g}): never reaches {target:.4g}",
                      target_interval=target_interval)
    if (family.b > 0) != higher_is_better:
        way = "rises" if family.b > 0 else "falls"
        return Parity(None, None, target, budget, f"slope {family.b:+.3g}: the metric {way} with compute, the wrong "
                                                  f"way ({'higher' if higher_is_better else 'lower'} is better), so "
                                                  f"more compute never reaches {target:.4g}",
                      target_interval=target_interval)
    compute = family.compute_at(target)
    extrapolated = compute > far * family.high or compute < family.low / far
    return Parity(compute / budget, compute, target, budget, extrapolated=extrapolated,
                  target_interval=target_interval, ratio_interval=_ratio_interval(family, target_interval, budget))


def _interval_text(interval: Interval) -> str:
    mean, low, high = interval
    if math.isnan(low) or low == high:
        return f"{mean:.4g}"
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def observed_target(runs: list[dict], metric: str) -> Interval | None:
    """(mean, low, high) over the seeds of the reference's runs at one budget; None without a finite value."""
    values = [float(r["final"][metric]) for r in runs
              if r["final"].get(metric) is not None and math.isfinite(float(r["final"][metric]))]
    return mean_interval(values) if values else None


def _fit(by_budget: dict[float, list[dict]], metric: str) -> PowerLaw | str:
    """A family's power law through every seed's point, or why there is none."""
    points = [(r["flops_6nd"], r["final"].get(metric), b) for b, rs in by_budget.items() for r in rs
              if r["flops_6nd"] and r["final"].get(metric) is not None]
    if len({b for _, _, b in points}) < 2:
        return f"fewer than 2 budgets with {metric} ({len(points)} run(s))"
    try:
        return fit_power_law([c for c, _, _ in points], [v for _, v, _ in points])
    except ValueError as e:
        return str(e)


def equal_flops(runs: list[dict], reference: str, metrics: list[str],
                floors: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The equal-compute analysis of a sweep's finished budget runs: {"reference", "metrics", "families":
    {family: {budget: [runs]}}, "fits": {metric: {family: PowerLaw | reason}}, "parity": {metric: {family: Parity
    | reason}}, "budget": the reference's largest budget (None without reference runs), "floors"}. Each fit goes
    through every seed's (flops_6nd, final value) point; each ratio targets the reference's observed value at
    "budget", with ``floors`` ({metric: [mean, low, high]}) applied to that value's interval."""
    floors = floors or {}
    families: dict[str, dict[float, list[dict]]] = {}
    for r in runs:
        if r["status"] == "finished" and r.get("budget") is not None:
            families.setdefault(r["family"], {}).setdefault(float(r["budget"]), []).append(r)
    families = {f: dict(sorted(b.items())) for f, b in families.items()}
    budget = max(families[reference]) if reference in families else None
    fits: dict[str, dict[str, Any]] = {}
    parity: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        fits[metric] = {family: _fit(by_budget, metric) for family, by_budget in families.items()}
        target = observed_target(families[reference][budget], metric) if budget is not None else None
        floor = tuple(floors[metric]) if metric in floors else None
        parity[metric] = {}
        for family, fit in fits[metric].items():
            if isinstance(fit, str):
                parity[metric][family] = fit
            elif target is None:
                parity[metric][family] = f"reference: no finished runs of {reference!r} with {metric}"
            else:
                parity[metric][family] = parity_ratio(fit, target[0], budget, higher_is_better(metric),
                                                      target_interval=target, floor=floor)
    return {"reference": reference, "metrics": metrics, "families": families, "fits": fits, "parity": parity,
            "budget": budget, "floors": floors}


def _spread(values: list) -> str:
    """``mean [min, max]`` of the known values, 4 significant digits; one value alone; — for none."""
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return "—"
    mean = statistics.fmean(known)
    return f"{mean:.4g}" if len(known) == 1 else f"{mean:.4g} [{min(known):.4g}, {max(known):.4g}]"


def write_equal_flops_markdown(analysis: dict, path: Path, title: str = "sweep", claims: list | None = None,
                               draws: list[str] | None = None) -> None:
    """equal_flops.md: the runs per family and budget, where each family draws (``draws``: the lines of
    ``draws.draws_markdown``), per metric each family's fit and FLOP ratio, then the claims' verdicts
    (``claims.ClaimResult``, judged at equal compute)."""
    reference, metrics = analysis["reference"], analysis["metrics"]
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
    if draws:
        lines += ["", "## Where each family draws", "", DRAWS_RULE, ""] + draws
    lines += ["", f"## FLOP ratio to match `{reference}`", ""] + ratio_table(analysis)
    if claims:
        lines += ["", "## The paper's claims at equal compute", "", RULE, ""] + claims_markdown(claims)
    path.write_text("\n".join(lines) + "\n")


def ratio_cell(result: Parity) -> str:
    """``ratio [low, high]×`` (⚠: extrapolated), "not resolved" under the floor rule, or n/a."""
    if result.ratio is None:
        return "not resolved" if result.reason.startswith("not resolved") else "n/a"
    low_high = result.ratio_interval
    bounds = "" if low_high is None else f" [{low_high[0]:.3g}, {low_high[1]:.3g}]"
    return f"{result.ratio:.3g}×{bounds}" + (" ⚠" if result.extrapolated else "")


def ratio_table(analysis: dict) -> list[str]:
    """The "FLOP ratio to match" section's text and table: per metric and family the fit, target and ratio."""
    metrics, budget = analysis["metrics"], analysis["budget"]
    lines = ["Per family, log(metric) = a + b·log(C) fitted (least squares) through every seed's point. The target "
             "is the reference's observed value at its largest budget C* = "
             + (f"{budget:.4g}" if budget is not None else "— (no finished reference runs)")
             + ": the mean over its seeds there [95 % interval, Student's t]; the ratio is the compute at which the "
             "family's fit reaches it, divided by C* (below 1: the family needs less compute than the reference; "
             "the paper's Table 3 has Transfusion matching Chameleon's FID at 0.029×), in brackets the ratios at "
             "the target interval's bounds (the reference's seed spread only, not the fits'). \"not resolved\": the "
             "target's interval touches the metric's floor, so no ratio is given. ⚠: the match lies more than "
             f"{FAR:g}× beyond the family's measured compute (an extrapolation). n/a: why there is no ratio.", "",
             "| metric | family | a | b | R² | points | target | ratio to match | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for metric in metrics:
        for family, fit in analysis["fits"][metric].items():
            result = analysis["parity"][metric][family]
            name = f"{family} (reference)" if family == analysis["reference"] else family
            if isinstance(fit, str):
                lines.append(f"| {metric} {arrow(metric)} | {name} | — | — | — | — | — | n/a | {fit} |")
                continue
            head = (f"| {metric} {arrow(metric)} | {name} | {fit.a:.4g} | {fit.b:.4g} | {fit.r2:.3f} | {fit.points} "
                    f"| ")
            if isinstance(result, str):
                lines.append(head + f"— | n/a | {result} |")
                continue
            target = _interval_text(result.target_interval) if result.target_interval else f"{result.target:.4g}"
            if result.ratio is None:
                note = result.reason
            elif result.extrapolated:
                note = f"matches at C = {result.compute:.4g}, beyond the measured {fit.low:.4g}–{fit.high:.4g}"
            else:
                note = f"matches at C = {result.compute:.4g}"
            lines.append(head + f"{target} | {ratio_cell(result)} | {note} |")
    return lines


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
                    label=f"target: reference observed at C* = {target.budget:.3g}")
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
