"""``python -m lit_transfusion prepare``: the command's options are the typed arguments of :func:`prepare`, read by
jsonargparse from ``--config`` YAML and/or flags (``--help`` lists each with its default).

Errors are raised, never printed here: the data layer does not format command-line output. A bad option raises
jsonargparse's ``ArgumentError`` and a setting or source that cannot be prepared a :class:`PrepareError` (a
``SettingError``); ``python -m lit_transfusion`` prints either as one line ``error: ...`` with exit status 2."""

from __future__ import annotations

from datamodules.files.prepare.run import prepare


def prepare_parser():
    """The command's parser: every argument of :func:`prepare`, from ``--config`` YAML and/or flags."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from datamodules.files import prepare as package  # its docstring's first paragraph heads --help

    parser = ArgumentParser(prog="python -m lit_transfusion prepare", exit_on_error=False,
                            description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(prepare)
    return parser


def main(argv: list[str]) -> None:
    """Command line: ``prepare --config prepare.yaml`` (every argument of :func:`prepare` as a key)."""
    parser = prepare_parser()
    ns = parser.parse_args(argv)
    kwargs = parser.instantiate_classes(ns).as_dict()
    kwargs.pop("config", None)
    prepare(**kwargs)
