"""The ``sweep`` command: its options, from :func:`sweep`'s typed signature through jsonargparse, and what it does
with them (check, list, run here, submit to SLURM or rebuild the results)."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from jsonargparse import ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import PositiveInt

import lit_transfusion.commands.sweep as package
from lit_transfusion.commands.errors import one_line_errors
from lit_transfusion.commands.sweep.expand import cli_value, expand, sweep_dir
from lit_transfusion.commands.sweep.load import load_sweep
from lit_transfusion.commands.sweep.results import collect as collect_results
from lit_transfusion.commands.sweep.runner import run_local
from lit_transfusion.commands.sweep.schema import SweepError
from lit_transfusion.commands.sweep.slurm import slurm_options, submit_slurm, write_sbatch
from lit_transfusion.commands.sweep.validate import validate


def sweep(config: str | None = None, out: str = "runs/sweeps", parallel: PositiveInt | None = None,
          dry_run: bool = False, only: int | list[int] | None = None, collect: str | None = None,
          slurm: bool = False, sbatch: bool = False, partition: str | None = None, time: str | None = None,
          gpus: int | None = None, cpus: int | None = None, mem_gb: int | None = None) -> None:
    """Run a sweep file's grid of fits, or rebuild a finished sweep's results.

    Args:
        config: the sweep file (YAML); required unless --collect
        out: results go to <out>/<name>/
        parallel: local runs at a time (default: the file's parallel, else 1)
        dry_run: check the file, list the runs with their indices and exit
        only: run only this run index, or these ([1,2]); --dry_run lists them
        collect: a sweep directory (<out>/<name>): rebuild its results.csv/.md, curves and equal_flops.md/.png;
            one with only a results.csv (results/<name>): its results.md and equal_flops.md/.png; with --config,
            the file's metrics, compare (claims, floors) and seeds are used
        slurm: submit the unfinished runs as a SLURM job array with submitit
        sbatch: write <out>/<name>/sweep.sbatch (task i runs --only i) and print how to submit it
        partition: SLURM partition (default: the file's slurm.partition)
        time: SLURM time limit per run: minutes or [D-]HH:MM[:SS] (default: the file's, else 60)
        gpus: GPUs per run (SLURM)
        cpus: CPU cores per run (SLURM)
        mem_gb: memory per run in GB (SLURM)
    """
    if collect:
        if not (Path(collect) / "runs").is_dir() and not (Path(collect) / "results.csv").is_file():
            raise SweepError(f"{collect}: not a sweep directory (no runs/ or results.csv in it)")
        loaded = load_sweep(config) if config else None  # its metrics, compare (claims, floors) and seeds
        collect_results(collect, verbose=True, metrics=loaded.metrics if loaded else None,
                        compare=loaded.compare if loaded else None, seeds=loaded.seeds if loaded else None)
        return
    if not config:
        raise SweepError("--config <sweep file> (or --collect DIR) is required")
    if slurm and sbatch:
        raise SweepError("--slurm and --sbatch: choose one")
    loaded = load_sweep(config)
    runs = expand(loaded)
    indices = [only] if isinstance(only, int) else only
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(runs)]
        if bad:
            raise SweepError(f"{loaded.file}: --only {bad[0]}: the sweep has runs 0..{len(runs) - 1}")
        runs = [runs[i] for i in indices]
    parallel = parallel or loaded.parallel
    validate(loaded, runs, out)
    directory = sweep_dir(out, loaded)
    if dry_run:
        for run in runs:
            settings = " ".join(f"{k}={cli_value(v)}" for k, v in run.settings.items())
            budget = "" if run.budget is None else f" budget={run.budget:.4g}"
            print(f"{run.index:4d}  {run.run_id}  {settings}{budget} seed={run.seed}".rstrip())
        print(f"{len(runs)} runs -> {directory}")
        return
    options = slurm_options(loaded, partition=partition, time=time, gpus=gpus, cpus=cpus, mem_gb=mem_gb)
    if sbatch:
        path = write_sbatch(loaded, runs, out, options, parallel)
        print(f"wrote {path}\nsubmit:  sbatch {path}\nresults: python -m lit_transfusion sweep --collect "
              f"{directory}   (when the array has finished)")
        return
    if slurm:
        jobs = submit_slurm(loaded, runs, out, options, parallel)
        print(f"submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0] if jobs else '-'}; results: "
              f"python -m lit_transfusion sweep --collect {directory}   (when they have finished)")
        return
    run_local(loaded, runs, out, parallel)
    if indices is None:  # one run of an array does not own the sweep's tables
        collect_results(directory, verbose=True, compare=loaded.compare, seeds=loaded.seeds)


class _KeepLayout(DefaultHelpFormatter):
    """jsonargparse's help, with the description's own line breaks (the usage lines, the file format)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def parser() -> ArgumentParser:
    """Every argument of :func:`sweep`; a bool option given alone means true (``--dry_run``)."""
    description = "\n\n".join(package.__doc__.split("\n\n")[:4]).replace("``", "").replace("::", ":")
    p = ArgumentParser(prog="python -m lit_transfusion sweep", description=description, exit_on_error=False,
                       formatter_class=_KeepLayout, epilog="More (run directories, resuming, SLURM, the files): "
                                                           "lit_transfusion/commands/sweep/__init__.py.")
    p.add_function_arguments(sweep, as_group=False)
    for name, hint in typing.get_type_hints(sweep).items():
        if hint is bool:
            action = p._option_string_actions[f"--{name}"]
            action.nargs, action.const = "?", True
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_transfusion sweep ...``; a wrong option or sweep file ends with ``error: <file>: <key>: ...``
    and exit status 2 before any run starts."""
    with one_line_errors(SweepError):
        options = parser().parse_args(sys.argv[1:] if argv is None else argv)
        sweep(**{k: v for k, v in options.items() if k != "__default_config__"})
