"""SLURM, without a scheduler of our own: ``--slurm`` submits one job array with submitit (a task per unfinished
run); ``--sbatch`` writes ``<out>/<name>/sweep.sbatch``, whose task i runs ``sweep --config ... --only i``. Each
array task is one process running one run (single-device runs; a multi-device run is a job of its own: Lightning on
SLURM wants one task per device)."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from lit_transfusion.commands.sweep.expand import Run, expand, run_dir, sweep_dir
from lit_transfusion.commands.sweep.load import load_sweep
from lit_transfusion.commands.sweep.runner import cores, is_finished, run_one
from lit_transfusion.commands.sweep.schema import SlurmSection, Sweep
from lit_transfusion.commands.sweep.validate import validate


def run_index(sweep_file: str, out: str, index: int, cwd: str) -> dict:
    """Run number ``index`` of a sweep file (one SLURM array task; the submitit job function)."""
    sweep = load_sweep(Path(cwd) / sweep_file)
    run = expand(sweep)[index]
    validate(sweep, [run], Path(cwd) / out)
    return run_one(sweep, run, Path(cwd) / out, cores(), cwd=cwd)


def slurm_options(sweep: Sweep, **flags) -> SlurmSection:
    """The sweep file's ``slurm:`` section with the command-line flags that are set (not None) on top."""
    return dataclasses.replace(sweep.slurm, **{k: v for k, v in flags.items() if v is not None})


def submit_slurm(sweep: Sweep, runs: list[Run], out: str | Path, options: SlurmSection, parallel: int,
                 cluster: str | None = None) -> list:
    """Submit the unfinished runs as one submitit job array (``cluster="debug"`` or ``"local"`` runs the same
    array here). Returns the jobs."""
    import submitit

    todo = [r for r in runs if not is_finished(run_dir(out, sweep, r))]
    executor = submitit.AutoExecutor(folder=sweep_dir(out, sweep) / "slurm" / "%j", cluster=cluster)
    parameters = {"name": sweep.name, "timeout_min": _minutes(options.time), "nodes": 1, "tasks_per_node": 1,
                  "cpus_per_task": options.cpus, "slurm_array_parallelism": parallel,
                  "slurm_setup": list(options.setup),
                  "slurm_additional_parameters": {**{k: getattr(options, k) for k in ("account", "qos")
                                                     if getattr(options, k)}, **options.additional}}
    for key, name in (("gpus", "gpus_per_node"), ("mem_gb", "mem_gb"), ("partition", "slurm_partition")):
        if getattr(options, key):  # unset: the cluster's default
            parameters[name] = getattr(options, key)
    executor.update_parameters(**parameters)
    cwd = str(Path.cwd().resolve())
    n = len(todo)
    file = str(sweep.file.resolve())
    return executor.map_array(run_index, [file] * n, [str(Path(out).resolve())] * n, [r.index for r in todo],
                              [cwd] * n)


def _minutes(time_limit: int | str) -> int:
    """Minutes from an int or "[D-]HH:MM[:SS]" (or digits alone: minutes)."""
    if isinstance(time_limit, int) or str(time_limit).isdigit():
        return int(time_limit)
    days, _, clock = str(time_limit).rpartition("-")
    parts = [int(p) for p in clock.split(":")] + [0, 0]
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (1 if parts[2] else 0)


def write_sbatch(sweep: Sweep, runs: list[Run], out: str | Path, options: SlurmSection, parallel: int) -> Path:
    """``<out>/<name>/sweep.sbatch``: a job array whose task i runs run i (finished runs exit at once)."""
    directory = sweep_dir(out, sweep)
    (directory / "slurm").mkdir(parents=True, exist_ok=True)
    minutes = _minutes(options.time)
    lines = ["#!/bin/bash",
             f"# Sweep {sweep.name}: {len(runs)} runs, task i runs run i "
             f"(python -m lit_transfusion sweep --config {sweep.file} --dry_run lists them).",
             f"#SBATCH --job-name={sweep.name}",
             f"#SBATCH --array=0-{len(runs) - 1}%{parallel}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={options.cpus}",
             f"#SBATCH --time={minutes // 60:02d}:{minutes % 60:02d}:00",
             f"#SBATCH --output={directory.resolve() / 'slurm' / '%A_%a.out'}"]
    if options.gpus:
        lines.append(f"#SBATCH --gres=gpu:{options.gpus}")
    if options.mem_gb:
        lines.append(f"#SBATCH --mem={options.mem_gb}G")
    for key in ("partition", "account", "qos"):
        if getattr(options, key):
            lines.append(f"#SBATCH --{key}={getattr(options, key)}")
    lines += [f"#SBATCH --{k}={v}" for k, v in options.additional.items()]
    command = [sys.executable, "-m", "lit_transfusion", "sweep", "--config", str(sweep.file.resolve()),
               "--out", str(Path(out).resolve())]
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd().resolve()))}", *options.setup,
              f'{shlex.join(command)} --only "$SLURM_ARRAY_TASK_ID"', ""]
    path = directory / "sweep.sbatch"
    path.write_text("\n".join(lines))
    return path
