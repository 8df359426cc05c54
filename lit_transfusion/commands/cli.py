"""The Lightning commands: ``fit | validate | test`` of a mixed-modal module (``TransfusionModule``,
``ChameleonModule``) and ``vae | vq fit | validate | test`` of the image autoencoders, as LightningCLIs whose
options come from the classes' typed signatures. For the mixed-modal commands the vocabulary size, special-token
ids and latent shape are *linked* from the datamodule, so they are never repeated in YAML. ``build_cli(...,
run=False)`` builds the model, datamodule and trainer of a config without running anything (benchmarks, notebooks).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_transfusion.commands.errors import BAD_SETTING, ConfigError, one_line
from lit_transfusion.hardware import resolve_precision

# Shown under the mixed-modal parser's --help (a single paragraph: the help formatter reflows it).
COMMANDS = ("Other commands: 'vae fit|validate|test --config configs/shapes/vae.yaml' trains the image "
            "autoencoder; 'vq fit|validate|test --config configs/shapes/vq.yaml' trains the discrete image "
            "tokenizer of the Chameleon-style baseline; 'sample --help' generates from a checkpoint; 'export "
            "--help' writes its weights as safetensors + JSON; 'prepare --help' turns your own data into "
            "training data; 'sweep --config configs/sweeps/<name>.yaml' runs a grid of fits and tabulates them.")

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
    return _lightning_cli(cli_class or TransfusionCLI, LightningModule, argv, run,
                          parser_kwargs={"epilog": COMMANDS} if run else {})


def autoencoders() -> dict[str, type[LightningModule]]:
    """Image autoencoder commands: name -> the LightningModule it trains on an image datamodule, without links."""
    from lit_transfusion.vae import VAEModule
    from lit_transfusion.vq import VQModule

    # continuous latents for Transfusion (configs/shapes/vae.yaml); discrete codes for the Chameleon-style
    # baseline (configs/shapes/vq.yaml)
    return {"vae": VAEModule, "vq": VQModule}


def build_autoencoder_cli(
    command: str, argv: list[str] | None = None, run: bool = True, cli_class: type | None = None
) -> LightningCLI:
    """An image autoencoder's CLI, ``command`` one of :func:`autoencoders`
    (``python -m lit_transfusion vae fit --config configs/shapes/vae.yaml``, or ``vq`` with ``vq.yaml``)."""
    return _lightning_cli(cli_class or HardwareAwareCLI, autoencoders()[command], argv, run)


def _lightning_cli(cli_class: type, model_class: type, argv: list[str] | None, run: bool, **kwargs) -> LightningCLI:
    """``cli_class`` over any subclass of ``model_class`` and any datamodule; config.yaml written in the run dir."""
    return cli_class(model_class, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=argv,
                     run=run, save_config_kwargs={"overwrite": True}, **kwargs)


class ReportsBadSettings:
    """LightningCLI mixin: a parse error raises jsonargparse's ``ArgumentError`` (instead of printing the usage
    and exiting) and an error while instantiating the classes raises :class:`ConfigError`; errors in the
    command itself (``trainer.fit``) pass through untouched."""

    def init_parser(self, **kwargs):
        return super().init_parser(exit_on_error=False, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BAD_SETTING as e:
            raise ConfigError(one_line(e)) from e

    def instantiate_trainer(self, **kwargs):
        try:
            return super().instantiate_trainer(**kwargs)
        except BAD_SETTING as e:
            raise ConfigError(f"trainer: {one_line(e)}") from e


class TransfusionCommand(ReportsBadSettings, TransfusionCLI):
    pass


class AutoencoderCommand(ReportsBadSettings, HardwareAwareCLI):
    pass


