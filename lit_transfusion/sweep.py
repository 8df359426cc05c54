"""``python -m lit_transfusion sweep``: a grid of ordinary ``fit`` runs -> a results table.

    python -m lit_transfusion sweep --config configs/sweeps/table6_patch_size.yaml             # run it here
    python -m lit_transfusion sweep --config ... --dry-run                                     # list the runs
    python -m lit_transfusion sweep --config ... --parallel 2                                  # 2 runs at a time
    python -m lit_transfusion sweep --config ... --slurm --partition gpu --time 120 --gpus 1   # SLURM job array
    python -m lit_transfusion sweep --config ... --sbatch                                      # write sweep.sbatch
    python -m lit_transfusion sweep --config ... --only 3                                      # run 3 only
    python -m lit_transfusion sweep --collect runs/sweeps/table6_patch_size                    # rebuild the results

A sweep file (YAML) says what to run::

    name: table6_patch_size             # results go to <out>/<name>/ (--out, default runs/sweeps)
    base: configs/shapes/tiny.yaml      # or a list, applied in order like repeated --config
    overrides: {trainer.max_steps: 600} # dotted LightningCLI keys, for every run (a variant or grid may refine one)
    grid:                               # cartesian product: dotted key -> list of values
      model.init_args.patch_size: [1, 2, 4]
    variants:                           # named sets of overrides (ablations touching several keys)
      - {name: causal, model.init_args.image_attention: causal}
      - {name: bidirectional}
    seeds: [0, 1]                       # each run sets seed_everything and model.init_args.seed
    budgets: [2.0e+12, 8.0e+12]         # optional: train each run for a compute budget (6·N·D FLOPs), not max_steps
    compare: {reference: bidirectional, metrics: [val/fid]}   # optional (needs budgets): equal-compute analysis
    metrics: [val/cond_gap, val/fid]    # what results.md and curves.png show (results.csv has every val/ metric)
    parallel: 1                         # local runs at a time; each gets cores // parallel threads
    slurm: {partition: gpu, time: 120, gpus: 1, cpus: 8, mem_gb: 32, setup: ["source .venv/bin/activate"]}

Runs are budgets × variants × grid points × seeds (grid or variants may be absent, not both; budgets may be
absent), ordered seed-major, then by budget, so the first seed of every setting finishes first; ``--dry-run``
prints them with their index. The whole file is checked before any run starts: every run's full argument list
goes through the Transfusion parser (no model is built), and an error names the file, the section and the key.

Equal compute (``budgets``, ``compare``): each run of a budget gets ``callbacks.flops.FlopsBudget`` with that
budget, which sets its ``trainer.max_steps`` to the steps whose 6·N·D spends it (N: the parameters a position
uses; D: non-pad positions, each text token, image patch or image code counting one), so the configured
``trainer.max_steps`` is overridden (a sweep with budgets may not set it) and the learning-rate schedule ends at
the budget's last step; the run validates at that step. Budgets are written as numbers (YAML reads ``2e12``
without a dot as text; that is accepted too). The run id carries the budget (``linear-budget2e12-seed0``), its
*family* is the id less budget and seed (a variant name and grid point), results.csv gets ``family`` and
``budget`` columns. ``compare`` (``reference``: a family; ``metrics``: default the sweep's ``metrics``) writes
``equal_flops.md`` and ``equal_flops.png`` into the sweep directory (with results.md, and again by ``--collect``):
each metric's final value against training FLOPs per family and budget, a power law per family fitted through
every seed's point, and the FLOP ratio at which each family matches the reference
(``lit_transfusion.sweep_results``).

Every run is a ``fit`` in a subprocess with its own directory ``<out>/<name>/runs/<run_id>/`` (the TensorBoard
logger is pinned there: ``config.yaml``, ``checkpoints/``, events, ``metrics.json``), and beside them
``run.json`` (its settings), ``command.txt`` (the exact command, to re-run it by hand), ``stdout.log`` /
``stderr.log``, ``attempts.jsonl`` and, when it ends, ``done.json`` (status, wall-clock seconds, final metrics;
a failure keeps the last lines of stderr). Rerunning a sweep skips finished runs, resumes interrupted or failed
ones from ``checkpoints/last.ckpt`` (``--ckpt_path``) and retries failed ones that have none. The runner adds
``callbacks.flops.FlopsCounter`` to every run (measured FLOPs and 6·N·D). Results
(``lit_transfusion.sweep_results``) are written when the runs end and rebuilt from the run directories alone
by ``--collect``.

SLURM: ``--slurm`` submits one job array with submitit (a task per unfinished run); ``--sbatch`` writes
``<out>/<name>/sweep.sbatch``, whose task i runs ``sweep --config ... --only i``. Each array task is one
process running one run (single-device runs; a multi-device run is a job of its own: Lightning on SLURM wants
one task per device). No scheduler of our own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

FLOPS_CALLBACK = "callbacks.flops.FlopsCounter"
BUDGET_CALLBACK = "callbacks.flops.FlopsBudget"
LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
SECTIONS = ("name", "base", "overrides", "grid", "variants", "seeds", "budgets", "compare", "metrics", "parallel",
            "slurm")
COMPARE_KEYS = ("reference", "metrics")
SLURM_KEYS = ("partition", "time", "gpus", "cpus", "mem_gb", "account", "qos", "setup", "additional")
# Set by the runner for every run: a sweep that sets them itself would be silently overridden.
PINNED = ("seed_everything", "model.init_args.seed", "trainer.logger", "ckpt_path", "config")
SAFE = re.compile(r"[^A-Za-z0-9._=+,-]")  # characters kept in a run id (it is a directory name)


class SweepError(Exception):
    """A sweep file is wrong: the message names the file, the section and the key."""


@dataclasses.dataclass
class Sweep:
    """A loaded, checked sweep file (see the module docstring for the fields)."""

    file: Path
    name: str
    base: list[str]
    overrides: dict[str, Any]
    grid: dict[str, list]
    variants: list[dict[str, Any]]
    seeds: list[int]
    metrics: list[str]
    parallel: int = 1
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)
    budgets: list[float] = dataclasses.field(default_factory=list)
    compare: dict[str, Any] | None = None  # {"reference": family, "metrics": [...]}, metrics filled in


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


# ----------------------------------------------------------------------------------------------- loading
def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file's structure (not yet its keys against the parser: :func:`validate`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    raw = yaml.safe_load(path.read_text()) or {}
    fail = lambda where, what: SweepError(f"{path}: {where}: {what}")
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise fail(key, f"unknown key (expected one of {', '.join(SECTIONS)})")
    name = str(raw.get("name") or path.stem)
    if SAFE.search(name):
        raise fail("name", f"{name!r}: use letters, digits and . _ = + , - (it names a directory)")
    base = raw.get("base")
    base = [base] if isinstance(base, str) else base
    if not base or not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        raise fail("base", "a config file or a list of them is required")
    for b in base:
        if not Path(b).is_file():
            raise fail("base", f"{b}: no such file (paths are relative to the working directory)")
    overrides = _mapping(raw.get("overrides") or {}, fail, "overrides")
    grid = _grid(raw, fail)
    variants = _variants(raw, fail)
    if not grid and not variants:
        raise fail("grid", "a sweep needs a grid or variants")
    _check_overlaps(grid, variants, fail)
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise fail("seeds", f"a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise fail("seeds", f"repeated seeds in {seeds}")
    metrics = raw.get("metrics", ["val/loss"])
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise fail("metrics", f"a non-empty list of metric names, got {metrics!r}")
    budgets = _budgets(raw, fail)
    if budgets:
        for where, mapping in [("overrides", overrides), ("grid", grid),
                               *((f"variants[{v['name']}]", v) for v in variants)]:
            if "trainer.max_steps" in mapping:
                raise fail(f"{where}: trainer.max_steps", "set by budgets (each run's FlopsBudget turns its budget "
                                                          "into max_steps); leave it out")
    compare = _compare(raw, fail, budgets, metrics, [f for f, _, _ in _families(grid, variants)])
    parallel = raw.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise fail("parallel", f"a positive integer, got {parallel!r}")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise fail("slurm", "a mapping")
    for key in slurm:
        if key not in SLURM_KEYS:
            raise fail(f"slurm.{key}", f"unknown key (expected one of {', '.join(SLURM_KEYS)})")
    return Sweep(path, name, base, overrides, grid, variants, seeds, metrics, parallel, slurm, budgets, compare)


def _mapping(value: Any, fail, where: str) -> dict[str, Any]:
    """A mapping of dotted keys, none of which the runner sets itself."""
    if not isinstance(value, dict):
        raise fail(where, f"a mapping of dotted keys to values, got {value!r}")
    for key in value:
        if not isinstance(key, str) or key.startswith("-") or not key:
            raise fail(where, f"{key!r}: keys are dotted names like trainer.max_steps (no leading --)")
        if any(key == p or key.startswith(p + ".") for p in PINNED):
            raise fail(f"{where}: {key}", "set by the sweep runner (seeds: sets the seeds)")
    return dict(value)


def _grid(raw: dict, fail) -> dict[str, list]:
    if "grid" not in raw:
        return {}
    grid = _mapping(raw["grid"] if raw["grid"] is not None else {}, fail, "grid")
    if not grid:
        raise fail("grid", "empty (give each key a list of values, or leave grid out)")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise fail(f"grid: {key}", f"a list of values, got {values!r}")
        if not values:
            raise fail(f"grid: {key}", "empty list of values")
    return grid


def _variants(raw: dict, fail) -> list[dict[str, Any]]:
    if "variants" not in raw:
        return []
    variants = raw["variants"]
    if not isinstance(variants, list) or not variants:
        raise fail("variants", "a non-empty list of {name: ..., <dotted key>: <value>, ...}")
    names: set[str] = set()
    out = []
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str) or not variant["name"]:
            raise fail(f"variants[{i}]", f"a mapping with a name, got {variant!r}")
        name = variant["name"]
        if SAFE.search(name):
            raise fail(f"variants[{i}]", f"name {name!r}: use letters, digits and . _ = + , -")
        if name in names:
            raise fail(f"variants[{i}]", f"duplicate variant name {name!r}")
        names.add(name)
        settings = _mapping({k: v for k, v in variant.items() if k != "name"}, fail, f"variants[{name}]")
        out.append({"name": name, **settings})
    return out


def _budgets(raw: dict, fail) -> list[float]:
    """The ``budgets:`` list as floats: positive, finite, distinct. YAML reads ``2e12`` (no dot) as a string, so a
    string that is a number is taken as one."""
    if "budgets" not in raw:
        return []
    budgets = raw["budgets"]
    if not isinstance(budgets, list) or not budgets:
        raise fail("budgets", f"a non-empty list of compute budgets in FLOPs (e.g. [1.0e+12, 4.0e+12]), "
                              f"got {budgets!r}")
    out = []
    for i, value in enumerate(budgets):
        try:
            number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or number <= 0:
            raise fail(f"budgets[{i}]", f"{value!r}: a positive number of FLOPs (e.g. 2.0e+12)")
        if number in out:
            raise fail(f"budgets[{i}]", f"{value!r}: repeated budget")
        out.append(number)
    return out


def _compare(raw: dict, fail, budgets: list[float], metrics: list[str], families: list[str]) -> dict | None:
    """The ``compare:`` mapping with its metrics filled in (default: the sweep's ``metrics``)."""
    if "compare" not in raw:
        return None
    compare = raw["compare"]
    if not isinstance(compare, dict):
        raise fail("compare", f"a mapping {{reference: <family>, metrics: [...]}}, got {compare!r}")
    for key in compare:
        if key not in COMPARE_KEYS:
            raise fail(f"compare.{key}", f"unknown key (expected one of {', '.join(COMPARE_KEYS)})")
    if not budgets:
        raise fail("compare", "needs budgets: (the compute grid each family's power law is fitted on)")
    reference = compare.get("reference")
    if reference not in families:
        raise fail("compare.reference", f"{reference!r}: not a family of this sweep (expected one of "
                                        f"{', '.join(families)}: a variant name with its grid point)")
    chosen = compare.get("metrics", metrics)
    if not isinstance(chosen, list) or not chosen or not all(isinstance(m, str) for m in chosen):
        raise fail("compare.metrics", f"a non-empty list of metric names, got {chosen!r}")
    return {"reference": reference, "metrics": list(chosen)}


def _check_overlaps(grid: dict, variants: list[dict], fail) -> None:
    """A key in both the grid and a variant would leave the outcome to argument order: refuse it. (Either may
    refine an override: overrides come first.)"""
    for variant in variants:
        for key in variant:
            if key != "name" and key in grid:
                raise fail(f"variants[{variant['name']}]: {key}", "also in the grid")


# ----------------------------------------------------------------------------------------------- runs
def expand(sweep: Sweep) -> list[Run]:
    """budgets × variants × grid points × seeds, seed-major then by budget, with readable unique run ids
    (``causal-patch_size=2-seed0``, ``causal-patch_size=2-budget2e12-seed0``)."""
    runs: list[Run] = []
    for seed in sweep.seeds:
        for budget in sweep.budgets or [None]:
            for family, settings, sources in _families(sweep.grid, sweep.variants):
                label = family if budget is None else f"{family}-budget{budget_label(budget)}"
                runs.append(Run(len(runs), f"{label}-seed{seed}", label, settings, sources, seed, budget, family))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SweepError(f"{sweep.file}: grid: two runs would share the id {dup!r} (values that print alike)")
    return runs


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
    args += _pinned_args(sweep, run, out)
    if ckpt_path is not None:
        args.append(f"--ckpt_path={ckpt_path}")
    return args


def _pinned_args(sweep: Sweep, run: Run, out: str | Path) -> list[str]:
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


# ----------------------------------------------------------------------------------------------- checking
def validate(sweep: Sweep, runs: list[Run], out: str | Path) -> None:
    """Parse the runs' full argument lists with the Transfusion parser (nothing is built); on an error, find
    the setting that causes it and name it. Runs that differ only in their seed or budget parse alike (budgets are
    checked on loading), so each family (variant and grid point) is parsed once, with its first seed and budget.
    Also refuse a run directory made with other settings."""
    from argparse import ArgumentError

    parser = _parser()
    parse = lambda args: _parse_error(parser, args, ArgumentError)
    base = ["fit", *[a for c in sweep.base for a in ("--config", c)]]
    pinned = _pinned_args(sweep, Run(0, "check", "check", {}, {}, 0), out)
    firsts: dict[str, Run] = {}
    for run in runs:
        firsts.setdefault(run.family or run.variant, run)
    for run in firsts.values():
        if not (error := parse(fit_args(sweep, run, out))):
            continue
        if base_error := parse(base + pinned):
            raise SweepError(f"{sweep.file}: base: {base_error}")
        settings = [("overrides", k, v) for k, v in sweep.overrides.items()]
        settings += [(run.sources[k], k, v) for k, v in run.settings.items()]
        for section, key, value in settings:
            if one := parse([*base, f"--{key}={cli_value(value)}", *pinned]):
                raise SweepError(f"{sweep.file}: {section}: {key}: {one}")
        raise SweepError(f"{sweep.file}: run {run.run_id}: {error}")
    for run in runs:
        _check_same_settings(sweep, run, out)


@functools.lru_cache(maxsize=1)
def _parser():
    """The Transfusion CLI's parser (subcommands, links), built without parsing or instantiating anything;
    built once per process (parsing leaves it as it was)."""
    from lit_transfusion.cli import TransfusionCLI, build_cli

    class _Parser(Exception):
        pass

    class ParserOnly(TransfusionCLI):
        def init_parser(self, **kwargs):
            return super().init_parser(exit_on_error=False, **kwargs)  # raise ArgumentError, do not exit

        def parse_arguments(self, parser, args) -> None:
            raise _Parser(parser)

    try:
        build_cli(["fit"], cli_class=ParserOnly)
    except _Parser as caught:
        return caught.args[0]
    raise RuntimeError("the CLI did not reach parse_arguments")


def _parse_error(parser, args: list[str], argument_error: type) -> str | None:
    """None if ``args`` parse, else jsonargparse's complaint on one line."""
    import warnings

    from lit_transfusion.cli import _one_line

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parser.parse_args(args)
        except (argument_error, ValueError, TypeError) as e:
            return _one_line(e)
    return None


def _check_same_settings(sweep: Sweep, run: Run, out: str | Path) -> None:
    """A run directory whose run.json holds other settings belongs to another sweep of the same name."""
    info = run_dir(out, sweep, run) / "run.json"
    if info.is_file():
        before = json.loads(info.read_text())
        now = {"base": sweep.base, "overrides": sweep.overrides, "settings": run.settings, "seed": run.seed,
               "budget": run.budget}
        if any(before.get(k) != v for k, v in now.items()):
            raise SweepError(f"{sweep.file}: run {run.run_id}: {info.parent} was made with other settings; "
                             f"give the sweep another name or --out, or remove that directory")


# ----------------------------------------------------------------------------------------------- running
def read_done(directory: Path) -> dict | None:
    path = directory / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(directory: Path) -> bool:
    return (read_done(directory) or {}).get("status") == "finished"


def run_one(sweep: Sweep, run: Run, out: str | Path, threads: int, cwd: str | Path | None = None) -> dict:
    """Run (or skip, or resume) one run in a subprocess; returns its done.json record (``status`` "skipped"
    when it had finished before)."""
    from lit_transfusion.sweep_results import final_metrics

    directory = run_dir(out, sweep, run)
    if is_finished(directory):
        return {**read_done(directory), "status": "skipped"}
    directory.mkdir(parents=True, exist_ok=True)
    cwd = Path(cwd or Path.cwd()).resolve()
    last = directory / "checkpoints" / "last.ckpt"
    ckpt = last if last.is_file() else None
    command = [sys.executable, "-m", "lit_transfusion", *fit_args(sweep, run, out, ckpt)]
    info = {"sweep": sweep.name, "index": run.index, "run_id": run.run_id, "variant": run.variant,
            "family": run.family, "budget": run.budget, "settings": run.settings, "seed": run.seed,
            "metrics": sweep.metrics, "compare": sweep.compare, "base": sweep.base, "overrides": sweep.overrides,
            "args": fit_args(sweep, run, out)}
    (directory / "run.json").write_text(json.dumps(info, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    (directory / "command.txt").write_text(f"cd {shlex.quote(str(cwd))} && OMP_NUM_THREADS={threads} "
                                           f"MKL_NUM_THREADS={threads} {shlex.join(command)}\n")
    start = time.time()
    returncode, tail = _execute(command, cwd, env, directory, start)
    seconds = time.time() - start
    attempt = {"started": start, "seconds": seconds, "returncode": returncode,
               "resumed_from": str(ckpt) if ckpt else None}
    with open(directory / "attempts.jsonl", "a") as f:
        f.write(json.dumps(attempt) + "\n")
    attempts = [json.loads(line) for line in (directory / "attempts.jsonl").read_text().splitlines() if line]
    done = {"status": "finished" if returncode == 0 else "failed", "returncode": returncode,
            "seconds": sum(a["seconds"] for a in attempts), "attempts": len(attempts),
            "final": final_metrics(directory)}
    if returncode != 0:
        done["error"] = tail
    (directory / "done.json").write_text(json.dumps(done, indent=2))
    return done


def _execute(command: list[str], cwd: Path, env: dict, directory: Path, start: float) -> tuple[int, list[str]]:
    """Run ``command`` with its output appended to stdout.log / stderr.log; (exit status, last stderr lines)."""
    header = f"==== {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))}: {shlex.join(command)}\n"
    with open(directory / "stdout.log", "a") as out, open(directory / "stderr.log", "a") as err:
        out.write(header)
        err.write(header)
        out.flush()
        err.flush()
        offset = err.tell()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # the run got the same signal: give it time to write its checkpoint
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
            raise
    with open(directory / "stderr.log", errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in re.split(r"[\r\n]", f.read()) if line.strip()]
    return returncode, lines[-20:]


def run_local(sweep: Sweep, runs: list[Run], out: str | Path, parallel: int) -> list[dict]:
    """Run ``runs`` here, ``parallel`` at a time with cores // parallel threads each; returns their records."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    todo = [r for r in runs if not is_finished(run_dir(out, sweep, r))]
    threads = max(1, cores // max(1, min(parallel, len(todo))))  # one run left (--only i): all the cores
    for run in runs:
        if run not in todo:
            print(f"[{run.index}] {run.run_id}: finished before, skipped", flush=True)
    print(f"{len(todo)} of {len(runs)} runs to go, {max(1, min(parallel, len(todo)))} at a time, "
          f"{threads} threads each", flush=True)

    def one(run: Run) -> dict:
        resumed = (run_dir(out, sweep, run) / "checkpoints" / "last.ckpt").is_file()
        print(f"[{run.index}] {run.run_id}: {'resuming' if resumed else 'starting'}", flush=True)
        done = run_one(sweep, run, out, threads)
        why = f" (exit {done['returncode']}): {done['error'][-1] if done.get('error') else ''}"
        print(f"[{run.index}] {run.run_id}: {done['status']} after {done['seconds']:.0f} s"
              + (why if done["status"] == "failed" else ""), flush=True)
        return done

    warm = {_data_key(r) for r in runs if r not in todo}
    records = _schedule(todo, parallel, one, warm)
    return sorted(records, key=lambda d: d["index"])


def _data_key(run: Run) -> str:
    """What a datamodule's caches depend on among a run's own settings: its data.* keys (the run's seed goes to
    the trainer and the model, not to the data)."""
    return json.dumps(sorted((k, v) for k, v in run.settings.items() if k.startswith("data.")), default=str)


def _schedule(todo: list[Run], parallel: int, one, warm: set[str]) -> list[dict]:
    """Run ``one(run)`` for each run, up to ``parallel`` at once, in order, except that a run whose data
    settings (:func:`_data_key`) no run has finished with yet starts only when no other run is running:
    datamodules write their caches (rendered data, tokenizers) on first use, and two runs writing one cache file
    at once could read each other's half-written file. Runs whose data is ready may join it, and start ahead of
    a run that waits."""
    warm = set(warm)  # data keys some run has finished with
    records: list[dict] = []
    todo = list(todo)
    with ThreadPoolExecutor(parallel) as pool:
        running: dict = {}
        while todo or running:
            for run in list(todo):
                if len(running) < parallel and (not running or _data_key(run) in warm):
                    running[pool.submit(one, run)] = run
                    todo.remove(run)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                records.append({**future.result(), "index": run.index})
                if records[-1]["status"] == "finished":
                    warm.add(_data_key(run))
    return records


# ----------------------------------------------------------------------------------------------- SLURM
def run_index(sweep_file: str, out: str, index: int, cwd: str) -> dict:
    """Run number ``index`` of a sweep file (one SLURM array task; the submitit job function)."""
    sweep = load_sweep(Path(cwd) / sweep_file)
    run = expand(sweep)[index]
    validate(sweep, [run], Path(cwd) / out)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return run_one(sweep, run, Path(cwd) / out, threads, cwd=cwd)


def slurm_options(sweep: Sweep, args: argparse.Namespace) -> dict[str, Any]:
    """The sweep file's ``slurm:`` section with the command-line flags on top."""
    options = dict(sweep.slurm)
    for key in ("partition", "time", "gpus", "cpus", "mem_gb"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    return options


def submit_slurm(sweep: Sweep, runs: list[Run], out: str | Path, options: dict[str, Any],
                 parallel: int, cluster: str | None = None) -> list:
    """Submit the unfinished runs as one submitit job array (``cluster="debug"`` or ``"local"`` runs the same
    array here). Returns the jobs."""
    import submitit

    todo = [r for r in runs if not is_finished(run_dir(out, sweep, r))]
    executor = submitit.AutoExecutor(folder=sweep_dir(out, sweep) / "slurm" / "%j", cluster=cluster)
    parameters = {"name": sweep.name, "timeout_min": _minutes(options.get("time", 60)), "nodes": 1,
                  "tasks_per_node": 1, "cpus_per_task": options.get("cpus", 1),
                  "slurm_array_parallelism": parallel, "slurm_setup": list(options.get("setup", [])),
                  "slurm_additional_parameters": {**{k: options[k] for k in ("account", "qos") if options.get(k)},
                                                  **options.get("additional", {})}}
    for key, name in (("gpus", "gpus_per_node"), ("mem_gb", "mem_gb"), ("partition", "slurm_partition")):
        if options.get(key):  # unset: the cluster's default
            parameters[name] = options[key]
    executor.update_parameters(**parameters)
    cwd = str(Path.cwd().resolve())
    n = len(todo)
    file = str(sweep.file.resolve())
    return executor.map_array(run_index, [file] * n, [str(Path(out).resolve())] * n, [r.index for r in todo],
                              [cwd] * n)


def _minutes(time_limit: int | str) -> int:
    """Minutes from an int or "[D-]HH:MM[:SS]"."""
    if isinstance(time_limit, int):
        return time_limit
    days, _, clock = str(time_limit).rpartition("-")
    parts = [int(p) for p in clock.split(":")] + [0, 0]
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (1 if parts[2] else 0)


def write_sbatch(sweep: Sweep, runs: list[Run], out: str | Path, options: dict[str, Any], parallel: int) -> Path:
    """``<out>/<name>/sweep.sbatch``: a job array whose task i runs run i (finished runs exit at once)."""
    directory = sweep_dir(out, sweep)
    (directory / "slurm").mkdir(parents=True, exist_ok=True)
    minutes = _minutes(options.get("time", 60))
    lines = ["#!/bin/bash",
             f"# Sweep {sweep.name}: {len(runs)} runs, task i runs run i "
             f"(python -m lit_transfusion sweep --config {sweep.file} --dry-run lists them).",
             f"#SBATCH --job-name={sweep.name}",
             f"#SBATCH --array=0-{len(runs) - 1}%{parallel}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={options.get('cpus', 1)}",
             f"#SBATCH --time={minutes // 60:02d}:{minutes % 60:02d}:00",
             f"#SBATCH --output={directory.resolve() / 'slurm' / '%A_%a.out'}"]
    if options.get("gpus"):
        lines.append(f"#SBATCH --gres=gpu:{options['gpus']}")
    if options.get("mem_gb"):
        lines.append(f"#SBATCH --mem={options['mem_gb']}G")
    for key in ("partition", "account", "qos"):
        if options.get(key):
            lines.append(f"#SBATCH --{key}={options[key]}")
    lines += [f"#SBATCH --{k}={v}" for k, v in options.get("additional", {}).items()]
    command = [sys.executable, "-m", "lit_transfusion", "sweep", "--config", str(sweep.file.resolve()),
               "--out", str(Path(out).resolve())]
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd().resolve()))}", *options.get("setup", []),
              f'{shlex.join(command)} --only "$SLURM_ARRAY_TASK_ID"', ""]
    path = directory / "sweep.sbatch"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    # The usage lines and the sweep file format, as the module docstring writes them.
    description = "\n\n".join(__doc__.split("\n\n")[:4]).replace("``", "").replace("::", ":")
    p = argparse.ArgumentParser(prog="python -m lit_transfusion sweep", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="More (run directories, resuming, SLURM): lit_transfusion/sweep.py.")
    p.add_argument("--config", help="the sweep file (YAML)")
    p.add_argument("--out", default="runs/sweeps", help="results go to <out>/<name>/ (default: runs/sweeps)")
    p.add_argument("--parallel", type=int, help="local runs at a time (default: the file's parallel, else 1)")
    p.add_argument("--dry-run", action="store_true", help="check the file, list the runs and exit")
    p.add_argument("--only", type=int, nargs="+", metavar="I", help="run only these run indices (--dry-run lists them)")
    p.add_argument("--collect", metavar="DIR", help="rebuild results.csv/.md and curves.png (and equal_flops.md/.png "
                                                    "with compare:) of <out>/<name>")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--slurm", action="store_true", help="submit a SLURM job array with submitit")
    where.add_argument("--sbatch", action="store_true", help="write <out>/<name>/sweep.sbatch and print how to "
                                                             "submit it")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="SLURM time limit per run: minutes or [D-]HH:MM[:SS]")
    p.add_argument("--gpus", type=int, help="GPUs per run (SLURM)")
    p.add_argument("--cpus", type=int, help="CPU cores per run (SLURM)")
    p.add_argument("--mem_gb", type=int, help="memory per run in GB (SLURM)")
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_transfusion sweep ...``; a wrong sweep file ends with ``error: <file>: <key>: ...``
    and exit status 2 before any run starts."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.time is not None and args.time.isdigit():
        args.time = int(args.time)
    try:
        if args.collect:
            from lit_transfusion.sweep_results import collect

            if not (Path(args.collect) / "runs").is_dir():
                raise SweepError(f"{args.collect}: not a sweep directory (no runs/ in it)")
            collect(args.collect, verbose=True)
            return
        if not args.config:
            parser.error("--config <sweep file> (or --collect DIR) is required")
        _sweep(args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _sweep(args: argparse.Namespace) -> None:
    from lit_transfusion.sweep_results import collect

    sweep = load_sweep(args.config)
    runs = expand(sweep)
    if args.only is not None:
        bad = [i for i in args.only if not 0 <= i < len(runs)]
        if bad:
            raise SweepError(f"{sweep.file}: --only {bad[0]}: the sweep has runs 0..{len(runs) - 1}")
        runs = [runs[i] for i in args.only]
    parallel = args.parallel or sweep.parallel
    validate(sweep, runs, args.out)
    if args.dry_run:
        for run in runs:
            settings = " ".join(f"{k}={cli_value(v)}" for k, v in run.settings.items())
            budget = "" if run.budget is None else f" budget={run.budget:.4g}"
            print(f"{run.index:4d}  {run.run_id}  {settings}{budget} seed={run.seed}".rstrip())
        print(f"{len(runs)} runs -> {sweep_dir(args.out, sweep)}")
        return
    if args.sbatch:
        path = write_sbatch(sweep, runs, args.out, slurm_options(sweep, args), parallel)
        print(f"wrote {path}\nsubmit:  sbatch {path}\nresults: python -m lit_transfusion sweep --collect "
              f"{sweep_dir(args.out, sweep)}   (when the array has finished)")
        return
    if args.slurm:
        jobs = submit_slurm(sweep, runs, args.out, slurm_options(sweep, args), parallel)
        print(f"submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0] if jobs else '-'}; results: "
              f"python -m lit_transfusion sweep --collect {sweep_dir(args.out, sweep)}   (when they have finished)")
        return
    run_local(sweep, runs, args.out, parallel)
    if args.only is None:  # one run of an array does not own the sweep's tables
        collect(sweep_dir(args.out, sweep), verbose=True, compare=sweep.compare)
