"""ChameleonModule: the paper's discrete-token baseline (Transfusion §4.1) under the same trainer.

Images are the codes of a frozen VQ tokenizer (``lit_transfusion.vq``), laid out as ``<boi> c_1 .. c_P <eoi>`` in
a vocabulary that extends the text ids (data ``image_tokens: codes``), and the whole sequence is trained with
the next-token loss:

    loss = Σ_i w_i · CE_i / Σ_i w_i     (w = 1 at text targets, ``image_token_weight`` at image-code targets)

so ``image_token_weight: 1`` is Chameleon's plain mean over every token. Everything else is
:class:`MixedModalModule`'s, as for ``TransfusionModule``: the same transformer (here without a patcher, with
QK-norm as Chameleon uses), the same data, packing, optimizer, schedule, logging, checkpointing and compute
counting (``train/positions_seen``: a code counts one sequence element, like a text token or a patch).
``val/cond_gap`` becomes the relative drop of the image codes' negative log-likelihood under the true caption
against a shuffled one, and sampling is KV-cached next-token decoding of the codes with classifier-free guidance
on the logits (``ChameleonSampler``). The loss, the cond-gap NLL and the sampler are the ``DiscreteCodes``
representation's (``representation.py``).
"""

from __future__ import annotations

from typing import Literal

from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from lit_transfusion.representation import DiscreteCodes
from lit_transfusion.training import MixedModalModule, OptimizerSettings, model_config


class ChameleonModule(MixedModalModule):
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
        seed: seeds the per-step generator (``MixedModalModule.step_generator``); the code loss draws nothing from
            it, so runs differing only in ``seed`` differ only by ``seed_everything`` (initialisation, data).
        nonfinite: "stop" or "skip" a step whose loss is not finite.
        empty_init: build on the meta device and materialise per rank (FSDP2 via ``ModelParallelStrategy``).
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
        if patch_size != 1:
            raise ValueError(f"model.init_args.patch_size={patch_size}: image codes take one position each (1)")
        representation = DiscreteCodes(first_code=special_ids.get("first_code", -1),
                                       image_token_weight=image_token_weight)
        representation.check_data(special_ids, vocab_size)  # before building a network for the wrong data
        config = model_config(
            size, vocab_size=vocab_size, latent_shape=latent_shape, dim=dim, n_layers=n_layers, n_heads=n_heads,
            max_seq_len=max_seq_len, activation_checkpointing=activation_checkpointing, qk_norm=qk_norm,
            patch_size=1, patcher="none",
        )
        optimizer = OptimizerSettings(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                                      betas=tuple(betas), eps=eps)
        super().__init__(config, representation, special_ids, optimizer, attention=attention, seed=seed,
                         nonfinite=nonfinite, empty_init=empty_init)
        self.save_hyperparameters()
