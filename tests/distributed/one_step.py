"""One optimizer step of the nano TransfusionModule on two CPU processes (gloo); run by
``tests/test_distributed.py`` as ``python tests/distributed/one_step.py --strategy S --out DIR [--meta true]``.

Lightning's ``ddp`` and ``ModelParallelStrategy`` launch this very script again for rank 1. The data are the two
hand-built batches of ``common.per_rank_batches`` behind Lightning's own distributed sampler (batch i is meant
for rank i); timesteps and noise are pinned to each batch's content (``common.pinned``) and the optimizer is
plain SGD, so the test can redo the step in one process and compare. Writes to DIR:

    rank{r}.json     what rank r saw: fingerprints of its batches, its world size and backend, and the
                     fraction of the parameters' elements it holds locally (1.0 unless sharded)
    init.pt          (rank 0) the full state dict at the start of training, after any wrapping/sharding
    final.pt         (rank 0) the full state dict after fit, gathered from all ranks
    final_rank{r}.pt (ddp) each replica's own state dict after fit
    ckpt/            (FSDP2) ``trainer.save_checkpoint``'s distributed checkpoint after fit
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lit_transfusion.module import TransfusionModule  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    LR,
    build_module,
    fingerprint,
    module_kwargs,
    n_targets,
    per_rank_batches,
    perturb_noise_head,
    pinned,
)


class PinnedModule(TransfusionModule):
    """The module under test with t and noise pinned to the batch and SGD instead of AdamW (an AdamW first step
    is lr·sign(g) and would not see a gradient that is, say, summed instead of averaged over ranks)."""

    def losses(self, batch, t=None, generator=None, timestep_sampling="uniform"):
        if self.training:
            t, generator = pinned(batch)
        return super().losses(batch, t=t, generator=generator, timestep_sampling=timestep_sampling)

    def configure_optimizers(self):
        super().configure_optimizers()  # whatever bookkeeping the module does there still happens
        return torch.optim.SGD(self.parameters(), lr=LR)


def full_state(module) -> dict:
    """The full (unsharded) state dict, on CPU; a collective under FSDP2 (call on every rank)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Record(L.Callback):
    def __init__(self, out: Path, perturb: bool):
        self.out, self.perturb, self.seen = out, perturb, []

    def on_train_start(self, trainer, pl_module):
        if self.perturb:  # built on the meta device: the head exists only now
            perturb_noise_head(pl_module, seed=99 + trainer.global_rank)
        init = full_state(pl_module)
        if trainer.global_rank == 0:
            torch.save(init, self.out / "init.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(dict(fingerprint=fingerprint(batch), n_targets=n_targets(batch),
                              num_images=batch.num_images, num_rows=batch.num_rows))

    def on_train_end(self, trainer, pl_module):
        local = full = 0
        for p in pl_module.parameters():
            full += p.numel()
            local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(dict(
            rank=trainer.global_rank, world_size=trainer.world_size,
            backend=torch.distributed.get_backend(), batches=self.seen, local_fraction=local / full,
            global_step=trainer.global_step)))


def first(items):
    return items[0]


def main(strategy: Literal["ddp", "fsdp2", "fsdp2-auto"], out: Path, meta: bool = False) -> None:
    """One optimizer step of the nano TransfusionModule on two CPU processes (gloo), recorded to ``out``.

    Args:
        strategy: ddp; fsdp2 (ModelParallelStrategy, data parallel over both processes); fsdp2-auto (the README's
            bare ModelParallelStrategy class_path)
        out: the directory to write the records to (created)
        meta: build on the meta device (trainer.init_module)
    """
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)

    if strategy == "ddp":
        lightning_strategy = "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        # fsdp2: sharded data parallel over both processes; fsdp2-auto: the README's bare class_path
        lightning_strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                              if strategy == "fsdp2" else ModelParallelStrategy())
    record = Record(out, perturb=meta)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=lightning_strategy, max_steps=1, precision="32-true",
        gradient_clip_val=None, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record],
    )
    if meta:
        with trainer.init_module(empty_init=True):
            module = PinnedModule(**module_kwargs())
    else:
        module = build_module(PinnedModule)
    # batch i is rank i's: Lightning's distributed sampler (shuffle off) hands index r to rank r
    loader = DataLoader(per_rank_batches(), batch_size=1, collate_fn=first)
    trainer.fit(module, train_dataloaders=loader)

    if strategy == "ddp":
        torch.save(module.state_dict(), out / f"final_rank{trainer.global_rank}.pt")
    final = full_state(module)
    if trainer.global_rank == 0:
        torch.save(final, out / "final.pt")
    if strategy != "ddp":
        trainer.save_checkpoint(out / "ckpt")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    auto_cli(main, as_positional=False)
