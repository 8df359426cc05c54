"""Where each family draws: per family and budget, whether every finished seed's final score lies clear of its
floor (a sweep's ``compare.draws``, the floors its ``compare.floors``), and the smallest budget at which every
family does. An equal-compute comparison only says something where the families it compares are off their floors
(a GenEval-style score inside the prompt-ignoring control's interval is chance, whatever the FLOPs).

A run is *clear* on a metric when its own interval (the evaluation's: ``<metric>_low``/``_high`` such as GenEval's
Wilson interval, else ± 1.96 ``<metric>_std`` such as KID's spread over subsets, else the point) shares no point
with the floor's and lies on the better side of it. A family draws at a budget when every finished seed there is
clear on every ``draws`` metric.
"""

from __future__ import annotations

import math

from lit_transfusion.commands.sweep.direction import arrow, higher_is_better
from lit_transfusion.stats import Interval, normal_quantile

DRAWS_RULE = ("A run is clear of a floor when its own interval (GenEval-style: Wilson 95 %; KID: ± 1.96 × its "
              "spread over subsets; else the value) lies wholly on the better side of the floor's interval; ✓ marks "
              "each seed that is. A family draws at a budget when every finished seed there is clear on every "
              "metric of the table.")


def run_interval(final: dict, metric: str) -> Interval | None:
    """A run's (value, low, high) for ``metric`` from its final values, or None without a finite value."""
    value = final.get(metric)
    if value is None or not math.isfinite(value):
        return None
    low, high, std = final.get(f"{metric}_low"), final.get(f"{metric}_high"), final.get(f"{metric}_std")
    if low is not None and high is not None:
        return value, low, high
    if std is not None and math.isfinite(std):
        half = normal_quantile() * std
        return value, value - half, value + half
    return value, value, value


def clear_of(interval: Interval, floor: Interval, higher: bool) -> bool:
    """Whether ``interval`` lies wholly on the better side of ``floor`` (above it when higher is better)."""
    return interval[1] > floor[2] if higher else interval[2] < floor[1]


def draws(runs: list[dict], metrics: list[str], floors: dict[str, list[float]]) -> dict[str, dict[float, dict]]:
    """{family: {budget: {"draws": bool, "seeds": {seed: {metric: (interval, clear)}}, "why": str}}} over the
    finished runs with a budget; a missing value counts as not clear."""
    table: dict[str, dict[float, dict]] = {}
    for r in runs:
        if r["status"] != "finished" or r.get("budget") is None:
            continue
        cell = table.setdefault(r["family"], {}).setdefault(float(r["budget"]), {"seeds": {}})
        cell["seeds"][r["seed"]] = {}
        for metric in metrics:
            interval = run_interval(r["final"], metric)
            ok = interval is not None and clear_of(interval, tuple(floors[metric]), higher_is_better(metric))
            cell["seeds"][r["seed"]][metric] = (interval, ok)
    for cell in (c for by_budget in table.values() for c in by_budget.values()):
        misses = [f"seed {s}: {m}" for s, scores in sorted(cell["seeds"].items())
                  for m, (_, ok) in scores.items() if not ok]
        cell["draws"] = not misses
        cell["why"] = "every seed clear of its floors" if not misses else "on the floor: " + ", ".join(misses)
    return {family: dict(sorted(by_budget.items())) for family, by_budget in table.items()}


def smallest_common_budget(table: dict[str, dict[float, dict]]) -> float | None:
    """The smallest budget every family ran and drew at, None where there is none."""
    budgets = set.intersection(*(set(b) for b in table.values())) if table else set()
    return next((b for b in sorted(budgets) if all(table[f][b]["draws"] for f in table)), None)


def _text(interval: Interval | None) -> str:
    if interval is None:
        return "—"
    value, low, high = interval
    return f"{value:.3g}" if low == high else f"{value:.3g} [{low:.3g}, {high:.3g}]"


def draws_markdown(runs: list[dict], metrics: list[str], floors: dict[str, list[float]],
                   pairs: list[tuple[str, str]] = ()) -> list[str]:
    """The table (a row per family and budget, a cell per metric with each seed's interval, ✓ where clear), the
    floors, and the computed answer: the smallest budget at which every family draws, then for each pair of
    families in ``pairs`` (those a sweep's claims compare) the smallest budget at which both do."""
    table = draws(runs, metrics, floors)
    lines = ["| family | budget | seeds | " + " | ".join(f"{m} {arrow(m)}" for m in metrics) + " | draws |",
             "|" + "---|" * (len(metrics) + 4)]
    for family, by_budget in table.items():
        for budget, cell in by_budget.items():
            seeds = sorted(cell["seeds"])
            cells = ["<br>".join(_text(cell["seeds"][s][m][0]) + (" ✓" if cell["seeds"][s][m][1] else "")
                                 for s in seeds) for m in metrics]
            lines.append(f"| {family} | {budget:.3g} | {', '.join(map(str, seeds))} | " + " | ".join(cells)
                         + f" | {'**yes**' if cell['draws'] else 'no'} |")
    lines.append("| *floor* | | | " + " | ".join(_text(tuple(floors[m])) for m in metrics) + " | |")
    smallest = smallest_common_budget(table)
    if not table:
        answer = "No finished runs with a budget."
    elif smallest is None:
        where = "; ".join(f"{f} " + (", ".join(f"{b:.3g}" for b, c in bb.items() if c["draws"]) or "none")
                          for f, bb in table.items())
        answer = ("Smallest budget at which every family draws: **none of the budgets run** (where each draws: "
                  f"{where}).")
    else:
        answer = f"Smallest budget at which every family draws: **{smallest:.3g}**."
    both = []
    for a, b in dict.fromkeys(p for p in pairs if p[0] in table and p[1] in table):
        budget = smallest_common_budget({a: table[a], b: table[b]})
        both.append(f"{a} and {b}: " + ("**none of the budgets run**" if budget is None else f"**{budget:.3g}**"))
    if both:
        answer += " Smallest budget at which both families of a claim draw: " + "; ".join(both) + "."
    return lines + ["", answer]


def compare_draws_markdown(runs: list[dict], compare: dict) -> list[str]:
    """``draws_markdown`` for a sweep's ``compare`` section: its ``draws`` metrics, floors and claims' pairs."""
    pairs = [(c["arm"], c["reference"]) for c in compare.get("claims") or []]
    return draws_markdown(runs, compare["draws"], compare["floors"], pairs=pairs)
