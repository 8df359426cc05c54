"""Training compute, counted two ways: the paper's 6·N·D and FLOPs measured on the first training step.

``FlopsCounter`` (every sweep run has it; any fit can: ``--trainer.callbacks+=callbacks.flops.FlopsCounter``)

* runs the first training step of each process (forward, backward, optimizer step) under
  ``torch.utils.flop_counter.FlopCounterMode``, which counts the FLOPs of matmuls, convolutions and attention
  (elementwise ops, norms and the optimizer's updates are not counted: they are a small share and are not in
  6·N·D either). Every step of a packed-row datamodule has the same shapes, so one step stands for all:
  ``flops_per_step = first step's FLOPs × accumulate_grad_batches × world_size`` (all ranks together, like
  ``train/positions_seen``);
* logs ``train/flops_per_step`` and the cumulative ``train/flops_measured = flops_per_step × global_step`` at
  every step (a resumed run measures its first step again and goes on from the checkpoint's global step);
* writes ``flops.json`` to the run directory at every validation and at the end of training, with exact integers:
  ``params`` (N), ``params_non_embedding``, ``flops_per_step``, ``step``, ``positions_seen`` (D, the module's
  ``train/positions_seen``: every non-pad sequence element trained on, all ranks), ``flops_6nd`` and
  ``flops_measured``.

N counts ALL trained parameters (``requires_grad``), embeddings and output heads included, as the paper's
6·N·D does; ``params_non_embedding`` (N less the ``nn.Embedding`` tables) is recorded beside it for the
Kaplan-style count. D is read from ``train/positions_seen`` as logged, so 6·N·D needs a module that logs it.
The measured count includes attention's quadratic term, which 6·N·D leaves out: their ratio grows with the
sequence length (e.g. smaller patches -> more positions per image).
"""

from __future__ import annotations

import json

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.flop_counter import FlopCounterMode

from callbacks.common import run_dir

POSITIONS = "train/positions_seen"  # D, logged by the LightningModule


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(all trained parameters, the same less ``nn.Embedding`` tables). Sharded (DTensor) parameters count at
    their full size; parameters shared between modules count once."""
    trained = {id(p): p for p in module.parameters() if p.requires_grad}
    embedding = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in trained.values())
    return total, total - sum(p.numel() for k, p in trained.items() if k in embedding)


class FlopsCounter(L.Callback):
    """Measures the FLOPs of the first training step and logs the cumulative measured compute; records N, D and
    6·N·D in ``<run dir>/flops.json`` (see the module docstring for what is counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.params = 0
        self.params_non_embedding = 0
        self.flops_per_step: int | None = None
        self._mode: FlopCounterMode | None = None
        self._measured_batch_flops = 0

    # ------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params, self.params_non_embedding = count_parameters(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.flops_per_step is None and self._mode is None:
            # Entered here and left in on_train_batch_end: the window holds the forward, the backward (Lightning's
            # optimizer closure) and the optimizer step of this batch.
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._mode is not None:
            self._leave()
            flops = self._measured_batch_flops
            self.flops_per_step = flops * trainer.accumulate_grad_batches * trainer.world_size
        if self.flops_per_step is not None:
            pl_module.log("train/flops_per_step", float(self.flops_per_step), batch_size=1)
            pl_module.log("train/flops_measured", float(self.flops_per_step * trainer.global_step), batch_size=1)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._mode is not None:  # never leave the counting mode on the dispatch stack
            self._leave()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    # ------------------------------------------------------------------------------------------- work
    def _leave(self) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        self._measured_batch_flops = int(mode.get_total_flops())

    def record(self, trainer: L.Trainer) -> dict:
        """What ``flops.json`` holds now: N, D, the step and both compute counts (integers; None if unknown)."""
        d = trainer.callback_metrics.get(POSITIONS)
        positions = round(float(d)) if d is not None else None
        step = trainer.global_step
        return {
            "params": self.params,
            "params_non_embedding": self.params_non_embedding,
            "flops_per_step": self.flops_per_step,
            "step": step,
            "positions_seen": positions,
            "flops_6nd": 6 * self.params * positions if positions is not None else None,
            "flops_measured": self.flops_per_step * step if self.flops_per_step is not None else None,
        }

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        log_dir = run_dir(trainer)  # beside metrics.json and config.yaml
        if log_dir is None or not self.params:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "flops.json").write_text(json.dumps(self.record(trainer), indent=2))
