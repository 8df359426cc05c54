"""The losses and gradient norm of each main config on a fixed seed, batch and initialisation: a fingerprint of the
numbers a refactor must not change.

    python benchmarks/fixed_seed_losses.py [--out results/fixed_seed_losses.json]

Each config (``CONFIGS``) is built through the CLI as users build it, shrunk to a nano model and 64 images (the
data cache goes to a temporary directory), in fp32 on the CPU; the first training batch of a seeded loader goes
through ``module.training_losses`` with the step-0 generator, then one backward pass.
``tests/test_fixed_seed_losses.py`` compares a fresh run with the committed JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_transfusion.commands.cli import build_cli  # noqa: E402

CONFIGS = ("configs/shapes/tiny.yaml", "configs/shapes/chameleon.yaml")


def shrink(cache: Path) -> list[str]:
    """Overrides that make a config seconds-long (the model's size and the data's count; nothing of the method)."""
    return ["--model.init_args.size=nano", f"--data.init_args.data_dir={cache}", "--data.init_args.num_train=64",
            "--data.init_args.num_val=32", "--data.init_args.val_rows=4", "--data.init_args.cond_gap_pairs=16",
            "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.precision=32"]


def fingerprint(config: str, cache: Path) -> dict[str, float]:
    """``loss``, ``loss_text``, ``loss_image`` and the gradient norm of ``config`` on its first training batch."""
    cli = build_cli(["--config", config, *shrink(cache)], run=False)
    module, dm = cli.model, cli.datamodule
    module.trainer = cli.trainer  # the step generator reads the global step and rank from it
    dm.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    module.train()
    out = module.training_losses(batch)
    out["loss"].backward()
    grads = [p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None]
    return {**{k: float(out[k]) for k in ("loss", "loss_text", "loss_image")},
            "grad_norm": float(torch.stack(grads).sum().sqrt())}


def main(out: str | None = None) -> dict[str, dict[str, float]]:
    """Print (and with ``out``, write as JSON) the fingerprint of every config in ``CONFIGS``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = {config: fingerprint(config, Path(tmp) / Path(config).stem) for config in CONFIGS}
    for config, values in result.items():
        print(config, " ".join(f"{k}={v:.8g}" for k, v in values.items()))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
