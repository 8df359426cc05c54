"""TransfusionModule: the dual loss, optimizer and logging around ``TransfusionModel``.

    loss = loss_text + λ · loss_image
    loss_text  = mean next-token cross-entropy over positions with a target (see ``batch.py``)
    loss_image = mean over images of w(t) · the per-image mean squared error of the image prediction

The image prediction is the ``objective``'s: the noise ε (the paper), v, or rectified flow's velocity
(``diffusion.py``); ``mse_per_image`` (and so ``val/cond_gap``) measures it against that objective's target.

Averaging the diffusion MSE per image first keeps λ meaning the same thing whatever the number of images
(or patches) in a batch. w(t) = 1 is the paper's loss; ``snr_gamma`` switches on Min-SNR-γ weighting
(``Diffusion.loss_weights``); ``timestep_sampling: importance`` then draws t in proportion to w(t) instead
of weighting uniform t (same expected loss, less gradient noise). ``mse_image`` (the unweighted mean) is
logged either way, so runs with and without weighting compare on one curve (validation always uses uniform t).
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_transfusion.attention import block_mask, dense_mask
from lit_transfusion.batch import Batch, CaptionPairs, Seq, SpecialIds
from lit_transfusion.diffusion import Diffusion
from lit_transfusion.generation import TransfusionSampler
from lit_transfusion.model import ModelConfig, ModelOutput, TransfusionModel
from lit_transfusion.schedule import WarmupCosine, training_timer


class TransfusionModule(L.LightningModule):
    """Transfusion training.

    ``LOGGED_LOSSES``: the entries of :meth:`losses` logged as ``train/<name>`` and ``val/<name>``.

    Args:
        vocab_size: text vocabulary size (linked from the datamodule).
        special_ids: ids of <pad> <bos> <eos> <boi> <eoi> (linked from the datamodule).
        latent_shape: (C, h, w) of an image latent (linked from the datamodule).
        size: a named size from ``lit_transfusion.model.SIZES`` (e.g. tiny, 0.16B, 7B).
        dim: override the size's width. n_layers: override its depth. n_heads: override its heads.
        max_seq_len: longest position RoPE covers (>= the data's sequence length).
        patch_size: latent patch side (divides the latent grid).
        patcher: "linear" (t-embedding + linear) or "unet" (time-conditioned conv down/up blocks with skips).
        unet_channels: base width of the unet patcher (None: the size's, e.g. 64 for tiny, 1120 for the paper's
            sizes: a ~0.27B-parameter U-Net as in the paper).
        image_attention: the mask among one image's patches. "bidirectional" (the paper): every patch sees all
            patches of its image; "causal" (the paper's Table 5 ablation): a patch sees only the earlier patches
            of its image, the causal mask everywhere. Training and generation use the same rule.
        mot: Mixture-of-Transformers (arXiv 2411.04996): text and image positions use separate backbone weights
            (FFN, attention projections, norms), attention stays global; about 2x the backbone parameters at equal
            FLOPs per position (``TransfusionModel.active_params`` is the N of a 6·N·D budget).
        qk_norm: RMSNorm over the head dim on queries and keys before RoPE (Chameleon's fix for attention logits
            that grow until training diverges).
        image_loss_weight: λ in loss = loss_text + λ·loss_image (paper: 5).
        lr: peak learning rate. min_lr: final learning rate of the cosine decay. warmup_steps: linear warmup.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not norms/biases/vectors).
        betas: AdamW betas. eps: AdamW epsilon.
        attention: "auto" (flex attention on CUDA, SDPA with a dense bool mask elsewhere), "sdpa" or "flex".
        activation_checkpointing: recompute each block in backward to save memory.
        cond_gap_timesteps: timesteps at which ``val/cond_gap`` compares true against shuffled captions.
        objective: what the image positions predict. "epsilon" (the paper): the noise ε of the DDPM cosine
            schedule (T = 1000). "v_prediction": v = sqrt(ā_t)·ε - sqrt(1-ā_t)·x0 on the same schedule (the
            ddpm / ddim / dpm++ samplers run in v mode). "flow": rectified flow, x_s = (1-s)·x0 + s·ε with
            s = t/T (so the noise limit t_max=500 caps s at 0.5), predicting the velocity ε - x0, sampled with
            diffusers' FlowMatchEulerDiscreteScheduler whatever the sampler's name. "flow" takes neither
            ``snr_gamma`` nor ``timestep_sampling: importance`` (both are defined by the ε/v schedule).
        snr_gamma: None (the paper: plain noise MSE) or γ > 0 for Min-SNR-γ weighting, min(SNR_t, γ) / SNR_t
            per image (v_prediction: its v-form min(SNR_t, γ) / (SNR_t + 1) on the v-MSE, the same weighting).
            It turns down nearly clean images (small t), whose noise MSE is large but says little about the caption,
            so more of the image gradient goes to the noise levels where text decides the picture (README: "How
            text conditioning takes hold").
        timestep_sampling: how training draws t. "uniform" (the paper): t ~ U{0..T-1} times the weight w(t).
            "importance" (needs ``snr_gamma``): t ∝ w(t) with a constant weight, the same expected loss without
            spending compute on images whose weight is near 0 (``Diffusion.importance_timesteps``).
        seed: seeds the training timesteps and noise. They are drawn from a generator seeded with (seed, step,
            rank) at every step, so a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
        nonfinite: what a non-finite training loss does. "stop": raise an error naming the step and the loss
            (text or image) before any weight changes (the exception checkpoint then holds the last good state);
            "skip": skip the step and count it in ``train/nonfinite_skipped``.
        empty_init: build the network on the meta device (no memory, no init); ``configure_model`` shards it
            (FSDP2 via ``ModelParallelStrategy``) and each rank materialises and initialises only its own shards.
            The CLI sets it for ``ModelParallelStrategy``, so a 7B model never exists whole on one rank.
    """

    LOGGED_LOSSES: tuple[str, ...] = ("loss", "loss_text", "loss_image", "mse_image")
    COND_GAP_TERMS: tuple[str, str] = ("mse_true_caption", "mse_shuffled_caption")  # logged beside cond_gap

    def __init__(
        self,
        vocab_size: int,
        special_ids: dict[str, int],
        latent_shape: tuple[int, int, int],
        size: str = "tiny",
        dim: PositiveInt | None = None,
        n_layers: PositiveInt | None = None,
        n_heads: PositiveInt | None = None,
        max_seq_len: PositiveInt = 4096,
        patch_size: PositiveInt = 2,
        patcher: Literal["linear", "unet"] = "linear",
        unet_channels: PositiveInt | None = None,
        image_attention: Literal["bidirectional", "causal"] = "bidirectional",
        mot: bool = False,
        qk_norm: bool = False,
        image_loss_weight: NonNegativeFloat = 5.0,
        lr: PositiveFloat = 3e-4,
        min_lr: NonNegativeFloat = 1.5e-5,
        warmup_steps: int = 4000,
        weight_decay: NonNegativeFloat = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        attention: Literal["auto", "sdpa", "flex"] = "auto",
        activation_checkpointing: bool = False,
        cond_gap_timesteps: tuple[int, ...] = (250, 500, 750),
        objective: Literal["epsilon", "v_prediction", "flow"] = "epsilon",
        snr_gamma: PositiveFloat | None = None,
        timestep_sampling: Literal["uniform", "importance"] = "uniform",
        seed: int = 0,
        nonfinite: Literal["stop", "skip"] = "stop",
        empty_init: bool = False,
    ):
        super().__init__()
        if image_loss_weight < 0:  # typed NonNegativeFloat for the CLI; this guards direct Python use
            raise ValueError(f"model.image_loss_weight={image_loss_weight}: λ must be >= 0")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"model.snr_gamma={snr_gamma}: γ must be > 0, or null for the paper's unweighted loss")
        if timestep_sampling not in ("uniform", "importance"):
            raise ValueError(f"model.timestep_sampling={timestep_sampling!r}: expected 'uniform' or 'importance'")
        if objective not in ("epsilon", "v_prediction", "flow"):
            raise ValueError(f"model.objective={objective!r}: expected 'epsilon', 'v_prediction' or 'flow'")
        if objective == "flow" and (snr_gamma is not None or timestep_sampling == "importance"):
            raise ValueError(f"model.objective='flow' with model.snr_gamma={snr_gamma} and model.timestep_sampling="
                             f"{timestep_sampling!r}: Min-SNR-γ weighting and importance sampling are defined for the "
                             "epsilon / v_prediction noise schedule; with flow set snr_gamma: null and "
                             "timestep_sampling: uniform")
        if timestep_sampling == "importance" and snr_gamma is None:
            raise ValueError("model.timestep_sampling='importance' needs model.snr_gamma: it draws t in proportion "
                             "to the Min-SNR weight, and without weighting every t weighs the same")
        if special_ids.get("first_code", -1) >= 0:
            raise ValueError("model: the data holds images as discrete codes (data.image_tokens: codes), which "
                             "TransfusionModule cannot diffuse; train them with "
                             "lit_transfusion.chameleon.ChameleonModule or set data.image_tokens: latents")
        self.save_hyperparameters()
        try:
            self.config = ModelConfig.from_size(
                size, vocab_size=vocab_size, latent_shape=latent_shape, dim=dim, n_layers=n_layers, n_heads=n_heads,
                max_seq_len=max_seq_len, activation_checkpointing=activation_checkpointing,
                patch_size=patch_size, patcher=patcher, unet_channels=unet_channels, image_attention=image_attention,
                modalities=2 if mot else None, qk_norm=qk_norm,
            )
        except ValueError as e:
            raise ValueError(f"model.init_args.{e}") from None
        self.special = special_ids
        with torch.device("meta") if empty_init else contextlib.nullcontext():
            self.model = TransfusionModel(self.config)
        with torch.device("cpu"):  # the noise schedule is a small table, never meta
            self.diffusion = Diffusion(objective=objective)
        self._cond_gap_sums: Tensor | None = None
        self._step_start = 0.0
        self._nonfinite_skipped = 0
        self._positions_seen = 0  # sequence elements trained on (text tokens, <boi>/<eoi>, patches; no pads), all ranks

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
        use_flex = self.hparams.attention == "flex" or (self.hparams.attention == "auto" and seq.tokens.is_cuda)
        rule = self.config.image_attention
        if use_flex:
            return block_mask(seq.doc_ids, seq.image_ids, image_attention=rule)
        return dense_mask(seq.doc_ids, seq.image_ids, image_attention=rule)

    def forward(self, batch: Batch, latents: Tensor, t: Tensor) -> ModelOutput:
        """The model over ``batch`` with its images given as ``latents`` [N, C, h, w] at timesteps ``t`` [N]."""
        return self.model(batch.seq, latents.to(self.dtype), t, self.attention_mask(batch.seq))

    def losses(
        self,
        batch: Batch,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        timestep_sampling: str = "uniform",
    ) -> dict[str, Tensor]:
        """Noise every image, run the model once, and return the losses.

        Args:
            batch: a packed :class:`Batch`.
            t: [N] timesteps to use; default: t ~ U{0, .., t_max-1} per image.
            generator: makes t and the noise reproducible (validation).
            timestep_sampling: "importance" draws the default t with ``Diffusion.importance_timesteps``.
        Returns:
            dict with ``loss``, ``loss_text``, ``loss_image`` (weighted as in ``loss``), ``mse_image``
            (unweighted) and ``mse_per_image`` [N] (unweighted), each MSE against the objective's target.
        """
        latents = batch.latents.to(self.dtype)
        if t is None and timestep_sampling == "importance":
            t, weights = self.diffusion.importance_timesteps(batch.t_max, self.hparams.snr_gamma, generator)
        else:
            t = self.diffusion.sample_timesteps(batch.t_max, generator) if t is None else t
            weights = self.diffusion.loss_weights(t, self.hparams.snr_gamma)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = self.diffusion.add_noise(latents, noise, t)
        target = self.diffusion.target(latents, noise, t)  # ε, v or velocity: the objective's
        out = self(batch, noisy, t)
        logits, targets = self.model.target_logits(out.hidden, batch.targets)  # [n_targets, V], [n_targets]
        # A batch without text targets or without images still gives every parameter a (zero) gradient: DDP
        # fails on parameters a step did not use, and a text-only batch is an ordinary event with mixed data.
        if targets.numel():
            loss_text = F.cross_entropy(logits, targets)
        else:
            loss_text = self.model.logits(out.hidden[:, :1]).sum() * 0.0
        if batch.num_images:
            mse_per_image = (out.eps.float() - target.float()).pow(2).flatten(1).mean(1)  # [N]
            loss_image = (weights * mse_per_image).mean()
            mse_image = mse_per_image.mean()
        else:
            mse_per_image = noise.new_zeros(0)
            loss_image = mse_image = sum(p.sum() for p in self.model.patcher.parameters()) * 0.0
        loss = loss_text + self.hparams.image_loss_weight * loss_image
        return dict(loss=loss, loss_text=loss_text, loss_image=loss_image, mse_image=mse_image,
                    mse_per_image=mse_per_image)

    def text_targets(self, targets: Tensor) -> Tensor:
        """``targets`` [B, L] with only text targets kept (perplexities count text): every target is text here."""
        return targets

    def sampler(self, special: SpecialIds, use_cache: bool = True) -> TransfusionSampler:
        """The sampler of this model (evaluation callbacks and ``sample`` generate through it)."""
        return TransfusionSampler(self.model, self.diffusion, special, use_cache=use_cache)

    # ---------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def step_generator(self) -> torch.Generator:
        """The generator of this step's timesteps and noise: a function of (seed, global step, rank) only,
        so resuming from a checkpoint reproduces the draws exactly, whatever else consumed random numbers."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        step = self.trainer.global_step if self._trainer is not None else 0
        seed = (self.hparams.seed * 1_000_003 + step) * 1024 + rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """:meth:`losses` with this step's timesteps and noise (``step_generator``) and the configured sampling of t."""
        return self.losses(batch, generator=self.step_generator(), timestep_sampling=self.hparams.timestep_sampling)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        out = self.training_losses(batch)
        if not torch.isfinite(out["loss"]):
            bad = [k for k in ("loss_text", "loss_image") if not torch.isfinite(out[k])] or ["loss"]
            message = (f"non-finite training loss at step {self.trainer.global_step}: "
                       f"{', '.join(f'{k}={float(out[k])}' for k in bad)}")
            if self.hparams.nonfinite == "stop":
                raise FloatingPointError(message + " (no weights were changed; set model.init_args.nonfinite=skip "
                                         "to skip such steps instead)")
            self._nonfinite_skipped += 1
            rank_zero_warn(message + f" -- step skipped ({self._nonfinite_skipped} so far)")
            self.log("train/nonfinite_skipped", float(self._nonfinite_skipped), batch_size=1)
            return None  # Lightning skips backward and the optimizer step
        n = batch.num_rows
        for k in self.LOGGED_LOSSES:
            self.log(f"train/{k}", out[k], prog_bar=k == "loss", batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        if hasattr(self, "_schedule"):  # absent when a subclass brings its own optimizer and schedule
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
        # Per timestep: [sum MSE true captions, sum MSE shuffled captions, image count].
        self._cond_gap_sums = torch.zeros(len(self.hparams.cond_gap_timesteps), 3, device=self.device)

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
            for k in self.LOGGED_LOSSES:
                self.log(f"{stage}/{k}", out[k], batch_size=batch.num_rows, sync_dist=True,
                         add_dataloader_idx=False)
            return
        if not isinstance(batch, CaptionPairs):
            raise TypeError(f"{stage} batches must be Batch or CaptionPairs, got {type(batch).__name__}")
        self._accumulate_cond_gap(batch, batch_idx)

    def _accumulate_cond_gap(self, batch: CaptionPairs, batch_idx: int) -> None:
        """Add one batch of caption pairs to ``_cond_gap_sums``: per timestep, the summed image MSE with the true and
        with the shuffled captions (same t, same noise) and the image count."""
        true, shuffled = batch.true, batch.shuffled
        for i, step in enumerate(self.hparams.cond_gap_timesteps):
            t = torch.full((true.num_images,), step, dtype=torch.long, device=self.device)
            g_true = torch.Generator(device=self.device).manual_seed(1000 * batch_idx + i)
            g_shuf = torch.Generator(device=self.device).manual_seed(1000 * batch_idx + i)  # same noise
            mse_true = self.losses(true, t=t, generator=g_true)["mse_per_image"]
            mse_shuf = self.losses(shuffled, t=t, generator=g_shuf)["mse_per_image"]
            self._cond_gap_sums[i] += torch.stack([mse_true.sum(), mse_shuf.sum(), mse_true.new_tensor(len(mse_true))])

    def _log_cond_gap(self, stage: str) -> None:
        sums = self.trainer.strategy.reduce(self._cond_gap_sums, reduce_op="sum")
        if sums[:, 2].min() == 0:
            return  # no caption->image pairs evaluated (no second dataloader)
        mse_true, mse_shuf = sums[:, 0] / sums[:, 2], sums[:, 1] / sums[:, 2]
        gap = ((mse_shuf - mse_true) / mse_shuf).mean()
        # Already summed over ranks above, so every rank holds the same value; sync_dist only averages equals.
        true_name, shuffled_name = self.COND_GAP_TERMS
        for name, value in [("cond_gap", gap), (true_name, mse_true.mean()), (shuffled_name, mse_shuf.mean())]:
            self.log(f"{stage}/{name}", value, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_cond_gap("test")

    # --------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel per parameter (CPU and CUDA) instead of a dozen elementwise ops. Lightning's
        # mixed-precision plugins refuse gradient clipping with a fused optimizer, so those use foreach.
        fused = "mixed" not in str(self.trainer.precision)
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        # With a time budget (trainer.max_time) the cosine follows whichever of steps or time runs out first,
        # so a slower machine gets a complete, shorter schedule instead of half of a long one.
        self._schedule = WarmupCosine(min(hp.warmup_steps, total // 2), total, hp.min_lr / hp.lr,
                                      time_budget=training_timer(self.trainer))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self._schedule(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- ends
    def on_validation_epoch_end(self) -> None:
        self._log_cond_gap("val")
        if self._trainer is not None and self.trainer.state.fn == "fit" and hasattr(self, "_schedule"):
            self.log("val/schedule_progress", self._schedule.progress(self.trainer.global_step))

    def on_train_end(self) -> None:
        """Say how much of the promised schedule ran (a stop by signal or exception leaves it unfinished)."""
        if not hasattr(self, "_schedule"):
            return
        progress = self._schedule.progress(self.trainer.global_step)
        done = "complete" if progress >= 0.999 else f"INCOMPLETE ({progress:.0%})"
        rank_zero_info(f"training ended at step {self.trainer.global_step} of max_steps {self.trainer.max_steps}: "
                       f"learning-rate schedule {done}"
                       + (f"; {self._nonfinite_skipped} non-finite steps skipped" if self._nonfinite_skipped else ""))

