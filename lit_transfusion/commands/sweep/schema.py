"""The sweep file's schema: :class:`SweepFile` and its sections, typed dataclasses that jsonargparse checks a file
against (``load.py``), and :class:`Sweep`, a loaded and checked file, which the rest of the command works from."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from jsonargparse.typing import PositiveInt, restricted_number_type

# Set by the runner for every run: a sweep that sets them itself would be silently overridden.
PINNED = ("seed_everything", "model.init_args.seed", "trainer.logger", "ckpt_path", "config")
SAFE = re.compile(r"[^A-Za-z0-9._=+,-]")  # characters kept in a run id (it is a directory name)
Flops = restricted_number_type("Flops", float, [(">", 0), ("<", math.inf)])  # a finite, positive compute budget


class SweepError(Exception):
    """A sweep file is wrong: the message names the file, the section and the key."""


@dataclasses.dataclass
class Claim:
    """One of ``compare.claims``: the paper's finding that ``arm`` beats ``reference`` on ``metric``, in the raw
    value's ``direction``; the report prints its verdict (``lit_transfusion.stats.verdict``) from the two intervals."""

    metric: str
    """the metric the claim is about, e.g. val/fid"""
    arm: str
    """the family the paper found better (a variant name with its grid point)"""
    reference: str
    """the family it is compared with"""
    direction: str
    """"lower" (the arm's raw value is lower, e.g. FID) or "higher" (e.g. caption accuracy)"""
    paper: str | None = None
    """what the paper measured, in words (printed beside the verdict)"""


@dataclasses.dataclass
class CompareSection:
    """``compare:``: the equal-compute analysis (``reference``; needs ``budgets``), written to equal_flops.md / .png,
    and the paper's ``claims``, whose verdicts results.md (and equal_flops.md) print."""

    reference: str | None = None
    """the family the others are matched against: a variant name with its grid point (a run id less budget and seed)"""
    metrics: list[str] | None = None
    """the metrics to fit and match (default: the sweep's ``metrics``)"""
    claims: list[Claim] | None = None
    """the paper's directions: [{metric: val/fid, arm: transfusion, reference: chameleon, direction: lower}, ...]"""
    floors: dict[str, float | list[float] | str] | None = None
    """per metric its floor (chance level or control): a number, [low, high], or "<file.json>:<dotted.key>" naming
    one of those (or {mean, low, high}) in a JSON file such as results/floors/floors.json"""
    draws: list[str] | None = None
    """the metrics on which a run must be clear of its floor to count as drawing (each needs a floor): equal_flops.md
    says per family and budget whether every seed is, and the smallest budget at which every family draws"""


@dataclasses.dataclass
class SlurmSection:
    """``slurm:``: what each run asks SLURM for (``--slurm`` / ``--sbatch``; the command's flags override it)."""

    partition: str | None = None
    """SLURM partition (unset: the cluster's default)"""
    time: int | str = 60
    """time limit per run: minutes or "[D-]HH:MM[:SS]\""""
    gpus: int | None = None
    """GPUs per run (unset: none requested)"""
    cpus: int = 1
    """CPU cores per run"""
    mem_gb: int | None = None
    """memory per run in GB (unset: the cluster's default)"""
    account: str | None = None
    """SLURM account"""
    qos: str | None = None
    """SLURM quality of service"""
    setup: list[str] = dataclasses.field(default_factory=list)
    """shell lines run before each run, e.g. ["source .venv/bin/activate"]"""
    additional: dict[str, Any] = dataclasses.field(default_factory=dict)
    """more #SBATCH options: name -> value"""


@dataclasses.dataclass
class SweepFile:
    """What a sweep file (YAML) may say; every section but ``base`` may be left out."""

    base: str | list[str]
    """the runs' config file, or a list of them applied in order like repeated --config (relative to the working
    directory)"""
    name: str | None = None
    """results go to <out>/<name>/ (default: the file's stem); letters, digits and . _ = + , -"""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """dotted LightningCLI keys -> values, for every run (a variant or the grid may refine one)"""
    grid: dict[str, list[Any]] | None = None
    """cartesian product: dotted key -> list of values"""
    variants: list[dict[str, Any]] | None = None
    """named sets of overrides (ablations touching several keys): [{name: causal, <dotted key>: <value>}, ...]"""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """each run sets seed_everything and model.init_args.seed to its seed"""
    budgets: list[Flops] | None = None
    """train each run for these compute budgets (6·N·D FLOPs) instead of trainer.max_steps"""
    compare: CompareSection | None = None
    """equal-compute analysis of the budget runs"""
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["val/loss"])
    """what results.md and curves.png show (results.csv has every val/ metric)"""
    parallel: PositiveInt = 1
    """local runs at a time; each gets cores // parallel threads"""
    slurm: SlurmSection = dataclasses.field(default_factory=SlurmSection)
    """SLURM resources per run"""


@dataclasses.dataclass
class Sweep:
    """A loaded, checked sweep file: :class:`SweepFile` with its defaults filled in (``compare``: its metrics)."""

    file: Path
    name: str
    base: list[str]
    overrides: dict[str, Any]
    grid: dict[str, list]
    variants: list[dict[str, Any]]
    seeds: list[int]
    metrics: list[str]
    parallel: int = 1
    slurm: SlurmSection = dataclasses.field(default_factory=SlurmSection)
    budgets: list[float] = dataclasses.field(default_factory=list)
    compare: dict[str, Any] | None = None
    """{"reference": family | None, "metrics": [...], "claims": [{metric, arm, reference, direction, paper}],
    "floors": {metric: [mean, low, high]}}: metrics filled in, floors read"""
