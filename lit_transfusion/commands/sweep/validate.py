"""The whole sweep checked before any run starts: every run's ``fit`` arguments go through the Transfusion parser
(no model is built), an error is traced to the setting that causes it, and a run directory made with other
settings is refused."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

from jsonargparse import ArgumentError

from lit_transfusion.commands.sweep.expand import Run, cli_value, fit_args, pinned_args, run_dir
from lit_transfusion.commands.sweep.schema import Sweep, SweepError


def validate(sweep: Sweep, runs: list[Run], out: str | Path) -> None:
    """Parse the runs' full argument lists with the Transfusion parser (nothing is built); on an error, find
    the setting that causes it and name it. Runs that differ only in their seed or budget parse alike (budgets are
    checked on loading), so each family (variant and grid point) is parsed once, with its first seed and budget.
    Also refuse a run directory made with other settings."""
    base = ["fit", *[a for c in sweep.base for a in ("--config", c)]]
    pinned = pinned_args(sweep, Run(0, "check", "check", {}, {}, 0), out)
    firsts: dict[str, Run] = {}
    for run in runs:
        firsts.setdefault(run.family or run.variant, run)
    for run in firsts.values():
        if not (error := _parse_error(fit_args(sweep, run, out))):
            continue
        if base_error := _parse_error(base + pinned):
            raise SweepError(f"{sweep.file}: base: {base_error}")
        settings = [("overrides", k, v) for k, v in sweep.overrides.items()]
        settings += [(run.sources[k], k, v) for k, v in run.settings.items()]
        for section, key, value in settings:
            if one := _parse_error([*base, f"--{key}={cli_value(value)}", *pinned]):
                raise SweepError(f"{sweep.file}: {section}: {key}: {one}")
        raise SweepError(f"{sweep.file}: run {run.run_id}: {error}")
    for run in runs:
        _check_same_settings(sweep, run, out)


@functools.lru_cache(maxsize=1)
def transfusion_parser():
    """The Transfusion CLI's parser (subcommands, links), built without parsing or instantiating anything;
    built once per process (parsing leaves it as it was)."""
    from lit_transfusion.commands.cli import TransfusionCLI, build_cli

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


def _parse_error(args: list[str]) -> str | None:
    """None if ``args`` parse, else jsonargparse's complaint on one line."""
    from lit_transfusion.commands.errors import one_line

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            transfusion_parser().parse_args(args)
        except (ArgumentError, ValueError, TypeError) as e:
            return one_line(e)
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
