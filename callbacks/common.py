"""What the evaluation callbacks share: when they run (every n-th validation, and ``test``), on which ranks, where
their outputs go (``metrics.json``, sample grids as PNG and TensorBoard images), and image generation to uint8.

``EvaluationCallback`` is the hook skeleton; ``callbacks.core.EvaluationCore`` supplies ``compute`` (the metrics every
dataset shares) and names them (``METRICS``), so ``metrics.json`` keeps them only from the evaluations that produced
them. The split evaluated is the datamodule's (``MixedModalData.evaluation_split``).

Ranks: generation runs on global rank 0 only and is logged with ``rank_zero_only=True`` (other ranks go on and
meet rank 0 at the next collective). Under FSDP (``FSDPStrategy``, or FSDP2's ``ModelParallelStrategy``) a
forward needs every rank, so all ranks evaluate the same seeded samples and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn

from lit_transfusion.generation import SamplingConfig, TransfusionSampler
from lit_transfusion.hardware import machine
from lit_transfusion.vae import LatentCodec


class EvaluationCallback(L.Callback):
    """Runs ``compute`` at the end of every ``every_n_evals``-th validation (0: only in ``test``) and in ``test``,
    logs what it returns, and writes ``metrics.json`` (validation: latest + history) or ``metrics_test.json``.

    Subclasses implement ``check_datamodule(dm)`` (raise ``TypeError`` for a datamodule they cannot read; called
    once per evaluation, here) and ``compute(pl_module, dm, split, log_dir=, step=, logger=, stage=, final=) ->
    {"{stage}/<name>": float}``; ``final`` (see :func:`is_final_evaluation`) lets them spend more on the numbers a
    run is judged by.
    """

    METRICS: tuple[str, ...] = ()  # prefixes of the metric names (after "{stage}/") that ``compute`` returns

    def __init__(self, every_n_evals: int = 1):
        super().__init__()
        self.every_n_evals = every_n_evals
        self._evals = 0
        self._history: list[dict] = []
        self._last: dict[str, float] = {}
        self._start: float | None = None

    # ------------------------------------------------------------------------------------------- to implement
    def check_datamodule(self, dm) -> None:
        raise NotImplementedError

    def compute(self, pl_module, dm, split: str, log_dir: Path | None = None, step: int = 0, logger=None,
                stage: str = "val", final: bool = False) -> dict[str, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.time()  # metrics.json's run.wall_seconds: from the start of fit to each evaluation

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._evals += 1
        if self.every_n_evals and self._evals % self.every_n_evals == 0:
            self._evaluate(trainer, pl_module, "val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write_json(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_json(trainer, "test")

    # ------------------------------------------------------------------------------------------- work
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sharded = isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy))  # subclasses too
        self._last = {}
        if not (trainer.is_global_zero or sharded):
            return
        dm = trainer.datamodule
        split = dm.evaluation_split(stage)  # lit_transfusion.data.MixedModalData
        self.check_datamodule(dm)
        start = time.perf_counter()
        was_training = pl_module.training
        zero = trainer.is_global_zero  # under sharding every rank computes; only rank 0 writes files
        metrics = self.compute(pl_module, dm, split, log_dir=run_dir(trainer) if zero else None,
                               step=trainer.global_step, logger=trainer.logger if zero else None, stage=stage,
                               final=is_final_evaluation(trainer, stage))
        pl_module.train(was_training)
        metrics[f"{stage}/eval_seconds"] = time.perf_counter() - start
        for name, value in metrics.items():
            pl_module.log(name, value, rank_zero_only=True)
        self._last = metrics

    def _write_json(self, trainer: L.Trainer, stage: str) -> None:
        log_dir = run_dir(trainer)
        if log_dir is None or not trainer.is_global_zero:
            return
        # The module's own metrics are fresh at every validation; this callback's only where it just ran.
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith(f"{stage}/") and (k in self._last or not self._is_eval_metric(k))}
        entry = {"step": trainer.global_step, **dict(sorted(values.items()))}
        run = {"machine": machine(), "precision": str(trainer.precision), "steps": trainer.global_step,
               "wall_seconds": time.time() - self._start if self._start is not None else None}
        if stage == "val":
            self._history.append(entry)
            payload = {"latest": entry, "history": self._history, "run": run}
            name = "metrics.json"
        else:
            payload, name = {"latest": entry, "run": run}, "metrics_test.json"
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / name).write_text(json.dumps(payload, indent=2))

    def _is_eval_metric(self, name: str) -> bool:
        """Is ``name`` (e.g. ``val/fid``) one of the metrics this callback computes?"""
        metric = name.split("/", 1)[-1]
        return metric.startswith((*self.METRICS, "eval_seconds"))


def is_final_evaluation(trainer: L.Trainer, stage: str) -> bool:
    """Is this the evaluation a run is judged by: ``test``, a standalone ``validate``, or the last validation of
    ``fit`` (``max_steps`` reached, the last batch of the last epoch, or the trainer stopping early)?"""
    if stage == "test" or trainer.state.fn != TrainerFn.FITTING:
        return True
    if trainer.should_stop or (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps):
        return True
    last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and \
        trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def run_dir(trainer: L.Trainer) -> Path | None:
    """The logger's version directory (``runs/<name>/version_<n>``), or the trainer's root without a logger."""
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        return Path(trainer.logger.log_dir)
    return Path(trainer.default_root_dir) if trainer.default_root_dir else None


def tensorboard(logger):
    """The logger's TensorBoard ``SummaryWriter``, or None (no logger, or one that takes no images)."""
    experiment = getattr(logger, "experiment", None)
    return experiment if experiment is not None and hasattr(experiment, "add_image") else None


@torch.no_grad()
def generate_uint8(sampler: TransfusionSampler, codec: LatentCodec, ids: list[list[int]], sampling: SamplingConfig,
                   batch_size: int | None = None) -> torch.Tensor:
    """Images generated from caption ids (no specials), decoded: uint8 [N, 3, H, W], N = len(ids).

    ``batch_size`` bounds the rows of one sampler call (None: all at once). Chunk k is seeded ``sampling.seed + k``
    so chunks do not repeat each other's noise.
    """
    step = batch_size or max(1, len(ids))
    out = []
    for k, i in enumerate(range(0, len(ids), step)):
        cfg = sampling if k == 0 else dataclasses.replace(sampling, seed=sampling.seed + k)
        latents = sampler.generate_images(ids[i : i + step], cfg)
        pixels = (codec.decode(latents) + 1) / 2  # [n, 3, H, W] in [0, 1]
        out.append((pixels * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def log_grid(images: torch.Tensor, labels: list[str], ncol: int, log_dir: Path | None, step: int, logger,
             stage: str) -> torch.Tensor:
    """A labeled grid of ``images`` (uint8 [len(labels) * ncol, 3, H, W], row-major, one label per row) written to
    ``<log_dir>/samples/{stage}_step_<step>.png`` and to TensorBoard as ``{stage}/samples`` (where given).
    Returns the grid, float [3, H', W'] in [0, 1]."""
    from torchvision.utils import save_image

    from lit_transfusion.grid import labeled_grid

    # Rows of ncol samples, upscaled to >= 128 px, each row's label at its left.
    grid = labeled_grid(images.float().cpu() / 255, labels, ncol=ncol)
    if log_dir is not None:
        (log_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image(grid, log_dir / "samples" / f"{stage}_step_{step:06d}.png")
    writer = tensorboard(logger)
    if writer is not None:
        writer.add_image(f"{stage}/samples", grid, step)
        rows = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(labels))
        writer.add_text(f"{stage}/samples_prompts", f"Rows, top to bottom:\n\n{rows}", step)
    return grid
