"""TransfusionModule: the paper's recipe, ``MixedModalModule`` with images as diffused VAE latents.

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

The optimizer, schedule, logging, cond-gap, failure handling and the codec are ``MixedModalModule``'s
(``training.py``); the loss and the sampler are the representation's (``representation.py``). This file turns the
typed CLI arguments into the network config and the representation.
"""

from __future__ import annotations

from typing import Literal

from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from lit_transfusion.representation import LatentDiffusion
from lit_transfusion.training import MixedModalModule, OptimizerSettings, model_config


class TransfusionModule(MixedModalModule):
    """Transfusion training.

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
        unet_skip_dropout: the fraction of training images the unet patcher decodes with all skips zeroed, so that
            its up path must also work from the transformer's outputs (and so the caption); 0: plain skips.
        unet_readout: the unet patcher adds a linear readout of the transformer's patch outputs to its up path's
            prediction, so that the transformer (and through it the caption) reaches the prediction directly as in
            the linear patcher (``results/unet_diagnosis/``); false: the up blocks alone.
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
            so more of the image gradient goes to the noise levels where text decides the picture (docs/measurements.md:
            "How text conditioning takes hold").
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
        unet_skip_dropout: float = 0.0,
        unet_readout: bool = False,
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
        representation = LatentDiffusion(objective=objective, snr_gamma=snr_gamma, timestep_sampling=timestep_sampling,
                                         image_loss_weight=image_loss_weight, cond_gap_timesteps=cond_gap_timesteps,
                                         patcher=patcher)
        representation.check_data(special_ids, vocab_size)  # before building a network for the wrong data
        config = model_config(
            size, vocab_size=vocab_size, latent_shape=latent_shape, dim=dim, n_layers=n_layers, n_heads=n_heads,
            max_seq_len=max_seq_len, activation_checkpointing=activation_checkpointing,
            patch_size=patch_size, patcher=patcher, unet_channels=unet_channels, image_attention=image_attention,
            unet_skip_dropout=unet_skip_dropout if patcher == "unet" else None,
            unet_readout=unet_readout if patcher == "unet" else None,
            modalities=2 if mot else None, qk_norm=qk_norm,
        )
        optimizer = OptimizerSettings(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                                      betas=tuple(betas), eps=eps)
        super().__init__(config, representation, special_ids, optimizer, attention=attention, seed=seed,
                         nonfinite=nonfinite, empty_init=empty_init)
        self.save_hyperparameters()

    @property
    def diffusion(self):
        """The noise process (``Diffusion``) of the representation, for code that studies it directly; generation
        goes through :meth:`sampler`."""
        return self.representation.diffusion
