"""The ``reference`` command: its subcommands' options, from the typed signatures below through jsonargparse."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from jsonargparse import ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import PositiveInt

import lit_transfusion.commands.reference as package


def add(run_dir: str, name: str | None = None, into: str = "results/main_job",
        config: str = "configs/shapes/tiny.yaml", allow_unfinished: bool = False) -> Path:
    """Copy a finished fit run of the main job into <into>/<name>/ and rewrite <into>/runs.md.

    Args:
        run_dir: the run directory (runs/<name>/version_N: TensorBoard event files, metrics.json, config.yaml)
        name: the entry's name (default: <CPU class>-seed<seed_everything>, e.g. avx512bf16-seed0)
        into: the directory of the main job's runs
        config: the config file the run was started with (recorded; the run's config.yaml is compared with it)
        allow_unfinished: also copy a run whose schedule has not ended (val/schedule_progress < 1)
    """
    from lit_transfusion.commands.reference.add import add as run

    return run(run_dir, name, into, config, allow_unfinished)


def band(runs: str = "results/main_job", out: str = "results/reference", min_runs: PositiveInt = 3,
         window: PositiveInt = 250, names: list[str] | None = None) -> Path:
    """The reference band of the runs of one config under --runs: band.csv, band.json, band.md, band.png.

    Args:
        runs: the directory of the main job's runs (entries made by reference add)
        out: where band.csv, band.json, band.md and band.png go
        min_runs: the fewest runs (seeds) of one config to make a band of
        window: train/ losses are averaged over windows of this many steps
        names: only these entries of --runs (e.g. [avx512bf16-seed0,avx512bf16-seed1,avx512bf16-seed2])
    """
    from lit_transfusion.commands.reference.band import band as make

    return make(runs, out, min_runs, window, names)


def overlay(run: str, band: str = "results/reference", out: str | None = None) -> Path:
    """Read a run against the band: overlay.md (printed) and overlay.png.

    Args:
        run: a live run directory (runs/<name>/version_N, with event files) or an entry of results/main_job
        band: the band's directory (band.csv, band.json)
        out: where overlay.md and overlay.png go (default: the run's directory)
    """
    from lit_transfusion.commands.reference.overlay import overlay as read

    return read(run, band, out)


def steps(runs: list[str], metric: str = "val/cond_gap", band: str = "results/reference",
          out: str | None = None) -> str:
    """Several runs on one metric at every step of the band, side by side: steps.md (printed).

    Args:
        runs: live run directories or entries of a runs directory (e.g. [results/unet_main/a,runs/x/version_0])
        metric: one of the band's metrics (band.json's tags)
        band: the band's directory (band.csv, band.json)
        out: the markdown file written (default: only printed)
    """
    from lit_transfusion.commands.reference.steps import steps as table

    return table(runs, metric, band, out)


SUBCOMMANDS = {"add": add, "band": band, "overlay": overlay, "steps": steps}


class _KeepLayout(DefaultHelpFormatter):
    """jsonargparse's help, with the description's own line breaks (the usage lines)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def parser() -> ArgumentParser:
    """``reference {add,band,overlay,steps}``, each with the arguments of its function (required ones positional);
    a bool option given alone means true (``--allow_unfinished``)."""
    description = package.__doc__.replace("``", "")
    p = ArgumentParser(prog="python -m lit_transfusion reference", description=description, exit_on_error=False,
                       formatter_class=_KeepLayout, epilog="Each subcommand's options: reference <subcommand> --help.")
    subcommands = p.add_subcommands(dest="subcommand")
    for name, function in SUBCOMMANDS.items():
        summary = function.__doc__.split("\n\n")[0]
        sub = ArgumentParser(prog=f"python -m lit_transfusion reference {name}", description=summary,
                             exit_on_error=False)
        sub.add_function_arguments(function, as_group=False, as_positional=True)
        for key, hint in typing.get_type_hints(function).items():
            if hint is bool:
                action = sub._option_string_actions[f"--{key}"]
                action.nargs, action.const = "?", True
        subcommands.add_subcommand(name, sub, help=summary)
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_transfusion reference <subcommand> ...``."""
    options = parser().parse_args(sys.argv[1:] if argv is None else argv)
    name = options.subcommand
    SUBCOMMANDS[name](**{k: v for k, v in options[name].items() if k != "__default_config__"})
