"""The checkpoint every shipped config writes: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` holds the state
at which ``fit`` ended, however it ended."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

# The exit status of a process ended by SIGTERM (128 + 15): a pre-empted run must not look finished to a sweep.
SIGTERM_EXIT = 143


class FinalCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (every argument is Lightning's) whose ``last.ckpt`` is the final state at every stop.

    Lightning 2.6 writes ``last.ckpt`` at the end of training only when no ``last.ckpt`` was written earlier in the
    run: with ``every_n_train_steps: 1000`` a run stopped at step 1,868 by its time budget kept the step-1,000
    state as ``last.ckpt``. This class writes it again whenever the last one is older than the trainer's step, so
    ``max_steps``, ``max_time``, a compute budget (``FlopsBudget``) and early stopping all end with the final
    weights in ``last.ckpt``. Exceptions and SIGINT go through Lightning's ``on_exception`` (``save_on_exception``).

    SIGTERM (a cluster's pre-emption): Lightning notes the signal but, in a single process, acts on it only at the
    end of an epoch, which for a streamed dataset may never come (with several processes it stops every rank at the
    next step). Here the step that follows the signal ends the run through ``on_exception`` (a checkpoint of that
    step, with ``save_on_exception``) and the process exits with status 143, as a process killed by SIGTERM does.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_step: int | None = None  # the global step that last.ckpt holds (None: not written in this run)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.received_sigterm and trainer.world_size == 1:  # several processes: Lightning broadcasts it
            raise SIGTERMException(SIGTERM_EXIT)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self.last_step != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
