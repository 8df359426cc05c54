"""Command line: ``python -m lit_transfusion {fit,validate,test,predict} --config ...`` (LightningCLI),
and ``python -m lit_transfusion sample --ckpt_path ...`` (see ``sample.py``).

Two model families share the entry point:
- the Transfusion model (``lit_transfusion.module.TransfusionModule``): vocabulary size, special-token ids
  and latent shape are *linked* from the datamodule, so they are never repeated in YAML;
- the VAE (``lit_transfusion.vae.VAEModule``): trained on images alone, nothing to link.
Which CLI is built is decided by the ``model.class_path`` named in the ``--config`` files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Nothing may download at run time; diffusers reads this when it is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402


class TransfusionCLI(LightningCLI):
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


def _configured_model_class(argv: list[str]) -> str:
    """The ``model.class_path`` of the last ``--config`` file that names one ('' if none)."""
    import yaml

    found = ""
    for i, arg in enumerate(argv):
        path = None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path and Path(path).is_file():
            cfg = yaml.safe_load(Path(path).read_text()) or {}
            model = cfg.get("model") if isinstance(cfg, dict) else None
            if isinstance(model, dict) and model.get("class_path"):
                found = str(model["class_path"])
        if arg.startswith("--model=") or (arg == "--model" and i + 1 < len(argv)):
            found = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
    return found


def build_cli(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and build the CLI; ``run=False`` parses a bare config
    (no subcommand) and only instantiates the model, datamodule and trainer (benchmarks, notebooks)."""
    args = argv  # None: LightningCLI reads sys.argv itself (and warns if given both)
    argv = list(sys.argv[1:] if argv is None else argv)
    cli_class = LightningCLI if _configured_model_class(argv).endswith("VAEModule") else TransfusionCLI
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if argv_list[:1] == ["sample"]:  # generation: not a Trainer loop, its own small parser
        from lit_transfusion.sample import main as sample_main

        return sample_main(argv_list[1:])
    build_cli(argv)
