"""MixedModalModule: the modality-agnostic training module around one ``TransfusionModel``.

It owns what every image representation shares: the AdamW optimizer and warmup-cosine schedule, logging,
``val/cond_gap`` and its interval (per-pair terms from the representation, ``cond_gap.py``), non-finite-loss
handling, the per-step random generator and ``train/positions_seen`` (the D of 6·N·D). What depends on what an
image *is* -- the loss, the sampler, the codec's type, what the data must provide -- is its ``representation``
(``lit_transfusion.representation``: ``LatentDiffusion`` or ``DiscreteCodes``). The shipped modules are thin
subclasses that build the network config and the representation from typed CLI arguments:
``TransfusionModule`` (``module.py``) and ``ChameleonModule`` (``chameleon.py``).

The codec (pixels <-> the representation's images) is frozen and never enters a checkpoint, so it is not a
constructor argument. The module gets it in one of two ways:

- in ``setup``, from the trainer's datamodule (``lit_transfusion.data.MixedModalData.image_codec``), loaded
  lazily on the first use of :attr:`codec` (a training run without evaluation never loads it);
- by :meth:`attach_codec`, from whoever builds a module outside a trainer (``sample.load_run``, ``export``).

Consumers (evaluation callbacks, ``sample``, ``export``, benchmarks, notebooks) reach images only through
:meth:`sampler` and :attr:`codec`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_transfusion.attention import hybrid_mask
from lit_transfusion.batch import Batch, CaptionPairs, Seq, SpecialIds
from lit_transfusion.cond_gap import cond_gap, cond_gap_interval
from lit_transfusion.generation import TransfusionSampler
from lit_transfusion.model import ModelConfig, ModelOutput, TransfusionModel
from lit_transfusion.representation import ImageRepresentation
from lit_transfusion.schedule import WarmupCosine, training_timer


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW (decoupled weight decay on matrices only) and the warmup-cosine learning-rate schedule."""

    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 4000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        # Plain numbers: the CLI passes jsonargparse's float subclasses (PositiveFloat, ...), which would reach the
        # optimizer's state in checkpoints and make them unloadable with torch.load(weights_only=True).
        for name, kind in (("lr", float), ("min_lr", float), ("warmup_steps", int), ("weight_decay", float),
                           ("eps", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


def model_config(size: str, **overrides) -> ModelConfig:
    """``ModelConfig.from_size`` with its errors named as the CLI setting (``model.init_args.<key>: ...``)."""
    try:
        return ModelConfig.from_size(size, **overrides)
    except ValueError as e:
        raise ValueError(f"model.init_args.{e}") from None


class MixedModalModule(L.LightningModule):
    """Training of one transformer on text and images, images as ``representation`` says.

    Args:
        config: the network (``TransfusionModel``) configuration.
        representation: how images are modelled (its loss, sampler and codec type).
        special_ids: ids of <pad> <bos> <eos> <boi> <eoi> (and ``first_code`` for codes).
        optimizer: AdamW and the schedule.
        attention: "auto" (flex attention on CUDA, SDPA with a dense bool mask elsewhere), "sdpa" or "flex".
        seed: seeds what the representation draws per step (diffusion: timesteps and noise; codes: nothing), from
            a generator seeded with (seed, step, rank): a resumed run draws exactly what the uninterrupted run drew.
        nonfinite: "stop" (raise before any weight changes) or "skip" (count in ``train/nonfinite_skipped``).
        empty_init: build the network on the meta device; ``configure_model`` materialises each rank's shards.

    Subclasses call ``self.save_hyperparameters()`` after this ``__init__``: the hyper-parameters are theirs (the
    CLI's arguments), this class reads none of them.
    """

    def __init__(
        self,
        config: ModelConfig,
        representation: ImageRepresentation,
        special_ids: dict[str, int],
        optimizer: OptimizerSettings,
        attention: str = "auto",
        seed: int = 0,
        nonfinite: str = "stop",
        empty_init: bool = False,
    ):
        super().__init__()
        representation.check_data(special_ids, config.vocab_size)
        self.config, self.special, self.optim = config, special_ids, optimizer
        self.attention, self.seed, self.nonfinite = attention, seed, nonfinite
        with torch.device("meta") if empty_init else contextlib.nullcontext():
            self.model = TransfusionModel(config)
        self.representation = representation  # no parameters, no persistent buffers: checkpoints hold `model.*`
        self._codec = None  # kept out of the module tree (never in a checkpoint): see `codec`
        self._codec_loader: Callable[[], torch.nn.Module] | None = None
        self._schedule: WarmupCosine | None = None  # set by configure_optimizers (fit only)
        self._cond_gap_terms: list[Tensor] = []  # per validation: [n, levels, 2] per caption-pair batch
        self._step_start = 0.0
        self._nonfinite_skipped = 0
        self._positions_seen = 0  # sequence elements trained on (text tokens, <boi>/<eoi>, patches; no pads), all ranks

    # ------------------------------------------------------------------------------------------- codec
    def attach_codec(self, codec: torch.nn.Module | Callable[[], torch.nn.Module]) -> None:
        """Give the module its frozen codec, or a function loading it on first use."""
        if isinstance(codec, torch.nn.Module):
            self.__dict__["_codec"], self._codec_loader = codec, None  # __dict__: not a submodule
        else:
            self.__dict__["_codec"], self._codec_loader = None, codec

    @property
    def codec(self) -> torch.nn.Module:
        """The frozen codec between pixels [N, 3, H, W] in [-1, 1] and this representation's images, on the
        module's device (``LatentCodec``: latents [N, C, h, w]; ``CodeCodec``: codes [N, h, w])."""
        if self.__dict__["_codec"] is None:
            if self._codec_loader is None:
                raise RuntimeError(f"{type(self).__name__} has no codec: fit/validate/test with a datamodule "
                                   "(lit_transfusion.data.MixedModalData), or call attach_codec(codec)")
            self.__dict__["_codec"] = self._codec_loader()
        expected = self.representation.codec_type
        if not isinstance(self.__dict__["_codec"], expected):  # e.g. VAE latents data for a codes model
            raise TypeError(f"{type(self).__name__}: the data's codec is a {type(self.__dict__['_codec']).__name__}; "
                            f"its {type(self.representation).__name__} images need a {expected.__name__}")
        codec = self.__dict__["_codec"].to(self.device)
        self.__dict__["_codec"] = codec
        return codec

    def setup(self, stage: str) -> None:
        # The datamodule is the codec's source (see the module docstring); loaded only when first used.
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and self._codec_loader is None and self.__dict__["_codec"] is None:
            # A lambda, not the bound method: a datamodule without a codec trains as long as nothing needs images.
            self.attach_codec(lambda: dm.image_codec())

    def configure_model(self) -> None:
        """Shard (FSDP2 under Lightning's ``ModelParallelStrategy``: each block, then the rest as one unit) and
        materialise a meta-device model (each rank only its shards). Other strategies
        (DDP, ``fsdp``) get the model as built."""
        mesh = self.device_mesh
        if mesh is not None and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"trainer.strategy: ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()}: "
                "this model shards along data parallelism only (FSDP2); set init_args.data_parallel_size to the "
                "number of processes and tensor_parallel_size: 1 (the CLI does this when both are 'auto')")
        if mesh is not None and not getattr(self.model, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            dp_mesh = mesh["data_parallel"]
            for block in self.model.transformer.blocks:
                fully_shard(block, mesh=dp_mesh)
            fully_shard(self.model, mesh=dp_mesh)
            self.model._sharded = True
        if any(p.is_meta for p in self.model.parameters()):
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self.model.to_empty(device=device)
            with torch.random.fork_rng(devices=[]):
                if mesh is not None:
                    # Each rank draws its own shards. On CPU, DTensor has no cross-rank RNG tracker: ranks seeded
                    # alike would fill their shards with the same numbers (rows repeated across the model).
                    torch.manual_seed(torch.initial_seed() + 1_000_003 * (self.trainer.global_rank + 1))
                self.model.init_weights()

    # ----------------------------------------------------------------------------------------- forward
    def attention_mask(self, seq: Seq):
        """The hybrid mask of ``seq`` in the rendering the ``attention`` setting picks."""
        return hybrid_mask(seq.doc_ids, seq.image_ids, image_attention=self.config.image_attention,
                           attention=self.attention)

    def forward(self, batch: Batch, latents: Tensor | None = None, t: Tensor | None = None) -> ModelOutput:
        """The model over ``batch`` with its images given as ``latents`` [N, C, h, w] at timesteps ``t`` [N];
        without them, the batch's images clean (``representation.clean_inputs``)."""
        if latents is None or t is None:
            latents, t = self.representation.clean_inputs(batch, self.config.latent_shape)
        return self.model(batch.seq, latents.to(self.dtype), t, self.attention_mask(batch.seq))

    def losses(self, batch: Batch, t: Tensor | None = None, generator: torch.Generator | None = None,
               timestep_sampling: str = "uniform") -> dict[str, Tensor]:
        """The representation's losses of ``batch`` (``LatentDiffusion.losses`` / ``DiscreteCodes.losses``)."""
        return self.representation.losses(self, batch, t=t, generator=generator, timestep_sampling=timestep_sampling)

    def text_targets(self, targets: Tensor) -> Tensor:
        """``targets`` [B, L] with only text targets kept (perplexities count text)."""
        return self.representation.text_targets(targets)

    def sampler(self, special: SpecialIds | None = None, use_cache: bool = True) -> TransfusionSampler:
        """The sampler of this model (default: the model's own special ids); callbacks, ``sample`` and benchmarks
        generate through it."""
        special = special if special is not None else SpecialIds(**self.special)
        sampler = self.representation.sampler(self.model, special, use_cache=use_cache)
        sampler.attention = self.attention  # generate with the attention the module trains with
        return sampler

    # ---------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def step_generator(self) -> torch.Generator:
        """The generator of this step's random draws: a function of (seed, global step, rank) only,
        so resuming from a checkpoint reproduces the draws exactly, whatever else consumed random numbers."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        step = self.trainer.global_step if self._trainer is not None else 0
        seed = (self.seed * 1_000_003 + step) * 1024 + rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """:meth:`losses` with this step's generator (``step_generator``) and the representation's sampling of t."""
        return self.losses(batch, generator=self.step_generator(),
                           timestep_sampling=self.representation.timestep_sampling)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        out = self.training_losses(batch)
        if not torch.isfinite(out["loss"]):
            bad = [k for k in ("loss_text", "loss_image") if not torch.isfinite(out[k])] or ["loss"]
            message = (f"non-finite training loss at step {self.trainer.global_step}: "
                       f"{', '.join(f'{k}={float(out[k])}' for k in bad)}")
            if self.nonfinite == "stop":
                raise FloatingPointError(message + " (no weights were changed; set model.init_args.nonfinite=skip "
                                         "to skip such steps instead)")
            self._nonfinite_skipped += 1
            rank_zero_warn(message + f" -- step skipped ({self._nonfinite_skipped} so far)")
            self.log("train/nonfinite_skipped", float(self._nonfinite_skipped), batch_size=1)
            return None  # Lightning skips backward and the optimizer step
        n = batch.num_rows
        for k in self.representation.logged_losses:
            self.log(f"train/{k}", out[k], prog_bar=k == "loss", batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        self.log("train/schedule_progress", self._schedule.progress(self.trainer.global_step), batch_size=n)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_start
        tokens = int((batch.seq.doc_ids >= 0).sum()) * self.trainer.world_size  # real (non-pad) positions
        self.log("train/tokens_per_s", tokens / max(seconds, 1e-9), batch_size=1)
        self._positions_seen += tokens
        # D of the paper's 6·N·D compute count; float64 would be exact, the logger keeps float32 (7 digits)
        self.log("train/positions_seen", float(self._positions_seen), batch_size=1)
        # Lightning validates at max_steps only when it falls on val_check_interval; a stop requested at the last
        # step makes it validate there, so a run's final metrics and its final checkpoint are of the same step.
        if 0 < self.trainer.max_steps <= self.trainer.global_step:
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["positions_seen"] = self._positions_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._positions_seen = int(checkpoint.get("positions_seen", 0))

    # -------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        # Per caption pair and level (noise level, or one): [loss with the true caption, with the shuffled one].
        self._cond_gap_terms = []

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, dataloader_idx, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, dataloader_idx, "test")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def _evaluate(self, batch, batch_idx: int, dataloader_idx: int, stage: str) -> None:
        # Fixed seed per batch: t and noise are the same at every evaluation, so curves are comparable.
        g = torch.Generator(device=self.device).manual_seed(batch_idx)
        if isinstance(batch, Batch):
            out = self.losses(batch, generator=g)
            for k in self.representation.logged_losses:
                self.log(f"{stage}/{k}", out[k], batch_size=batch.num_rows, sync_dist=True,
                         add_dataloader_idx=False)
            return
        if not isinstance(batch, CaptionPairs):
            raise TypeError(f"{stage} batches must be Batch or CaptionPairs, got {type(batch).__name__}")
        self._cond_gap_terms.append(self.representation.cond_gap(self, batch, batch_idx).detach().float())

    def _gathered_cond_gap_terms(self) -> Tensor:
        """Every rank's cond-gap terms [n_total, levels, 2] (ranks may hold different numbers of pairs: each pads
        to the largest count with NaN rows before the all-gather, and the NaN rows are dropped after it)."""
        levels = self.representation.cond_gap_levels
        local = (torch.cat(self._cond_gap_terms) if self._cond_gap_terms
                 else torch.zeros(0, levels, 2, device=self.device))
        if self.trainer.world_size == 1:
            return local
        counts = self.all_gather(torch.tensor(len(local), device=self.device))  # [world]
        padded = local.new_full((int(counts.max()), levels, 2), float("nan"))
        padded[:len(local)] = local
        gathered = self.all_gather(padded).reshape(-1, levels, 2)  # [world * max, levels, 2]
        return gathered[~gathered.isnan().any(dim=(1, 2))]

    def _log_cond_gap(self, stage: str) -> None:
        terms = self._gathered_cond_gap_terms()
        if len(terms) == 0:
            return  # no caption->image pairs evaluated (no second dataloader)
        # Every rank holds every pair, so every rank computes the same values; sync_dist only averages equals.
        low, high = cond_gap_interval(terms.cpu())
        loss_true, loss_shuf = terms[..., 0].mean(0).mean(), terms[..., 1].mean(0).mean()
        true_name, shuffled_name = self.representation.cond_gap_terms
        for name, value in [("cond_gap", cond_gap(terms.cpu())), ("cond_gap_low", low), ("cond_gap_high", high),
                            ("cond_gap_n", float(len(terms))), (true_name, loss_true), (shuffled_name, loss_shuf)]:
            self.log(f"{stage}/{name}", torch.as_tensor(value, dtype=torch.float32, device=self.device),
                     sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_cond_gap("test")

    # --------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel per parameter (CPU and CUDA) instead of a dozen elementwise ops (the AdamW step of
        # the tiny model: ~4x faster, benchmarks/train_step.py). Lightning refuses gradient clipping with a fused
        # optimizer under any mixed precision because a GradScaler would need unscaling first; only fp16 has a
        # scaler, and bf16-mixed is clipped by configure_gradient_clipping below, so only 16-mixed uses foreach.
        fused = not _has_grad_scaler(self.trainer)
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        # With a time budget (trainer.max_time) the cosine follows whichever of steps or time runs out first,
        # so a slower machine gets a complete, shorter schedule instead of half of a long one.
        self._schedule = WarmupCosine(min(o.warmup_steps, total // 2), total, o.min_lr / o.lr,
                                      time_budget=training_timer(self.trainer))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self._schedule(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning would; without a GradScaler (fp32, bf16-mixed) directly on the gradients, which
        Lightning's mixed-precision plugin refuses for a fused optimizer although there is nothing to unscale."""
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and type(plugin) is MixedPrecision and plugin.scaler is None
                and gradient_clip_algorithm in (None, "norm")):
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------------- ends
    def on_validation_epoch_end(self) -> None:
        self._log_cond_gap("val")
        if self._trainer is not None and self.trainer.state.fn == "fit" and self._schedule is not None:
            self.log("val/schedule_progress", self._schedule.progress(self.trainer.global_step))

    def on_train_end(self) -> None:
        """Say how much of the promised schedule ran (a stop by signal or exception leaves it unfinished)."""
        if self._schedule is None:
            return
        progress = self._schedule.progress(self.trainer.global_step)
        done = "complete" if progress >= 0.999 else f"INCOMPLETE ({progress:.0%})"
        rank_zero_info(f"training ended at step {self.trainer.global_step} of max_steps {self.trainer.max_steps}: "
                       f"learning-rate schedule {done}"
                       + (f"; {self._nonfinite_skipped} non-finite steps skipped" if self._nonfinite_skipped else ""))


def _has_grad_scaler(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` trains with a GradScaler (16-mixed): a fused optimizer then cannot be clipped."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None
