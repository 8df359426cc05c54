"""A sweep's runs: budgets × variants × grid points × seeds, their ids, directories and ``fit`` command lines.

Runs are ordered seed-major, then by budget, so the first seed of every setting finishes first. A run id is its
variant name and grid point, its budget and its seed (``causal-patch_size=2-budget2e12-seed0``); its *family* is
the id less budget and seed. Every run is a ``fit`` whose command line is the base configs, the overrides, the
run's settings, then what the runner pins: the seeds, the TensorBoard logger (at the run directory
``<out>/<name>/runs/<run_id>/``), ``callbacks.flops.FlopsCounter`` and, with a budget, ``callbacks.flops.FlopsBudget``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from lit_transfusion.commands.sweep.schema import SAFE, Sweep, SweepError

FLOPS_CALLBACK = "callbacks.flops.FlopsCounter"
BUDGET_CALLBACK = "callbacks.flops.FlopsBudget"
LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


@dataclasses.dataclass
class Run:
    """One run of a sweep: ``settings`` are its variant's and grid point's keys (with the section each came
    from), ``variant`` the run id less the seed, ``family`` the run id less the budget and the seed, ``budget``
    its compute budget in FLOPs (None: it trains for ``trainer.max_steps``)."""

    index: int
    run_id: str
    variant: str
    settings: dict[str, Any]
    sources: dict[str, str]
    seed: int
    budget: float | None = None
    family: str = ""


def expand(sweep: Sweep) -> list[Run]:
    """budgets × variants × grid points × seeds, seed-major then by budget, with readable unique run ids
    (``causal-patch_size=2-seed0``, ``causal-patch_size=2-budget2e12-seed0``). Refuses a ``compare.reference``
    that is no family of the sweep."""
    families = _families(sweep.grid, sweep.variants)
    _check_compare(sweep, [f for f, _, _ in families])
    runs: list[Run] = []
    for seed in sweep.seeds:
        for budget in sweep.budgets or [None]:
            for family, settings, sources in families:
                label = family if budget is None else f"{family}-budget{budget_label(budget)}"
                runs.append(Run(len(runs), f"{label}-seed{seed}", label, settings, sources, seed, budget, family))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SweepError(f"{sweep.file}: grid: two runs would share the id {dup!r} (values that print alike)")
    return runs


def _check_compare(sweep: Sweep, names: list[str]) -> None:
    """``compare.reference`` and every claim's arm and reference name a family of the sweep."""
    if sweep.compare is None:
        return
    named = [("compare.reference", sweep.compare["reference"])] if sweep.compare["reference"] is not None else []
    for i, claim in enumerate(sweep.compare.get("claims", [])):
        named += [(f"compare.claims[{i}].arm", claim["arm"]), (f"compare.claims[{i}].reference", claim["reference"])]
    for where, name in named:
        if name not in names:
            raise SweepError(f"{sweep.file}: {where}: {name!r}: not a family of this sweep (expected one of "
                             f"{', '.join(names)}: a variant name with its grid point)")


def _families(grid: dict[str, list], variants: list[dict]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Every variant × grid point: (its label, e.g. ``causal-patch_size=2``; its settings; the section each setting
    came from), in run order."""
    names = _short_names(list(grid))
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    out = []
    for variant in variants or [{"name": ""}]:
        for point in points:
            parts = [variant["name"]] if variant["name"] else []
            parts += [f"{names[k]}={_label(v)}" for k, v in point.items()]
            settings = {**{k: v for k, v in variant.items() if k != "name"}, **point}
            sources = {k: (f"variants[{variant['name']}]" if k not in point else "grid") for k in settings}
            out.append((SAFE.sub("_", "-".join(parts)), settings, sources))
    return out


def budget_label(flops: float) -> str:
    """A budget as it appears in a run id: ``2e12``, ``1.5e9`` (up to 6 significant digits)."""
    mantissa, exponent = f"{flops:.5e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each grid key that no other key shares (``patch_size`` for
    ``model.init_args.patch_size``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(o != key and (o == short or o.endswith("." + short)) for o in keys):
                break
        out[key] = short
    return out


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def cli_value(value: Any) -> str:
    """A value as the text after ``--key=``: plain for strings that read back as themselves, JSON otherwise
    (numbers, booleans, null, lists, mappings, and strings like "1" or "a: b" that YAML would change)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def sweep_dir(out: str | Path, sweep: Sweep) -> Path:
    return Path(out) / sweep.name


def run_dir(out: str | Path, sweep: Sweep, run: Run) -> Path:
    return sweep_dir(out, sweep) / "runs" / run.run_id


def fit_args(sweep: Sweep, run: Run, out: str | Path, ckpt_path: Path | None = None) -> list[str]:
    """The ``fit`` command line of ``run`` (after ``python -m lit_transfusion``): base configs, overrides,
    the run's settings, its seed, the logger pinned to its directory and the FLOPs callback."""
    args = ["fit"]
    for config in sweep.base:
        args += ["--config", config]
    args += [f"--{k}={cli_value(v)}" for k, v in {**sweep.overrides, **run.settings}.items()]
    args += pinned_args(sweep, run, out)
    if ckpt_path is not None:
        args.append(f"--ckpt_path={ckpt_path}")
    return args


def pinned_args(sweep: Sweep, run: Run, out: str | Path) -> list[str]:
    """What the runner sets on every run: the seeds, the logger, the FLOPs callback and the run's budget."""
    # save_dir/name/version = <out>/<name>/runs/<run_id>: the run directory never depends on what exists.
    logger = {"class_path": LOGGER, "init_args": {"save_dir": str(sweep_dir(out, sweep)), "name": "runs",
                                                  "version": run.run_id}}
    args = [f"--seed_everything={run.seed}", f"--model.init_args.seed={run.seed}",
            f"--trainer.logger={json.dumps(logger)}", f"--trainer.callbacks+={FLOPS_CALLBACK}"]
    if run.budget is not None:
        budget = {"class_path": BUDGET_CALLBACK, "init_args": {"flops": run.budget}}
        args.append(f"--trainer.callbacks+={json.dumps(budget)}")
    return args
