"""How images enter the one transformer: the *image representation* component of the training module.

    LatentDiffusion   continuous VAE latents, patchified and diffused (Transfusion): loss_text + λ · loss_image
    DiscreteCodes     VQ codes as tokens after the text ids (the Chameleon baseline): one weighted next-token loss

A representation owns everything that depends on what an image is, and nothing else:

- ``check_data(special_ids, vocab_size)``: what the data must provide (``first_code`` for codes, none for latents);
- ``patcher``: the model's image head ("linear" / "unet" for latents, "none" for codes);
- ``losses(net, batch, ...)``: the loss of one packed batch and what is logged of it (training passes its
  ``timestep_sampling``);
- ``clean_inputs(batch)``: the images as fed clean (t = 0), for perplexities and evaluation;
- ``text_targets(targets)``: the targets a *text* perplexity counts;
- ``cond_gap(net, pairs, batch_idx)``: one batch of ``val/cond_gap`` terms [pairs, levels, 2] (the image loss
  under the true and under the shuffled caption, per pair and level);
- ``sampler(model, special)``: generation (diffusion loop, or code decoding);
- ``codec_type``: the frozen pixel codec class (``LatentCodec`` / ``CodeCodec``): ``module.codec`` refuses a codec
  of another class (data prepared for the other representation).

``net`` is the training module (``lit_transfusion.training.MixedModalModule``): ``net(batch, latents, t)`` runs
the model, ``net.model`` is the ``TransfusionModel``. The representation holds no parameters (the network is the
module's), and ``Diffusion``'s schedule buffer is not persistent: checkpoints hold the network's weights only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_transfusion.batch import IGNORE, Batch, CaptionPairs, SpecialIds
from lit_transfusion.chameleon_sampler import ChameleonSampler
from lit_transfusion.diffusion import Diffusion
from lit_transfusion.generation import TransfusionSampler
from lit_transfusion.model import TransfusionModel
from lit_transfusion.vae import LatentCodec
from lit_transfusion.vq import CodeCodec


class ImageRepresentation(nn.Module):
    """The interface (see the module docstring). ``logged_losses``: entries of :meth:`losses` logged as
    ``train/<name>`` and ``val/<name>``; ``cond_gap_terms``: the two means logged beside ``cond_gap``."""

    logged_losses: tuple[str, ...] = ("loss", "loss_text", "loss_image")
    cond_gap_terms: tuple[str, str] = ("true_caption", "shuffled_caption")
    patcher: str = "none"
    codec_type: type = LatentCodec
    timestep_sampling: str = "uniform"  # how training draws what it draws (``losses(timestep_sampling=)``)

    def check_data(self, special_ids: dict[str, int], vocab_size: int) -> None:
        raise NotImplementedError

    @property
    def cond_gap_levels(self) -> int:
        """Rows of the cond-gap sums (noise levels compared; 1 when nothing is noised)."""
        return 1

    def losses(self, net, batch: Batch, t: Tensor | None = None, generator: torch.Generator | None = None,
               timestep_sampling: str = "uniform") -> dict[str, Tensor]:
        raise NotImplementedError

    def clean_inputs(self, batch: Batch, latent_shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """(latents [N, C, h, w], t [N]) feeding the batch's images clean."""
        raise NotImplementedError

    def text_targets(self, targets: Tensor) -> Tensor:
        """``targets`` [B, L] with only text targets kept (perplexities count text)."""
        return targets

    def cond_gap(self, net, pairs: CaptionPairs, batch_idx: int) -> Tensor:
        """[n, levels, 2]: per caption pair and level, the image loss with the true caption and with the shuffled
        one (kept per pair so that ``val/cond_gap`` gets a bootstrap interval over pairs)."""
        raise NotImplementedError

    def sampler(self, model: TransfusionModel, special: SpecialIds, use_cache: bool = True) -> TransfusionSampler:
        raise NotImplementedError


class LatentDiffusion(ImageRepresentation):
    """Continuous latents with diffusion (the paper). Args are ``TransfusionModule``'s of the same names
    (``image_loss_weight`` is λ; ``patcher`` "linear" or "unet")."""

    logged_losses = ("loss", "loss_text", "loss_image", "mse_image")
    cond_gap_terms = ("mse_true_caption", "mse_shuffled_caption")
    codec_type = LatentCodec

    def __init__(self, objective: str = "epsilon", snr_gamma: float | None = None, timestep_sampling: str = "uniform",
                 image_loss_weight: float = 5.0, cond_gap_timesteps: tuple[int, ...] = (250, 500, 750),
                 patcher: str = "linear"):
        super().__init__()
        with torch.device("cpu"):  # the noise schedule is a small table, never meta
            self.diffusion = Diffusion(objective=objective)
        self.snr_gamma, self.timestep_sampling = snr_gamma, timestep_sampling
        self.image_loss_weight, self.cond_gap_timesteps = image_loss_weight, tuple(cond_gap_timesteps)
        self.patcher = patcher

    def check_data(self, special_ids: dict[str, int], vocab_size: int) -> None:
        if special_ids.get("first_code", -1) >= 0:
            raise ValueError("model: the data holds images as discrete codes (data.image_tokens: codes), which "
                             "TransfusionModule cannot diffuse; train them with "
                             "lit_transfusion.chameleon.ChameleonModule or set data.image_tokens: latents")

    @property
    def cond_gap_levels(self) -> int:
        return len(self.cond_gap_timesteps)

    def losses(self, net, batch: Batch, t: Tensor | None = None, generator: torch.Generator | None = None,
               timestep_sampling: str = "uniform") -> dict[str, Tensor]:
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
        model = net.model
        latents = batch.latents.to(net.dtype)
        if t is None and timestep_sampling == "importance":
            t, weights = self.diffusion.importance_timesteps(batch.t_max, self.snr_gamma, generator)
        else:
            t = self.diffusion.sample_timesteps(batch.t_max, generator) if t is None else t
            weights = self.diffusion.loss_weights(t, self.snr_gamma)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = self.diffusion.add_noise(latents, noise, t)
        target = self.diffusion.target(latents, noise, t)  # ε, v or velocity: the objective's
        out = net(batch, noisy, t)
        logits, targets = model.target_logits(out.hidden, batch.targets)  # [n_targets, V], [n_targets]
        # A batch without text targets or without images still gives every parameter a (zero) gradient: DDP
        # fails on parameters a step did not use, and a text-only batch is an ordinary event with mixed data.
        if targets.numel():
            loss_text = F.cross_entropy(logits, targets)
        else:
            loss_text = model.logits(out.hidden[:, :1]).sum() * 0.0
        if batch.num_images:
            mse_per_image = (out.eps.float() - target.float()).pow(2).flatten(1).mean(1)  # [N]
            loss_image = (weights * mse_per_image).mean()
            mse_image = mse_per_image.mean()
        else:
            mse_per_image = noise.new_zeros(0)
            loss_image = mse_image = sum(p.sum() for p in model.patcher.parameters()) * 0.0
        loss = loss_text + self.image_loss_weight * loss_image
        return dict(loss=loss, loss_text=loss_text, loss_image=loss_image, mse_image=mse_image,
                    mse_per_image=mse_per_image)

    def clean_inputs(self, batch: Batch, latent_shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        return batch.latents, torch.zeros(batch.num_images, dtype=torch.long, device=batch.targets.device)

    def cond_gap(self, net, pairs: CaptionPairs, batch_idx: int) -> Tensor:
        """Per timestep of ``cond_gap_timesteps``: the image MSE with the true and the shuffled captions, at the
        same t and the same noise."""
        true, shuffled = pairs.true, pairs.shuffled
        levels = []
        for i, step in enumerate(self.cond_gap_timesteps):
            t = torch.full((true.num_images,), step, dtype=torch.long, device=net.device)
            g_true = torch.Generator(device=net.device).manual_seed(1000 * batch_idx + i)
            g_shuf = torch.Generator(device=net.device).manual_seed(1000 * batch_idx + i)  # same noise
            mse_true = self.losses(net, true, t=t, generator=g_true)["mse_per_image"]
            mse_shuf = self.losses(net, shuffled, t=t, generator=g_shuf)["mse_per_image"]
            levels.append(torch.stack([mse_true, mse_shuf], dim=-1))  # [n, 2]
        return torch.stack(levels, dim=1)  # [n, levels, 2]

    def sampler(self, model: TransfusionModel, special: SpecialIds, use_cache: bool = True) -> TransfusionSampler:
        return TransfusionSampler(model, self.diffusion, special, use_cache=use_cache)


class DiscreteCodes(ImageRepresentation):
    """VQ codes in the vocabulary (Chameleon). ``first_code``: the id of code 0; ``image_token_weight``: the weight
    of code targets in the mean next-token loss (1: every token alike)."""

    logged_losses = ("loss", "loss_text", "loss_image")  # loss_image: the mean CE of the image codes
    cond_gap_terms = ("nll_true_caption", "nll_shuffled_caption")
    codec_type = CodeCodec

    def __init__(self, first_code: int, image_token_weight: float = 1.0):
        super().__init__()
        self.first_code, self.image_token_weight = int(first_code), image_token_weight

    def check_data(self, special_ids: dict[str, int], vocab_size: int) -> None:
        first = special_ids.get("first_code", -1)
        if first < 0:
            raise ValueError("model: ChameleonModule models images as discrete codes; the data must provide them "
                             "(data.image_tokens: codes, with a VQ tokenizer at data.vq_path)")
        if not 0 < first < vocab_size:
            raise ValueError(f"model: special_ids.first_code={first} must lie inside "
                             f"vocab_size={vocab_size} (text ids, then the image codes)")

    def losses(self, net, batch: Batch, t: Tensor | None = None, generator: torch.Generator | None = None,
               timestep_sampling: str = "uniform") -> dict[str, Tensor]:
        """The weighted next-token loss of a packed batch (nothing is random: ``t`` / ``generator`` /
        ``timestep_sampling`` are unused).

        Returns:
            dict with ``loss`` (weighted mean CE), ``loss_text`` (mean CE at text targets) and ``loss_image`` (mean
            CE at image-code targets); a kind of target absent from the batch gives 0 (with a zero gradient).
        """
        out = net(batch)
        logits, targets = net.model.target_logits(out.hidden, batch.targets)  # [n, V], [n]
        if not targets.numel():  # every parameter still gets a (zero) gradient: DDP refuses unused ones
            zero = net.model.logits(out.hidden[:, :1]).sum() * 0.0
            return dict(loss=zero, loss_text=zero, loss_image=zero)
        ce = F.cross_entropy(logits, targets, reduction="none")  # [n]
        is_code = targets >= self.first_code
        weights = torch.where(is_code, self.image_token_weight, 1.0)
        loss = (weights * ce).sum() / weights.sum().clamp_min(1e-8)
        zero = ce.sum() * 0.0
        loss_text = ce[~is_code].mean() if (~is_code).any() else zero
        loss_image = ce[is_code].mean() if is_code.any() else zero
        return dict(loss=loss, loss_text=loss_text, loss_image=loss_image)

    def clean_inputs(self, batch: Batch, latent_shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        # Codes are tokens: no latent enters the model.
        empty = batch.latents.new_zeros((0, *latent_shape))
        return empty, torch.zeros(0, dtype=torch.long, device=batch.targets.device)

    def text_targets(self, targets: Tensor) -> Tensor:
        """``targets`` [B, L] with the image-code targets set to ``IGNORE`` (perplexities count text only)."""
        return targets.masked_fill(targets >= self.first_code, IGNORE)

    @torch.no_grad()
    def code_nll_per_document(self, net, batch: Batch) -> Tensor:
        """Mean negative log-likelihood of each row's image codes [B] (one document per row: the cond-gap pairs)."""
        out = net(batch)
        selected = batch.targets >= self.first_code  # [B, L]
        logits = net.model.logits(out.hidden[selected]).float()  # [n, V]
        ce = F.cross_entropy(logits, batch.targets[selected], reduction="none")  # [n]
        rows = selected.nonzero()[:, 0]
        total = ce.new_zeros(batch.num_rows).index_add_(0, rows, ce)
        return total / selected.sum(1).clamp_min(1)

    def cond_gap(self, net, pairs: CaptionPairs, batch_idx: int) -> Tensor:
        """One level: the codes' mean NLL under the true and under the shuffled captions."""
        nll_true = self.code_nll_per_document(net, pairs.true)
        nll_shuffled = self.code_nll_per_document(net, pairs.shuffled)
        return torch.stack([nll_true, nll_shuffled], dim=-1)[:, None]  # [n, 1, 2]

    def sampler(self, model: TransfusionModel, special: SpecialIds, use_cache: bool = True) -> ChameleonSampler:
        return ChameleonSampler(model, special, use_cache=use_cache)
