"""TransfusionModel: token embeddings + patch vectors -> one transformer -> LM logits / predicted noise.

Reads top to bottom: the size registry, the config, then the model whose forward takes a packed sequence
(``Seq``, see ``batch.py``) plus the noised latents of its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_transfusion.attention import check_image_attention
from lit_transfusion.batch import IGNORE, Seq
from lit_transfusion.patching import LinearPatcher, UNetPatcher
from lit_transfusion.transformer import KV, Transformer, TransformerConfig

# Named sizes: the paper's Table 2 (layers / width / heads) plus presets small enough for a 2-core CPU. The
# U-Net patcher's base width scales with them: 1120 channels give the paper's ~0.27B-parameter U-Net (docs/scaling.md).
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(n_layers=2, dim=64, n_heads=2, unet_channels=32),
    "micro": dict(n_layers=2, dim=128, n_heads=2, unet_channels=64),
    "tiny": dict(n_layers=4, dim=256, n_heads=4, unet_channels=64),
    "small": dict(n_layers=6, dim=384, n_heads=6, unet_channels=96),
    "0.16B": dict(n_layers=16, dim=768, n_heads=12, unet_channels=1120),
    "0.37B": dict(n_layers=24, dim=1024, n_heads=16, unet_channels=1120),
    "0.76B": dict(n_layers=24, dim=1536, n_heads=24, unet_channels=1120),
    "1.4B": dict(n_layers=24, dim=2048, n_heads=16, unet_channels=1120),
    "7B": dict(n_layers=32, dim=4096, n_heads=32, unet_channels=1120),
}


@dataclass
class ModelConfig:
    """Everything that fixes the network's shapes.

    Attributes:
        vocab_size: text vocabulary incl. special tokens.
        latent_shape: (C, h, w) of one image latent.
        patch_size: side of a square latent patch; divides h and w.
        patcher: "linear", "unet", or "none": no patcher, for a text-only or discrete-image-token model (the
            Chameleon-style baseline, whose image codes are vocabulary ids). Such a model takes no latents;
            ``latent_shape`` then only describes the images to others (e.g. the code grid) and need not split
            into patches.
        unet_channels: base conv width of the unet patcher.
        unet_skip_dropout: the fraction of training images the unet patcher decodes without skips (``UNetPatcher``).
        unet_readout: the unet patcher also reads its prediction linearly off the transformer (``UNetPatcher``).
        image_attention: the mask among one image's patches, "bidirectional" (the paper) or "causal"
            (``attention.py``); part of the network's definition, so training and generation share it.
        transformer: the backbone's config. Its ``modalities`` is 1 (dense) or 2 (Mixture-of-Transformers:
            modality 0 = text positions, ``<boi>``/``<eoi>`` included; 1 = image-patch positions).
    """

    vocab_size: int
    latent_shape: tuple[int, int, int]
    patch_size: int = 2
    patcher: str = "linear"
    unet_channels: int = 64
    unet_skip_dropout: float = 0.0
    unet_readout: bool = False
    image_attention: str = "bidirectional"
    transformer: TransformerConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        C, h, w = self.latent_shape
        if self.patcher not in ("linear", "unet", "none"):
            raise ValueError(f"patcher={self.patcher!r}: expected 'linear', 'unet' or 'none'")
        if self.patcher != "none" and (self.patch_size < 1 or h % self.patch_size or w % self.patch_size):
            raise ValueError(
                f"patch_size={self.patch_size} must divide the latent grid {h}x{w} (latent_shape={self.latent_shape})"
            )
        check_image_attention(self.image_attention)
        if self.transformer is None:
            self.transformer = TransformerConfig()
        if self.transformer.modalities not in (1, 2):
            raise ValueError(f"modalities={self.transformer.modalities}: the model has two modalities (text, image "
                             "patches); expected 1 (dense) or 2 (Mixture-of-Transformers)")
        if self.transformer.modalities == 2 and self.patcher == "none":
            raise ValueError("modalities=2 with patcher='none': the image weights would never see a position "
                             "(a model without a patcher has no patch positions)")

    @classmethod
    def from_size(cls, size: str, *, vocab_size: int, latent_shape: tuple[int, int, int], **overrides) -> ModelConfig:
        """The config of a named size (``SIZES``). ``overrides`` are ModelConfig fields (patch_size, patcher,
        unet_channels, image_attention) or TransformerConfig fields (dim, n_layers, n_heads, max_seq_len, modalities,
        qk_norm, ...); None = keep."""
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not a known size: expected one of {', '.join(SIZES)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        preset = dict(SIZES[size])
        own = {"unet_channels": preset.pop("unet_channels")}
        own.update({k: overrides.pop(k) for k in ("patch_size", "patcher", "unet_channels", "unet_skip_dropout",
                                                  "unet_readout", "image_attention")
                    if k in overrides})
        known = TransformerConfig.__dataclass_fields__
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown model setting(s) {', '.join(unknown)}")
        transformer = TransformerConfig(**{**preset, **overrides})
        return cls(vocab_size=vocab_size, latent_shape=tuple(latent_shape), transformer=transformer, **own)

    @property
    def patches_per_image(self) -> int:
        """Patch positions of one image; 0 without a patcher (its model lays no image out as patches)."""
        if self.patcher == "none":
            return 0
        _, h, w = self.latent_shape
        return (h // self.patch_size) * (w // self.patch_size)


@dataclass
class ModelOutput:
    hidden: Tensor  # [B, L, D] final-normed hidden states (feed to ``logits`` where a target exists)
    eps: Tensor  # [N, C, h, w] every image's prediction: noise ε, v or velocity (``Diffusion.objective``)
    kv: list[KV]  # per-layer (k, v) of the L positions, for a KV cache


class TransfusionModel(nn.Module):
    """Embeddings + patcher -> transformer -> LM head / patch decoder.

    Built on any device, the meta device included (``torch.device("meta")``: no memory, no init; call
    :meth:`init_weights` after ``to_empty``). On a real device the weights are initialised at construction.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.transformer.dim
        C, h, w = cfg.latent_shape
        self.embed = nn.Embedding(cfg.vocab_size, D)
        if cfg.patcher == "linear":
            self.patcher = LinearPatcher(C, h, w, cfg.patch_size, D)
        elif cfg.patcher == "unet":
            self.patcher = UNetPatcher(C, h, w, cfg.patch_size, D, cfg.unet_channels,
                                       skip_dropout=cfg.unet_skip_dropout, readout=cfg.unet_readout)
        else:
            self.patcher = None
        self.transformer = Transformer(cfg.transformer)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        if self.lm_head.weight.device.type != "meta":
            self._init_named()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight and buffer from scratch (after ``to_empty`` from the meta device): each
        module's own default init, then :meth:`_init_named` on top."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.transformer.reset_buffers()
        self._init_named()

    @torch.no_grad()
    def _init_named(self) -> None:
        """The model's initialisation, by name (DiT's ``initialize_weights`` scheme):

        - N(0, 0.02) for the token embedding, every transformer and LM-head linear layer, the patchers'
          linear projections and their timestep-embedding MLP (DiT inits its t-MLP the same way); biases 0;
        - the diffusers conv blocks inside the U-Net patcher keep diffusers' own init;
        - the noise-predicting output layers (``patcher.output_layers()``) start at zero, so the model first
          predicts zero noise (DiT's choice: a stabler start).
        """
        def normal(m: nn.Module) -> None:
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

        def keeps_init(name: str) -> bool:
            return name.startswith("patcher.") and self.patcher.keeps_init(name[len("patcher."):])

        zero = {id(m) for m in self.patcher.output_layers()} if self.patcher is not None else set()
        for name, m in self.named_modules():
            if id(m) in zero:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Linear, nn.Embedding)) and not keeps_init(name):
                normal(m)

    def forward(self, seq: Seq, latents: Tensor, t: Tensor, mask, past: list[KV] | None = None) -> ModelOutput:
        """One pass over a packed sequence.

        Args:
            seq: the per-position fields, each [B, L]; positions with ``image_ids >= 0`` take the patch vectors
                of ``latents`` instead of token embeddings.
            latents: [N, C, h, w] noised latents of the N images (clean latents with t=0 for context images).
            t: [N] diffusion timestep of each image in t units (0..T; long, or float: flow sampling's σ·T).
            mask: dense bool [B, 1, L, Lpast+L] or a flex BlockMask (``attention.py``).
            past: optional per-layer cached (k, v) of earlier positions.

        With a Mixture-of-Transformers backbone, patch positions run through the image weights and every other
        position (text, ``<boi>``, ``<eoi>``, pads) through the text weights.
        """
        if self.patcher is None and latents.shape[0] > 0:
            raise ValueError(f"this model has no patcher (patcher='none') and takes no images, but got latents of "
                             f"shape {tuple(latents.shape)}: give it text (image codes as token ids) only")
        x = self.embed(seq.tokens)  # [B, L, D]
        is_patch = seq.image_mask  # [B, L]
        P = self.cfg.patches_per_image
        state = None
        if latents.shape[0] > 0:
            patches, state = self.patcher.encode(latents, t)  # [N, P, D]
            # Index of each patch position's vector in the flattened [N·P, D] table.
            flat = (seq.image_ids * P + seq.patch_ids)[is_patch]  # [n_patch_positions]
            x = x.masked_scatter(is_patch[..., None], patches.reshape(-1, x.shape[-1])[flat].to(x.dtype))
        modality = is_patch.long() if self.cfg.transformer.modalities > 1 else None  # [B, L]: 1 = image patch
        hidden, kv = self.transformer(x, seq.positions, mask, past, modality)  # [B, L, D]
        eps = latents.new_zeros(latents.shape)
        if latents.shape[0] > 0:
            gathered = hidden.new_zeros(latents.shape[0] * P, hidden.shape[-1])
            gathered[flat] = hidden[is_patch]
            eps = self.patcher.decode(gathered.view(latents.shape[0], P, -1), state, t)  # [N, C, h, w]
        return ModelOutput(hidden=hidden, eps=eps, kv=kv)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., D] -> next-token logits [..., V]."""
        return self.lm_head(hidden)

    def target_logits(self, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Logits only where a target exists (the LM head over every position would cost B·L·V).

        hidden [B, L, D], targets [B, L] (``IGNORE`` = none) -> (logits [n, V] float32, targets [n])."""
        supervised = targets != IGNORE
        return self.logits(hidden[supervised]).float(), targets[supervised]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one position's forward uses: the N of a 6·N·D compute budget. Dense, every parameter
        (``num_params``). Mixture-of-Transformers: every backbone parameter exists once per modality and a
        position uses one copy, so the backbone counts once (the MoT paper compares models at equal FLOPs per
        token); the embedding, LM head and patcher count whole, as for a dense model."""
        backbone = sum(p.numel() for p in self.transformer.parameters())
        return self.num_params() - backbone + backbone // self.cfg.transformer.modalities
