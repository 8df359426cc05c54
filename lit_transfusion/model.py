"""TransfusionModel: token embeddings + patch vectors -> one transformer -> LM logits / predicted noise.

Reads top to bottom: the size registry, the config, then the model whose forward takes a packed sequence
(see ``batch.py``) plus the noised latents of its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_transfusion.patching import LinearPatcher, UNetPatcher
from lit_transfusion.transformer import KV, Transformer, TransformerConfig

# Named sizes: the paper's Table 2 (layers / width / heads) plus presets small enough for a 2-core CPU.
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(n_layers=2, dim=64, n_heads=2),
    "micro": dict(n_layers=2, dim=128, n_heads=2),
    "tiny": dict(n_layers=4, dim=256, n_heads=4),
    "small": dict(n_layers=6, dim=384, n_heads=6),
    "0.16B": dict(n_layers=16, dim=768, n_heads=12),
    "0.37B": dict(n_layers=24, dim=1024, n_heads=16),
    "0.76B": dict(n_layers=24, dim=1536, n_heads=24),
    "1.4B": dict(n_layers=24, dim=2048, n_heads=16),
    "7B": dict(n_layers=32, dim=4096, n_heads=32),
}


@dataclass
class ModelConfig:
    """Everything that fixes the network's shapes.

    Attributes:
        vocab_size: text vocabulary incl. special tokens.
        latent_shape: (C, h, w) of one image latent.
        patch_size: side of a square latent patch; divides h and w.
        patcher: "linear" or "unet".
        unet_channels: base conv width of the unet patcher.
        transformer: the backbone's config.
    """

    vocab_size: int
    latent_shape: tuple[int, int, int]
    patch_size: int = 2
    patcher: str = "linear"
    unet_channels: int = 64
    transformer: TransformerConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        C, h, w = self.latent_shape
        if self.patch_size < 1 or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide the latent grid {h}x{w} (latent_shape={self.latent_shape})"
            )
        if self.patcher not in ("linear", "unet"):
            raise ValueError(f"patcher={self.patcher!r}: expected 'linear' or 'unet'")
        if self.transformer is None:
            self.transformer = TransformerConfig()

    @property
    def patches_per_image(self) -> int:
        _, h, w = self.latent_shape
        return (h // self.patch_size) * (w // self.patch_size)


@dataclass
class ModelOutput:
    hidden: Tensor  # [B, L, D] final-normed hidden states (feed to ``logits`` where a target exists)
    eps: Tensor  # [N, C, h, w] predicted noise for every image
    kv: list[KV]  # per-layer (k, v) of the L positions, for a KV cache


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.transformer.dim
        C, h, w = cfg.latent_shape
        self.embed = nn.Embedding(cfg.vocab_size, D)
        if cfg.patcher == "linear":
            self.patcher = LinearPatcher(C, h, w, cfg.patch_size, D)
        else:
            self.patcher = UNetPatcher(C, h, w, cfg.patch_size, D, cfg.unet_channels)
        self.transformer = Transformer(cfg.transformer)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)) and getattr(m, "weight", None) is not None:
            if m.weight.abs().sum() == 0:  # leave deliberate zero-inits (output heads) alone
                return
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        image_ids: Tensor,
        patch_ids: Tensor,
        mask,
        latents: Tensor,
        t: Tensor,
        past: list[KV] | None = None,
    ) -> ModelOutput:
        """One pass over a packed sequence.

        Args:
            tokens, positions, image_ids, patch_ids: [B, L] (see ``Batch``); positions with
                ``image_ids >= 0`` take the patch vectors of ``latents`` instead of token embeddings.
            mask: dense bool [B, 1, L, Lpast+L] or a flex BlockMask (``attention.py``).
            latents: [N, C, h, w] noised latents of the N images (clean latents with t=0 for context images).
            t: [N] diffusion timestep of each image.
            past: optional per-layer cached (k, v) of earlier positions.
        """
        x = self.embed(tokens)  # [B, L, D]
        is_patch = image_ids >= 0  # [B, L]
        P = self.cfg.patches_per_image
        state = None
        if latents.shape[0] > 0:
            patches, state = self.patcher.encode(latents, t)  # [N, P, D]
            # Index of each patch position's vector in the flattened [N·P, D] table.
            flat = (image_ids * P + patch_ids)[is_patch]  # [n_patch_positions]
            x = x.masked_scatter(is_patch[..., None], patches.reshape(-1, x.shape[-1])[flat].to(x.dtype))
        hidden, kv = self.transformer(x, positions, mask, past)  # [B, L, D]
        eps = latents.new_zeros(latents.shape)
        if latents.shape[0] > 0:
            gathered = hidden.new_zeros(latents.shape[0] * P, hidden.shape[-1])
            gathered[flat] = hidden[is_patch]
            eps = self.patcher.decode(gathered.view(latents.shape[0], P, -1), state, t)  # [N, C, h, w]
        return ModelOutput(hidden=hidden, eps=eps, kv=kv)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., D] -> next-token logits [..., V]."""
        return self.lm_head(hidden)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
