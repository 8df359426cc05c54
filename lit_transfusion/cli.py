"""Command line: ``python -m lit_transfusion <command> ...``.

    fit | validate | test | predict   train / evaluate a Transfusion model (LightningCLI, ``--config`` YAML)
    vae fit | validate | test         train / evaluate the image autoencoder (LightningCLI over ``VAEModule``)
    vq fit | validate | test          train / evaluate the discrete image tokenizer of the Chameleon-style baseline
                                      (LightningCLI over ``VQModule``)
    sample                            images, captions and mixed text from a checkpoint (``sample.py``)
    export                            a checkpoint -> safetensors + JSON that load without unpickling
    prepare                           a user's images, captions, documents and texts -> streamable training data
    sweep                             a grid of fit runs (local, SLURM array) -> results.csv / results.md / curves

Every command's options come from typed signatures (jsonargparse): ``<command> --help`` lists each one with its
default. For the Transfusion commands the vocabulary size, special-token ids and latent shape are *linked* from
the datamodule, so they are never repeated in YAML.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_transfusion.errors import SettingError
from lit_transfusion.hardware import resolve_precision

# Shown under the Transfusion parser's --help (a single paragraph: the help formatter reflows it).
COMMANDS = ("Other commands: 'vae fit|validate|test --config configs/shapes/vae.yaml' trains the image "
            "autoencoder; 'vq fit|validate|test --config configs/shapes/vq.yaml' trains the discrete image "
            "tokenizer of the Chameleon-style baseline; 'sample --help' generates from a checkpoint; 'export "
            "--help' writes its weights as safetensors + JSON; 'prepare --help' turns your own data into "
            "training data; 'sweep --config configs/sweeps/<name>.yaml' runs a grid of fits and tabulates them.")

# Commands that are not a Trainer loop: name -> "module:function" called with the remaining arguments. Data
# preparation lives beside the datamodules it feeds, so it is named here rather than imported.
ENTRY_POINTS = {
    "sample": "lit_transfusion.sample:main",
    "export": "lit_transfusion.export:main",
    "prepare": "datamodules.files.prepare:main",
    "sweep": "lit_transfusion.commands.sweep.main:main",
}


class HardwareAwareCLI(LightningCLI):
    """LightningCLI that resolves an unset ``trainer.precision`` (null) to what is fast on this machine
    (``hardware.resolve_precision``: bf16-mixed only where bf16 is computed natively); an explicit value wins."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("precision") is None:
            accelerator = trainer.get("accelerator")
            accelerator = accelerator if isinstance(accelerator, str) else "auto"  # an Accelerator object: auto
            trainer["precision"], reason = resolve_precision(None, accelerator)
            rank_zero_info(f"trainer.precision: {reason}")

    def after_fit(self) -> None:
        """The last line ``fit`` prints: the checkpoint that holds the state training ended in, and its step (the
        one ``sample``, ``export``, ``test`` and a resumed ``fit`` should be given)."""
        if self.trainer.is_global_zero:
            print(final_checkpoint_line(self.trainer), flush=True)


def final_checkpoint_line(trainer) -> str:
    """``final checkpoint: <path> (step N)`` from the trainer's checkpoint callbacks; a checkpoint callback that
    does not record which step its ``last.ckpt`` holds (Lightning's own ``ModelCheckpoint``) is named as such."""
    for callback in trainer.checkpoint_callbacks:
        path, step = getattr(callback, "last_model_path", ""), getattr(callback, "last_step", None)
        if path and step is not None:
            return f"final checkpoint: {path} (step {step})"
        if path:
            return (f"last checkpoint: {path} (training ended at step {trainer.global_step}; "
                    f"{type(callback).__name__} may hold an earlier step: use callbacks.checkpoint.FinalCheckpoint)")
    return f"training ended at step {trainer.global_step}; no checkpoint callback with save_last: nothing was saved"


class TransfusionCLI(HardwareAwareCLI):
    """LightningCLI whose links carry data-derived sizes into the model at instantiation, and which builds the
    model on the meta device under FSDP2 (``ModelParallelStrategy``), so each rank materialises only its shards."""

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = config["trainer"].get("strategy")
        class_path = strategy.get("class_path", "") if hasattr(strategy, "get") else str(strategy)
        if class_path.endswith("ModelParallelStrategy"):
            model_args = config["model"].get("init_args")
            if model_args is not None and "empty_init" in model_args:
                model_args["empty_init"] = True
            # The module shards along data parallelism only (FSDP2). Lightning's "auto" sizes would give one
            # machine's devices to tensor parallelism, which the model has no plan for: every rank would hold the
            # whole model and train on the same rows.
            args = strategy.get("init_args") if hasattr(strategy, "get") else None
            devices, nodes = str(config["trainer"].get("devices")), int(config["trainer"].get("num_nodes") or 1)
            if args is not None and args.get("tensor_parallel_size", "auto") == "auto" and devices.isdigit():
                args["tensor_parallel_size"], args["data_parallel_size"] = 1, int(devices) * nodes

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in [
            ("data.vocab_size", "model.init_args.vocab_size"),
            ("data.special_ids", "model.init_args.special_ids"),
            ("data.latent_shape", "model.init_args.latent_shape"),
        ]:
            parser.link_arguments(source, target, apply_on="instantiate")
        # The packer must lay images out with the model's patch size: set it once, on the model.
        parser.link_arguments("model.init_args.patch_size", "data.init_args.patch_size", apply_on="parse")


def build_cli(argv: list[str] | None = None, run: bool = True, cli_class: type | None = None) -> LightningCLI:
    """The Transfusion CLI over ``argv`` (default: ``sys.argv[1:]``); ``run=False`` parses a bare config
    (no subcommand) and only instantiates the model, datamodule and trainer (benchmarks, notebooks)."""
    return (cli_class or TransfusionCLI)(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": COMMANDS} if run else {},
    )


# Image autoencoder commands: name -> "module:LightningModule" trained on an image datamodule, without links.
AUTOENCODERS = {
    "vae": "lit_transfusion.vae:VAEModule",  # continuous latents for Transfusion (configs/shapes/vae.yaml)
    "vq": "lit_transfusion.vq:VQModule",  # discrete codes for the Chameleon-style baseline (configs/shapes/vq.yaml)
}


def build_autoencoder_cli(
    command: str, argv: list[str] | None = None, run: bool = True, cli_class: type | None = None
) -> LightningCLI:
    """An image autoencoder's CLI, ``command`` one of ``AUTOENCODERS``
    (``python -m lit_transfusion vae fit --config configs/shapes/vae.yaml``, or ``vq`` with ``vq.yaml``)."""
    import importlib

    module, name = AUTOENCODERS[command].split(":")
    return (cli_class or HardwareAwareCLI)(
        getattr(importlib.import_module(module), name),
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_transfusion ...``. A bad setting, found while parsing (unknown key, wrong type, missing
    file) or while instantiating (a constructor's ValueError, TypeError, FileNotFoundError), ends the command
    with one line ``error: <setting>: <what is wrong>`` on stderr and exit status 2; an error during training
    keeps its traceback."""
    import warnings
    from argparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command in ENTRY_POINTS:
        import importlib

        module, function = ENTRY_POINTS[command].split(":")
        getattr(importlib.import_module(module), function)(rest)
        return
    # main passes the command line on explicitly (without "vae"/"vq"): LightningCLI's warning about that is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
    try:
        if command in AUTOENCODERS:
            build_autoencoder_cli(command, rest, cli_class=_AutoencoderCommand)
        else:
            build_cli(argv, cli_class=_TransfusionCommand)
    except (ArgumentError, _ConfigError, SettingError) as e:  # a setting the command cannot run with
        print(f"error: {_one_line(e) if isinstance(e, ArgumentError) else e}", file=sys.stderr)
        raise SystemExit(2) from None


class _ConfigError(Exception):
    """A constructor rejected its settings: the one-line message, raised from the constructor's own error."""


class _ReportsBadSettings:
    """LightningCLI mixin: a parse error raises jsonargparse's ``ArgumentError`` (instead of printing the usage
    and exiting) and an error while instantiating the classes raises :class:`_ConfigError`; errors in the
    command itself (``trainer.fit``) pass through untouched."""

    def init_parser(self, **kwargs):
        return super().init_parser(exit_on_error=False, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _BAD_SETTING as e:
            raise _ConfigError(_one_line(e)) from e

    def instantiate_trainer(self, **kwargs):
        try:
            return super().instantiate_trainer(**kwargs)
        except _BAD_SETTING as e:
            raise _ConfigError(f"trainer: {_one_line(e)}") from e


class _TransfusionCommand(_ReportsBadSettings, TransfusionCLI):
    pass


class _AutoencoderCommand(_ReportsBadSettings, HardwareAwareCLI):
    pass


def _bad_setting_errors() -> tuple[type[Exception], ...]:
    from argparse import ArgumentError

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return ArgumentError, ValueError, TypeError, OSError, MisconfigurationException


_BAD_SETTING = _bad_setting_errors()  # what a constructor raises for a setting it rejects
# jsonargparse's report of a failed Union (every model / data setting is `class | None`) around the real error.
_UNION = "Does not validate against any of the Union subtypes"
_NOISE = (_UNION, "Subtypes:", "Errors:", "Given value type:", "Given value:", "Expected a <class 'NoneType'>")


def _one_line(error: BaseException) -> str:
    """jsonargparse's nested report, or a constructor's error wrapped in it, as its most specific line prefixed
    with the setting, e.g. ``model.init_args: option 'not_a_setting' is not accepted (class_path '...')``."""
    import re

    class_path = None
    while error.__cause__ is not None and str(error).startswith(_UNION):
        class_path = class_path or next(iter(re.findall(r"class_path='([^']+)'", str(error))), None)
        error = error.__cause__  # the constructor's own error
    keys: list[str] = []
    leaves: list[tuple[int, str, int]] = []  # (indent, text, number of keys above it)
    given: list[tuple[int, str]] = []
    for line in str(error).splitlines():
        indent = len(line) - len(line.lstrip())
        text = line.strip().removeprefix("- ")
        if m := re.match(r'Parser key "([^"]+)":\s*(.*)', text):
            keys.append(m[1])
            text = m[2]
        elif m := re.match(r"Problem with given class_path '([^']+)':", text):
            keys.append("init_args")
            class_path = m[1]
            continue
        if text.startswith("Given value:") and not text.endswith(")"):  # a plain value, not a Namespace(...)
            given.append((indent, text.removeprefix("Given value:").strip()))
        if text and not text.startswith(_NOISE):
            leaves.append((indent, text, len(keys)))
    if not leaves:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    deepest = max(indent for indent, _, _ in leaves)
    texts = [text for indent, text, _ in leaves if indent == deepest]
    n_keys = next(n for indent, _, n in leaves if indent == deepest)
    message = "; ".join(t[0].lower() + t[1:] if keys and t[1:2].islower() else t for t in texts)
    if n_keys and keys[n_keys - 1] == "init_args":  # the class itself (not one of its settings) is the problem
        message += f" (class_path {class_path!r})"
    elif given and "Got value" not in message:
        message += f" (got {max(given)[1]})"
    setting = ".".join(keys[:n_keys])
    if not setting and class_path and not re.match(r"(model|data|trainer)\b", message):
        setting = class_path  # a constructor error that does not name its setting: name the class
    return f"{setting}: {message}" if setting else message
