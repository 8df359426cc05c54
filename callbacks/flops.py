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
  ``params`` (all trained parameters), ``params_active`` (N), ``params_non_embedding``, ``flops_per_step``,
  ``step``, ``positions_seen`` (D, the module's ``train/positions_seen``: every non-pad sequence element trained
  on, all ranks), ``flops_6nd`` (6·N·D) and ``flops_measured``; with a ``FlopsBudget`` in the run also ``budget``
  and ``planned_steps``.

N is :func:`active_parameters`: ALL trained parameters (``requires_grad``), embeddings and output heads included,
as the paper's 6·N·D does, unless the model says that a position uses only some of them (``active_params()``:
Mixture-of-Transformers runs each position through its modality's copy of the weights, so a dense model of
``active_params()`` weights has the same FLOPs: the MoT paper's equal-FLOPs convention). For every dense model
``params_active == params``. ``params_non_embedding`` (all trained parameters less the ``nn.Embedding`` tables)
is recorded beside them for the Kaplan-style count. D is read from ``train/positions_seen`` as logged, so
6·N·D needs a module that logs it. The measured count includes attention's quadratic term, which 6·N·D leaves
out: their ratio grows with the sequence length (e.g. smaller patches -> more positions per image).

``FlopsBudget(flops=...)`` (``--trainer.callbacks+='{"class_path": "callbacks.flops.FlopsBudget", "init_args":
{"flops": 2.0e+12}}'``; a sweep's ``budgets:`` adds it) trains for a compute budget instead of a step count: it
sets ``trainer.max_steps`` (overriding the configured one) to ``ceil(flops / (6·N·D_step))`` before the optimizer
and its learning-rate schedule are built, so the cosine ends at the budget's last step. D_step is measured: the
mean non-pad positions of the first ``probe_batches`` batches of a fresh training loader × gradient accumulation
× world size. Every text token, image patch or image code counts one position, so families of models that lay
out an image differently are charged for what they actually process.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
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


def active_parameters(module: torch.nn.Module) -> int:
    """N of 6·N·D: the parameters one sequence position runs through. A model that routes each position to part of
    its weights says how many with ``active_params()`` (looked up on the LightningModule's ``model``, then on the
    module itself); any other model: all trained parameters (:func:`count_parameters`)."""
    for owner in (getattr(module, "model", None), module):
        active = getattr(owner, "active_params", None)
        if callable(active):
            return int(active())
    return count_parameters(module)[0]


class FlopsCounter(L.Callback):
    """Measures the FLOPs of the first training step and logs the cumulative measured compute; records N, D and
    6·N·D in ``<run dir>/flops.json`` (see the module docstring for what is counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.params = 0
        self.params_active = 0
        self.params_non_embedding = 0
        self.flops_per_step: int | None = None
        self._mode: FlopCounterMode | None = None
        self._measured_batch_flops = 0

    # ------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params, self.params_non_embedding = count_parameters(pl_module)
        self.params_active = active_parameters(pl_module)

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
        record = {
            "params": self.params,
            "params_active": self.params_active,
            "params_non_embedding": self.params_non_embedding,
            "flops_per_step": self.flops_per_step,
            "step": step,
            "positions_seen": positions,
            "flops_6nd": 6 * self.params_active * positions if positions is not None else None,
            "flops_measured": self.flops_per_step * step if self.flops_per_step is not None else None,
        }
        budget = next((c for c in trainer.callbacks if isinstance(c, FlopsBudget)), None)
        if budget is not None and budget.planned_steps is not None:
            record.update(budget=budget.flops, planned_steps=budget.planned_steps)
        return record

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        log_dir = run_dir(trainer)  # beside metrics.json and config.yaml
        if log_dir is None or not self.params:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "flops.json").write_text(json.dumps(self.record(trainer), indent=2))


def probe_positions(dm: L.LightningDataModule, batches: int) -> float:
    """Mean non-pad positions (``batch.seq.doc_ids >= 0``) per batch of one process, over the first ``batches``
    batches of a FRESH ``dm.train_dataloader()``. Training must see what it would have seen without the probe:
    torch's, numpy's and Python's global random states are restored afterwards (a loader draws from torch's for its
    workers' base seed even without workers; a dataset may draw from any of them), and the loader is a new one,
    not the trainer's."""
    np_state, py_state = np.random.get_state(), random.getstate()
    counts = []
    try:
        with torch.random.fork_rng(devices=[]):  # the CPU generator: loaders build batches on the CPU
            loader = dm.train_dataloader()
            for batch in itertools.islice(loader, batches):
                seq = getattr(batch, "seq", None)
                if seq is None or not hasattr(seq, "doc_ids"):
                    raise TypeError(f"callbacks.flops.FlopsBudget: training batches must be a Batch with "
                                    f"seq.doc_ids, got {type(batch).__name__}")
                counts.append(int((seq.doc_ids >= 0).sum()))
            del loader  # its workers (if any) end with it
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    if not counts or not sum(counts):
        raise ValueError("callbacks.flops.FlopsBudget: the training loader gave no positions to measure")
    return sum(counts) / len(counts)


class FlopsBudget(L.Callback):
    """Train for ``flops`` of compute (6·N·D) instead of a step count: sets ``trainer.max_steps`` to
    ``ceil(flops / (6 · N · D_step))`` in ``setup("fit")`` — before ``configure_optimizers`` reads
    ``trainer.estimated_stepping_batches``, so the learning-rate schedule ends at the budget's last step. The
    configured ``trainer.max_steps`` is overridden; ``trainer.max_time`` still applies (a warning says so).

    Args:
        flops: the training budget in FLOPs (6·N·D).
        probe_batches: training batches drawn from a fresh loader to measure D_step (non-pad positions per step:
            their mean × ``accumulate_grad_batches`` × world size). Rows packed to a fixed length vary little.
        validate_at_end: stop the last step the way early stopping does, so Lightning validates at the budget's
            end whatever ``val_check_interval`` is: the run's final metrics are those of the whole budget.

    N is :func:`active_parameters`. ``flops.json`` (``FlopsCounter``) records ``budget`` and ``planned_steps``.
    A budget below one step's compute is an error. The 6·N·D the run reaches differs from ``flops`` by less than
    one step's worth where batches hold as many positions as the probe measured.
    """

    def __init__(self, flops: PositiveFloat, probe_batches: PositiveInt = 4, validate_at_end: bool = True) -> None:
        super().__init__()
        if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0):
            raise ValueError(f"callbacks.flops.FlopsBudget: flops={flops!r}: a positive number of FLOPs")
        if not (isinstance(probe_batches, int) and probe_batches >= 1):
            raise ValueError(f"callbacks.flops.FlopsBudget: probe_batches={probe_batches!r}: a positive integer")
        self.flops = float(flops)
        self.probe_batches = probe_batches
        self.validate_at_end = validate_at_end
        self.params_active: int | None = None
        self.positions_per_step: float | None = None
        self.planned_steps: int | None = None

    def plan(self, params_active: int, positions_per_step: float) -> int:
        """Steps of ``6 · params_active · positions_per_step`` FLOPs each that spend the budget (the last step may
        pass it by less than one step)."""
        per_step = 6 * params_active * positions_per_step
        if self.flops < per_step:
            raise ValueError(f"callbacks.flops.FlopsBudget: flops={self.flops:.4g} is below one training step "
                             f"(6·N·D_step = 6 × {params_active:,} parameters × {positions_per_step:.1f} positions = "
                             f"{per_step:.4g} FLOPs); raise the budget or use a smaller batch")
        return math.ceil(self.flops / per_step)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.datamodule is None:
            raise ValueError("callbacks.flops.FlopsBudget: needs a datamodule (data: in the config) to measure the "
                             "positions per training step")
        self.params_active = active_parameters(pl_module)
        self.positions_per_step = (probe_positions(trainer.datamodule, self.probe_batches)
                                   * trainer.accumulate_grad_batches * trainer.world_size)
        # Every rank draws the same first rows, but one plan for all ranks must not rest on that.
        steps = int(trainer.strategy.broadcast(self.plan(self.params_active, self.positions_per_step), src=0))
        self.planned_steps = steps
        trainer.fit_loop.epoch_loop.max_steps = steps  # what trainer.max_steps and estimated_stepping_batches read
        per_step = 6 * self.params_active * self.positions_per_step
        rank_zero_info(f"FlopsBudget: {self.flops:.4g} FLOPs = {steps} steps of 6 × {self.params_active:,} parameters "
                       f"× {self.positions_per_step:.1f} positions ({per_step:.4g} FLOPs per step); "
                       f"trainer.max_steps set to {steps}")
        if any(isinstance(c, Timer) for c in trainer.callbacks):
            rank_zero_warn("FlopsBudget: trainer.max_time is set; a run that runs out of time ends before its budget")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.validate_at_end and self.planned_steps is not None and trainer.global_step >= self.planned_steps:
            trainer.should_stop = True  # Lightning validates before it stops (as for early stopping)
