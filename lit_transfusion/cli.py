"""Command line: ``python -m lit_transfusion <command> ...``.

    fit | validate | test | predict   train / evaluate a Transfusion model (LightningCLI, ``--config`` YAML)
    vae fit | validate | test         train / evaluate the image autoencoder (LightningCLI over ``VAEModule``)
    sample                            images, captions and mixed text from a checkpoint (``sample.py``)

Every command's options come from typed signatures (jsonargparse): ``<command> --help`` lists each one with its
default. For the Transfusion commands the vocabulary size, special-token ids and latent shape are *linked* from
the datamodule, so they are never repeated in YAML.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_transfusion.hardware import resolve_precision

# Shown under the Transfusion parser's --help (a single paragraph: the help formatter reflows it).
COMMANDS = ("Other commands: 'vae fit|validate|test --config configs/shapes/vae.yaml' trains the image "
            "autoencoder; 'sample --help' generates from a checkpoint.")


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


class TransfusionCLI(HardwareAwareCLI):
    """LightningCLI whose links carry data-derived sizes into the model at instantiation."""

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in [
            ("data.vocab_size", "model.init_args.vocab_size"),
            ("data.special_ids", "model.init_args.special_ids"),
            ("data.latent_shape", "model.init_args.latent_shape"),
        ]:
            parser.link_arguments(source, target, apply_on="instantiate")
        # The packer must lay images out with the model's patch size: set it once, on the model.
        parser.link_arguments("model.init_args.patch_size", "data.init_args.patch_size", apply_on="parse")


def build_cli(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The Transfusion CLI over ``argv`` (default: ``sys.argv[1:]``); ``run=False`` parses a bare config
    (no subcommand) and only instantiates the model, datamodule and trainer (benchmarks, notebooks)."""
    return TransfusionCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": COMMANDS} if run else {},
    )


def build_vae_cli(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The autoencoder's CLI (``python -m lit_transfusion vae fit --config configs/shapes/vae.yaml``)."""
    from lit_transfusion.vae import VAEModule

    return HardwareAwareCLI(
        VAEModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "sample":  # generation: not a Trainer loop
        from lit_transfusion.sample import main as sample_main

        sample_main(rest)
    elif command == "vae":
        build_vae_cli(rest)
    else:
        build_cli(argv)
