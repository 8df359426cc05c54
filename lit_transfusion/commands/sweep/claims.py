"""The paper's claims a sweep's ``compare.claims`` names, each with its verdict (``lit_transfusion.stats.verdict``,
the rule in ``stats.RULE``) from the intervals over seeds of the arm's and the reference's final values.

A claim names two families and a metric. Without budgets a family's runs are its seeds; with budgets the claim is
judged at the largest budget both families finished (equal compute). A metric's floor (``compare.floors``) is
passed to the rule for both arms: an arm whose interval touches its floor leaves the claim "not resolved".
Where the sweep file names ``compare.draws``, each claim also says whether both families draw at its budget
(``draws.py``: every seed of each clear of its floors), so a verdict read where one family is at chance is marked.
"""

from __future__ import annotations

import dataclasses
import math

from lit_transfusion.commands.sweep.draws import draws
from lit_transfusion.stats import Interval, mean_interval, verdict


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    """One claim's verdict and what it was computed from."""

    metric: str
    """the metric, e.g. val/fid"""
    arm: str
    """the family the paper found better"""
    reference: str
    """the family it is compared with"""
    direction: str
    """"lower" or "higher": the arm's raw value against the reference's, as the paper found"""
    arm_interval: Interval | None
    """(mean, low, high) over the arm's finished seeds; None without any value"""
    reference_interval: Interval | None
    """(mean, low, high) over the reference's finished seeds; None without any value"""
    seeds: tuple[int, int]
    """how many seeds each interval is over (arm, reference)"""
    floor: Interval | None
    """the metric's floor, if the sweep file gives one"""
    budget: float | None
    """the compute budget both were judged at (None: no budgets)"""
    verdict: str
    """"holds", "reversed" or "not resolved\""""
    paper: str | None = None
    """what the paper measured, in words"""
    both_draw: bool | None = None
    """whether both families draw at ``budget`` (None: the sweep file names no ``compare.draws``)"""


def seed_interval(values: list) -> Interval | None:
    """(mean, low, high) over the finite values (Student t; nan bounds for one value), None for none."""
    known = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return mean_interval(known) if known else None


def _finished(runs: list[dict], family: str, budget: float | None) -> list[dict]:
    return [r for r in runs if r["status"] == "finished" and r["family"] == family
            and (budget is None or r.get("budget") is not None and float(r["budget"]) == budget)]


def common_budget(runs: list[dict], arm: str, reference: str) -> float | None:
    """The largest budget at which both families have finished runs (None: no budgets, or none shared)."""
    def budgets(family: str) -> set[float]:
        return {float(r["budget"]) for r in _finished(runs, family, None) if r.get("budget") is not None}

    shared = budgets(arm) & budgets(reference)
    return max(shared) if shared else None


def judge(runs: list[dict], claim: dict, floors: dict[str, list[float]]) -> ClaimResult:
    """One claim ({metric, arm, reference, direction, paper}) judged on the runs."""
    metric = claim["metric"]
    budget = common_budget(runs, claim["arm"], claim["reference"])
    values = [[r["final"].get(metric) for r in _finished(runs, claim[k], budget)] for k in ("arm", "reference")]
    arm, ref = seed_interval(values[0]), seed_interval(values[1])
    floor = tuple(floors[metric]) if metric in floors else None
    if arm is None or ref is None:
        result = "not resolved"
    else:
        result = verdict(arm, ref, claim["direction"], arm_floor=floor, reference_floor=floor)
    counts = tuple(sum(v is not None for v in vs) for vs in values)
    return ClaimResult(metric, claim["arm"], claim["reference"], claim["direction"], arm, ref, counts, floor, budget,
                       result, claim.get("paper"))


def judge_all(runs: list[dict], compare: dict | None) -> list[ClaimResult]:
    """Every claim of a sweep's ``compare`` (none without one), with ``both_draw`` where it names ``draws``."""
    if not compare:
        return []
    floors = compare.get("floors") or {}
    results = [judge(runs, c, floors) for c in compare.get("claims") or []]
    if not compare.get("draws"):
        return results
    table = draws(runs, compare["draws"], floors)

    def drawing(family: str, budget: float | None) -> bool:
        return budget is not None and table.get(family, {}).get(budget, {}).get("draws", False)

    return [dataclasses.replace(c, both_draw=drawing(c.arm, c.budget) and drawing(c.reference, c.budget))
            for c in results]


def format_interval(interval: Interval | None, digits: int = 4, point: bool = False) -> str:
    """``mean [low, high]`` to ``digits`` significant digits; the mean alone when the bounds are undefined, or
    (``point``: a floor given as a number) when they equal it."""
    if interval is None:
        return "—"
    mean, low, high = interval
    if math.isnan(low) or math.isnan(high):
        return f"{mean:.{digits}g} (one seed: no interval)"
    if point and low == high == mean:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]"


def claims_markdown(results: list[ClaimResult]) -> list[str]:
    """The claims' table: claim, both intervals, the floor, whether both draw there (when known), the verdict (no
    lines without claims)."""
    if not results:
        return []
    drawn = any(c.both_draw is not None for c in results)
    header = ("| claim (paper) | metric | arm: mean [95 % interval] | reference: mean [95 % interval] | seeds | floor "
              + ("| both draw there " if drawn else "") + "| verdict |")
    lines = [header, "|" + "---|" * (7 + drawn)]
    for c in results:
        sign = "<" if c.direction == "lower" else ">"
        at = "" if c.budget is None else f" at C = {c.budget:.3g}"
        paper = f" ({c.paper})" if c.paper else ""
        both = ("" if not drawn else "| yes " if c.both_draw else "| no ")
        lines.append(f"| {c.arm} {sign} {c.reference}{at}{paper} | {c.metric} | {format_interval(c.arm_interval)} "
                     f"| {format_interval(c.reference_interval)} | {c.seeds[0]}, {c.seeds[1]} "
                     f"| {format_interval(c.floor, point=True)} {both}| **{c.verdict}** |")
    return lines
