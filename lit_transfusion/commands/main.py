"""``python -m lit_transfusion <command> ...``: one entry point, one error handler.

    fit | validate | test             train / evaluate a mixed-modal model (LightningCLI, ``--config`` YAML)
    vae fit | validate | test         train / evaluate the image autoencoder (LightningCLI over ``VAEModule``)
    vq fit | validate | test          train / evaluate the discrete image tokenizer of the Chameleon-style baseline
    sample                            images, captions and mixed text from a checkpoint or an export
    export                            a checkpoint -> safetensors + JSON that load without unpickling
    prepare                           a user's images, captions, documents and texts -> streamable training data
    floors                            floors and ceilings of the shapes-world scores -> results/floors/
    sweep                             a grid of fit runs (local, SLURM array) -> results.csv / results.md / curves
    results                           RESULTS.md's tables from results/ (--check: is the committed file current)
    reference add | band | overlay    the main job's band over seeds (results/reference/) and a run read against it

Every command's options come from typed signatures (jsonargparse): ``<command> --help`` lists each one with its
default. A bad setting, found while parsing (unknown key, wrong type, missing file), while instantiating (a
constructor's ValueError, TypeError, FileNotFoundError) or by the command itself (``SettingError``) ends it with one
line ``error: <setting>: <what is wrong>`` on stderr and exit status 2; an error during training keeps its
traceback.
"""

from __future__ import annotations

import sys
import warnings


def main(argv: list[str] | None = None) -> None:
    """Run the command ``argv[0]`` (default: ``sys.argv[1:]``) with the rest of ``argv``."""
    from lit_transfusion.commands.errors import one_line_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    with one_line_errors():
        if command == "sample":
            from lit_transfusion.commands.sample import main as sample

            sample(rest)
        elif command == "export":
            from lit_transfusion.commands.export import main as export

            export(rest)
        elif command == "prepare":
            from datamodules.files.prepare import main as prepare

            prepare(rest)
        elif command == "floors":
            from lit_transfusion.commands.floors import main as floors

            floors(rest)
        elif command == "results":
            from lit_transfusion.commands.results_md import main as results

            results(rest)
        elif command == "reference":
            from lit_transfusion.commands.reference.main import main as reference

            reference(rest)
        elif command == "sweep":
            from lit_transfusion.commands.sweep.main import main as sweep

            sweep(rest)
        elif command in ("vae", "vq"):
            from lit_transfusion.commands.cli import AutoencoderCommand, build_autoencoder_cli

            _quiet_lightning_args_warning()
            build_autoencoder_cli(command, rest, cli_class=AutoencoderCommand)
        else:
            from lit_transfusion.commands.cli import TransfusionCommand, build_cli

            _quiet_lightning_args_warning()
            build_cli(argv, cli_class=TransfusionCommand)


def _quiet_lightning_args_warning() -> None:
    # main passes the command line on explicitly (without "vae"/"vq"): LightningCLI's warning about that is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
