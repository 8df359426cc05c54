"""ChameleonModule: the paper's discrete-token baseline (Transfusion §4.1) under the same trainer.

Images are the codes of a frozen VQ tokenizer (``lit_transfusion.vq``), laid out as ``<boi> c_1 .. c_P <eoi>`` in
a vocabulary that extends the text ids (data ``image_tokens: codes``), and the whole sequence is trained with
the next-token loss:

    loss = Σ_i w_i · CE_i / Σ_i w_i     (w = 1 at text targets, ``image_token_weight`` at image-code targets)

so ``image_token_weight: 1`` is Chameleon's plain mean over every token. Everything else is
:class:`TransfusionModule`'s: the same transformer (here without a patcher, with QK-norm as Chameleon uses), the
same data, packing, optimizer, schedule, logging, checkpointing and compute counting (``train/positions_seen``:
a code counts one sequence element, like a text token or a patch). ``val/cond_gap`` becomes the relative drop of
the image codes' negative log-likelihood under the true caption against a shuffled one, and sampling is KV-cached
next-token decoding of the codes with classifier-free guidance on the logits (``ChameleonSampler``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor

from lit_transfusion.batch import IGNORE, Batch, CaptionPairs, SpecialIds
from lit_transfusion.chameleon_sampler import ChameleonSampler
from lit_transfusion.model import ModelConfig, ModelOutput, TransfusionModel
from lit_transfusion.module import TransfusionModule


class ChameleonModule(TransfusionModule):
    """Next-token training on text and VQ image codes (the Chameleon recipe).

    Args:
        vocab_size: text ids + image codes (linked from the datamodule, ``image_tokens: codes``).
        special_ids: special ids incl. ``first_code``, the id of image code 0 (linked from the datamodule).
        latent_shape: (1, h, w): the code grid of one image (linked from the datamodule).
        size: a named size from ``lit_transfusion.model.SIZES``. dim / n_layers / n_heads: override it.
        max_seq_len: longest position RoPE covers.
        patch_size: 1 (one code per position); kept so the datamodule's patch size links as for Transfusion.
        qk_norm: RMSNorm on queries and keys (Chameleon's fix for logit drift in mixed-modal training).
        image_token_weight: weight of the image-code targets in the mean next-token loss (1: every token alike).
        lr, min_lr, warmup_steps, weight_decay, betas, eps: AdamW and the warmup-cosine schedule, as for Transfusion.
        attention: "auto" (flex attention on CUDA, SDPA with a dense bool mask elsewhere), "sdpa" or "flex".
        activation_checkpointing: recompute each block in backward to save memory.
        seed: kept for the interface (nothing is drawn in training: the loss has no noise).
        nonfinite: "stop" or "skip" a step whose loss is not finite.
        empty_init: build on the meta device and materialise per rank (FSDP2 via ``ModelParallelStrategy``).
    """

    LOGGED_LOSSES = ("loss", "loss_text", "loss_image")  # loss_image: the mean CE of the image codes
    COND_GAP_TERMS = ("nll_true_caption", "nll_shuffled_caption")

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
        patch_size: Literal[1] = 1,
        qk_norm: bool = True,
        image_token_weight: NonNegativeFloat = 1.0,
        lr: PositiveFloat = 3e-4,
        min_lr: NonNegativeFloat = 1.5e-5,
        warmup_steps: int = 4000,
        weight_decay: NonNegativeFloat = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        attention: Literal["auto", "sdpa", "flex"] = "auto",
        activation_checkpointing: bool = False,
        seed: int = 0,
        nonfinite: Literal["stop", "skip"] = "stop",
        empty_init: bool = False,
    ):
        # LightningModule's init, skipping TransfusionModule's (which builds a patcher and a diffusion schedule). The
        # zero-argument-style super() call also gives this frame the __class__ cell save_hyperparameters looks for.
        super(TransfusionModule, self).__init__()
        if special_ids.get("first_code", -1) < 0:
            raise ValueError("model: ChameleonModule models images as discrete codes; the data must provide them "
                             "(data.image_tokens: codes, with a VQ tokenizer at data.vq_path)")
        if not 0 < special_ids["first_code"] < vocab_size:
            raise ValueError(f"model: special_ids.first_code={special_ids['first_code']} must lie inside "
                             f"vocab_size={vocab_size} (text ids, then the image codes)")
        if patch_size != 1:
            raise ValueError(f"model.init_args.patch_size={patch_size}: image codes take one position each (1)")
        self.save_hyperparameters()
        try:
            self.config = ModelConfig.from_size(
                size, vocab_size=vocab_size, latent_shape=latent_shape, dim=dim, n_layers=n_layers, n_heads=n_heads,
                max_seq_len=max_seq_len, activation_checkpointing=activation_checkpointing, qk_norm=qk_norm,
                patch_size=1, patcher="none",
            )
        except ValueError as e:
            raise ValueError(f"model.init_args.{e}") from None
        self.special = special_ids
        self.first_code = int(special_ids["first_code"])
        with torch.device("meta") if empty_init else contextlib.nullcontext():
            self.model = TransfusionModel(self.config)
        self._cond_gap_sums: Tensor | None = None
        self._step_start = time.perf_counter()
        self._nonfinite_skipped = 0
        self._positions_seen = 0

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, batch: Batch, latents: Tensor | None = None, t: Tensor | None = None) -> ModelOutput:
        """The model over ``batch`` (its images are code tokens: ``latents`` / ``t`` are empty and ignored)."""
        empty = batch.latents.new_zeros((0, *self.config.latent_shape))
        no_t = torch.zeros(0, dtype=torch.long, device=batch.targets.device)
        return self.model(batch.seq, empty, no_t, self.attention_mask(batch.seq))

    def text_targets(self, targets: Tensor) -> Tensor:
        """``targets`` [B, L] with the image-code targets set to ``IGNORE`` (perplexities count text only)."""
        return targets.masked_fill(targets >= self.first_code, IGNORE)

    def sampler(self, special: SpecialIds, use_cache: bool = True) -> ChameleonSampler:
        return ChameleonSampler(self.model, special, use_cache=use_cache)

    def losses(self, batch: Batch, t: Tensor | None = None, generator: torch.Generator | None = None,
               timestep_sampling: str | None = None) -> dict[str, Tensor]:
        """The weighted next-token loss of a packed batch (``t`` / ``generator`` / ``timestep_sampling`` exist for
        the shared interface: nothing is random here).

        Returns:
            dict with ``loss`` (weighted mean CE), ``loss_text`` (mean CE at text targets) and ``loss_image`` (mean
            CE at image-code targets); a kind of target absent from the batch gives 0 (with a zero gradient).
        """
        out = self(batch)
        logits, targets = self.model.target_logits(out.hidden, batch.targets)  # [n, V], [n]
        if not targets.numel():  # every parameter still gets a (zero) gradient: DDP refuses unused ones
            zero = self.model.logits(out.hidden[:, :1]).sum() * 0.0
            return dict(loss=zero, loss_text=zero, loss_image=zero)
        ce = F.cross_entropy(logits, targets, reduction="none")  # [n]
        is_code = targets >= self.first_code
        weights = torch.where(is_code, self.hparams.image_token_weight, 1.0)
        loss = (weights * ce).sum() / weights.sum().clamp_min(1e-8)
        zero = ce.sum() * 0.0
        loss_text = ce[~is_code].mean() if (~is_code).any() else zero
        loss_image = ce[is_code].mean() if is_code.any() else zero
        return dict(loss=loss, loss_text=loss_text, loss_image=loss_image)

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        return self.losses(batch)

    @torch.no_grad()
    def code_nll_per_document(self, batch: Batch) -> Tensor:
        """Mean negative log-likelihood of each row's image codes [B] (one document per row: the cond-gap pairs)."""
        out = self(batch)
        selected = batch.targets >= self.first_code  # [B, L]
        logits = self.model.logits(out.hidden[selected]).float()  # [n, V]
        ce = F.cross_entropy(logits, batch.targets[selected], reduction="none")  # [n]
        rows = selected.nonzero()[:, 0]
        total = ce.new_zeros(batch.num_rows).index_add_(0, rows, ce)
        return total / selected.sum(1).clamp_min(1)

    # -------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        # [sum NLL true captions, sum NLL shuffled captions, image count]: one "timestep" (no noise levels here).
        self._cond_gap_sums = torch.zeros(1, 3, device=self.device)

    def _accumulate_cond_gap(self, batch: CaptionPairs, batch_idx: int) -> None:
        nll_true = self.code_nll_per_document(batch.true)
        nll_shuffled = self.code_nll_per_document(batch.shuffled)
        self._cond_gap_sums[0] += torch.stack([nll_true.sum(), nll_shuffled.sum(), nll_true.new_tensor(len(nll_true))])
