"""Reading a sweep file: jsonargparse checks it against the schema (``schema.py``); what a type cannot say
(non-empty lists, distinct seeds and variant names, names that make directory names, keys the runner sets itself,
budgets beside ``trainer.max_steps``) is checked after it. Every error names the file, the section and the key,
e.g. ``<file>: grid: model.init_args.patch_size: a list of values, got 2``. The keys' values are checked against
the Transfusion parser later (``validate.py``), a ``compare.reference`` against the sweep's families on expanding
(``expand.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from lit_transfusion.commands.sweep.schema import PINNED, SAFE, Claim, Sweep, SweepError, SweepFile
from lit_transfusion.commands.sweep.typecheck import build, fits, wrong

# What a wrong value should have been, by where it is (``key[]``: an element of a list, ``key:`` a value of a
# mapping); the rest say their type.
WRONG = {
    "name": "a name for the results directory, got {value!r}",
    "base": "a config file or a list of them is required",
    "overrides": "a mapping of dotted keys to values, got {value!r}",
    "grid": "a mapping of dotted keys to lists of values, got {value!r}",
    "grid:": "a list of values, got {value!r}",
    "variants": "a non-empty list of {{name: ..., <dotted key>: <value>, ...}}",
    "variants[]": "a mapping with a name, got {value!r}",
    "seeds": "a non-empty list of integers, got {value!r}",
    "budgets": "a non-empty list of compute budgets in FLOPs (e.g. [1.0e+12, 4.0e+12]), got {value!r}",
    "budgets[]": "{value!r}: a positive number of FLOPs (e.g. 2.0e+12)",
    "compare": "a mapping {{reference: <family>, metrics: [...], claims: [...], floors: {{...}}, draws: [...]}}, "
               "got {value!r}",
    "compare.metrics": "a non-empty list of metric names, got {value!r}",
    "compare.claims": "a list of {{metric: ..., arm: ..., reference: ..., direction: lower|higher}}, got {value!r}",
    "compare.claims[]": "a mapping {{metric: ..., arm: ..., reference: ..., direction: lower|higher, paper: ...}} "
                        "(all but paper required, no other keys), got {value!r}",
    "compare.floors": "a mapping of metric names to floors, got {value!r}",
    "compare.floors:": "a number, [low, high] or \"<file.json>:<dotted.key>\", got {value!r}",
    "compare.draws": "a list of metric names, each with a floor in compare.floors, got {value!r}",
    "metrics": "a non-empty list of metric names, got {value!r}",
    "parallel": "a positive integer, got {value!r}",
    "slurm": "a mapping",
}


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (not yet its keys against the parser: ``validate.py``)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    raw = yaml.safe_load(path.read_text()) or {}
    sections = [f.name for f in dataclasses.fields(SweepFile)]
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of {', '.join(sections)}")
    for key in raw:
        if key not in sections:
            raise SweepError(f"{path}: {key}: unknown key (expected one of {', '.join(sections)})")
    raw = {k: v for k, v in raw.items() if v is not None or k not in ("name", "overrides", "slurm")}  # defaults
    raw = {**raw, "grid": {}} if "grid" in raw and raw["grid"] is None else raw  # an empty grid: said so below
    if not fits(raw, SweepFile):
        where, what = wrong(raw, SweepFile, WRONG)
        raise SweepError(f"{path}: {where}: {what}")
    return _checked(build(SweepFile, raw), lambda where, what: SweepError(f"{path}: {where}: {what}"), path)


def _checked(file: SweepFile, fail, path: Path) -> Sweep:
    """What the types cannot say; the :class:`Sweep` of a file that passes."""
    name = file.name or path.stem
    if SAFE.search(name):
        raise fail("name", f"{name!r}: use letters, digits and . _ = + , - (it names a directory)")
    base = [file.base] if isinstance(file.base, str) else file.base
    if not base or not all(base):
        raise fail("base", WRONG["base"])
    for b in base:
        if not Path(b).is_file():
            raise fail("base", f"{b}: no such file (paths are relative to the working directory)")
    _keys(file.overrides, fail, "overrides")
    grid = _grid(file.grid, fail)
    variants = _variants(file.variants, fail)
    if not grid and not variants:
        raise fail("grid", "a sweep needs a grid or variants")
    for variant in variants:  # in both, the outcome would be left to argument order (either may refine overrides)
        for key in variant.keys() & grid.keys():
            raise fail(f"variants[{variant['name']}]: {key}", "also in the grid")
    if not file.seeds:
        raise fail("seeds", WRONG["seeds"].format(value=file.seeds))
    if len(set(file.seeds)) != len(file.seeds):
        raise fail("seeds", f"repeated seeds in {file.seeds}")
    if not file.metrics:
        raise fail("metrics", WRONG["metrics"].format(value=file.metrics))
    budgets = _budgets(file, grid, variants, fail)
    return Sweep(path, name, base, dict(file.overrides), grid, variants, list(file.seeds), list(file.metrics),
                 file.parallel, file.slurm, budgets, _compare(file, budgets, fail, path))


def _keys(mapping: dict[str, Any], fail, where: str) -> None:
    """Dotted keys, none of which the runner sets itself."""
    for key in mapping:
        if key.startswith("-") or not key:
            raise fail(where, f"{key!r}: keys are dotted names like trainer.max_steps (no leading --)")
        if any(key == p or key.startswith(p + ".") for p in PINNED):
            raise fail(f"{where}: {key}", "set by the sweep runner (seeds: sets the seeds)")


def _grid(grid: dict[str, list] | None, fail) -> dict[str, list]:
    if grid is None:
        return {}
    _keys(grid, fail, "grid")
    if not grid:
        raise fail("grid", "empty (give each key a list of values, or leave grid out)")
    for key, values in grid.items():
        if not values:
            raise fail(f"grid: {key}", "empty list of values")
    return dict(grid)


def _variants(variants: list[dict[str, Any]] | None, fail) -> list[dict[str, Any]]:
    if variants is None:
        return []
    if not variants:
        raise fail("variants", WRONG["variants"].format())
    names: set[str] = set()
    for i, variant in enumerate(variants):
        name = variant.get("name")
        if not isinstance(name, str) or not name:
            raise fail(f"variants[{i}]", WRONG["variants[]"].format(value=variant))
        if SAFE.search(name):
            raise fail(f"variants[{i}]", f"name {name!r}: use letters, digits and . _ = + , -")
        if name in names:
            raise fail(f"variants[{i}]", f"duplicate variant name {name!r}")
        names.add(name)
        _keys({k: v for k, v in variant.items() if k != "name"}, fail, f"variants[{name}]")
    return [{"name": v["name"], **{k: x for k, x in v.items() if k != "name"}} for v in variants]


def _budgets(file: SweepFile, grid: dict, variants: list[dict], fail) -> list[float]:
    """The budgets as floats, distinct (YAML reads ``2e12`` without a dot as text: the number it spells), and no
    ``trainer.max_steps`` beside them (each run's FlopsBudget turns its budget into max_steps)."""
    if file.budgets is None:
        return []
    if not file.budgets:
        raise fail("budgets", WRONG["budgets"].format(value=file.budgets))
    numbers = [float(b) for b in file.budgets]  # checked: numbers, or strings that spell one
    for i, number in enumerate(numbers):
        if number in numbers[:i]:
            raise fail(f"budgets[{i}]", f"{file.budgets[i]!r}: repeated budget")
    for where, mapping in [("overrides", file.overrides), ("grid", grid),
                           *((f"variants[{v['name']}]", v) for v in variants)]:
        if "trainer.max_steps" in mapping:
            raise fail(f"{where}: trainer.max_steps", "set by budgets (each run's FlopsBudget turns its budget "
                                                      "into max_steps); leave it out")
    return numbers


def _compare(file: SweepFile, budgets: list[float], fail, path: Path) -> dict[str, Any] | None:
    """``compare`` as {reference, metrics, claims, floors, draws}: metrics filled in (default: the sweep's
    ``metrics``), each claim checked, each floor read as [mean, low, high], each ``draws`` metric given a floor. A
    ``reference`` (the equal-compute analysis) needs ``budgets``; claims alone do not."""
    if file.compare is None:
        return None
    section = file.compare
    if section.reference is not None and not budgets:
        raise fail("compare", "needs budgets: (the compute grid each family's power law is fitted on)")
    if section.reference is None and not section.claims:
        raise fail("compare", "a reference: <family> (with budgets) or claims: [...], or leave compare out")
    metrics = file.metrics if section.metrics is None else section.metrics
    if not metrics:
        raise fail("compare.metrics", WRONG["compare.metrics"].format(value=metrics))
    claims = [_claim(c, i, fail) for i, c in enumerate(section.claims or [])]
    floors = {m: _floor(v, fail, f"compare.floors: {m}", path) for m, v in (section.floors or {}).items()}
    draws = list(section.draws or [])
    if missing := [m for m in draws if m not in floors]:
        raise fail("compare.draws", f"{missing[0]} has no floor: each metric a run must clear needs one in "
                                    "compare.floors")
    return {"reference": section.reference, "metrics": list(metrics), "claims": claims, "floors": floors,
            "draws": draws}


def _claim(claim: dict[str, Any] | Claim, i: int, fail) -> dict[str, Any]:
    """One claim as a plain mapping, its direction "lower" or "higher" and its arms distinct."""
    claim = dataclasses.asdict(claim) if isinstance(claim, Claim) else dict(claim)
    claim.setdefault("paper", None)
    if claim["direction"] not in ("lower", "higher"):
        raise fail(f"compare.claims[{i}].direction", f"{claim['direction']!r}: \"lower\" or \"higher\" (how the "
                                                     "arm's raw value compares with the reference's in the paper)")
    if claim["arm"] == claim["reference"]:
        raise fail(f"compare.claims[{i}]", f"arm and reference are both {claim['arm']!r}")
    return claim


def _floor(value: Any, fail, where: str, path: Path) -> list[float]:
    """A floor as [mean, low, high]: a number (a point), [low, high], or "<file.json>:<dotted.key>" whose value
    is one of those or {mean, low, high}, or a number with ``<last key>_low`` and ``<last key>_high`` beside it
    (as results/floors/floors.json stores intervals: ``...geneval.overall`` reads overall, overall_low,
    overall_high); the file relative to the working directory."""
    if isinstance(value, str):
        name, _, key = value.partition(":")
        if not Path(name).is_file() or not key:
            raise fail(where, f"{value!r}: expected \"<file.json>:<dotted.key>\" naming an existing file")
        found: Any = json.loads(Path(name).read_text())
        parent: Any = None
        for part in key.split("."):
            if not isinstance(found, dict) or part not in found:
                raise fail(where, f"{value!r}: {name} has no {key!r}")
            parent, found = found, found[part]
        if isinstance(found, dict) and {"mean", "low", "high"} <= found.keys():
            return [float(found["mean"]), float(found["low"]), float(found["high"])]
        last = key.split(".")[-1]
        if isinstance(found, (int, float)) and {f"{last}_low", f"{last}_high"} <= parent.keys():
            return [float(found), float(parent[f"{last}_low"]), float(parent[f"{last}_high"])]
        value = found
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * 3
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value) \
            and value[0] <= value[1]:
        return [(value[0] + value[1]) / 2, float(value[0]), float(value[1])]
    raise fail(where, f"{value!r}: a number, [low, high] (low <= high) or {{mean, low, high}}")
