"""Image latents <-> transformer patch vectors.

Both patchers turn a *noised* latent ``[N, C, h, w]`` and its timestep ``[N]`` into ``[N, P, D]`` patch
vectors (``P = (h/p)·(w/p)``, raster order) and the transformer's outputs back into predicted noise
``[N, C, h, w]``. Each patch gets a learned 2-D (row + column) position embedding: without it the patches
of an image are permutation-equivariant under the bidirectional image attention.

- :class:`LinearPatcher` (the paper's "linear"): one linear layer from the patch to ``D`` plus an embedding
  of t added to every patch vector; a linear layer back to the patch's noise.
- :class:`UNetPatcher` (the paper's "U-Net"): time-conditioned conv down blocks to the patch grid, then
  up blocks that also take the matching down blocks' features (skip connections around the transformer).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import Tensor, nn


def patchify(x: Tensor, p: int) -> Tensor:
    """[N, C, h, w] -> [N, (h/p)·(w/p), C·p·p], patches in raster order."""
    N, C, h, w = x.shape
    x = x.view(N, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [N, h/p, w/p, C, p, p]
    return x.reshape(N, (h // p) * (w // p), C * p * p)


def unpatchify(x: Tensor, p: int, channels: int, h: int, w: int) -> Tensor:
    """[N, (h/p)·(w/p), C·p·p] -> [N, C, h, w]; inverse of :func:`patchify`."""
    N = x.shape[0]
    x = x.view(N, h // p, w // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # [N, C, h/p, p, w/p, p]
    return x.reshape(N, channels, h, w)


class PositionEmbedding2D(nn.Module):
    """Learned row + column embeddings for a ``gh × gw`` patch grid -> ``[gh·gw, D]`` (raster order)."""

    def __init__(self, gh: int, gw: int, dim: int):
        super().__init__()
        self.row = nn.Parameter(torch.empty(gh, 1, dim))
        self.col = nn.Parameter(torch.empty(1, gw, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.row, std=0.02)
        nn.init.normal_(self.col, std=0.02)

    def forward(self) -> Tensor:
        return (self.row + self.col).flatten(0, 1)


class LinearPatcher(nn.Module):
    """The paper's linear patch encoder/decoder.

    Args:
        channels, height, width: latent shape ``C, h, w``. patch_size: ``p`` (divides h and w).
        dim: transformer width ``D``.
    """

    def __init__(self, channels: int, height: int, width: int, patch_size: int, dim: int):
        super().__init__()
        self.c, self.h, self.w, self.p = channels, height, width, patch_size
        patch_dim = channels * patch_size * patch_size
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        # The paper adds e(t) to the patch before the linear layer: W(x + e(t)) = Wx + W e(t), i.e. a t-vector
        # in model space confined to a C·p·p-dim (here 16) subspace. Adding a full-width e(t) after the linear
        # layer contains that as a special case (no rank limit on how t enters the model).
        self.time_embed = TimestepEmbedding(256, dim)
        self.proj_in = nn.Linear(patch_dim, dim)
        self.pos = PositionEmbedding2D(height // patch_size, width // patch_size, dim)
        self.proj_out = nn.Linear(dim, patch_dim)

    def output_layers(self) -> list[nn.Module]:
        """The layers that produce the predicted noise (zero-initialised by the model)."""
        return [self.proj_out]

    def keeps_init(self, name: str) -> bool:
        """Whether the submodule ``name`` keeps its own init instead of the model's N(0, 0.02)."""
        return False

    def encode(self, latents: Tensor, t: Tensor) -> tuple[Tensor, None]:
        """latents [N, C, h, w] (noised), t [N] -> patch vectors [N, P, D] and no skip state."""
        temb = self.time_embed(self.time_proj(t).to(latents.dtype))  # [N, D]
        x = self.proj_in(patchify(latents, self.p))  # [N, P, D]
        return x + temb[:, None, :] + self.pos(), None

    def decode(self, hidden: Tensor, state: None, t: Tensor) -> Tensor:
        """hidden [N, P, D] -> predicted noise [N, C, h, w]."""
        return unpatchify(self.proj_out(hidden), self.p, self.c, self.h, self.w)


class UNetPatcher(nn.Module):
    """The paper's U-Net patch encoder/decoder (without the U-Net's own attention layers).

    Down path: conv_in -> ResBlock at full resolution -> log2(p) × (stride-2 downsample, ResBlock), so the
    latent grid ``h × w`` becomes the patch grid ``h/p × w/p``; a 1×1 projection to ``D``. Up path mirrors it
    and concatenates the matching down features (U-Net skips) before each ResBlock. All ResBlocks are
    conditioned on the timestep embedding.

    The full-resolution skips alone make a small local denoiser: the loss falls without the transformer's patch
    outputs, which then carry a small share of the prediction and receive little gradient, so the caption is
    starved (``benchmarks/unet_diagnosis.py`` measures this; ``results/unet_diagnosis/``). Scaling a skip does not
    help: each up ResBlock's GroupNorm normalizes the skip's channels on their own. ``skip_dropout`` zeroes all
    skips of a fraction of the images in training (a zero stays zero through the norm), so on those the up path
    must rely on the transformer path; evaluation and sampling always use the skips. ``readout`` adds a linear
    readout of the transformer's patch outputs to the up path's prediction (the linear patcher's decoder, beside
    the up blocks, zero-initialised like them): the transformer then reaches the prediction directly, as in the
    linear patcher, and the up blocks add what the conv features know beyond it.

    Args:
        channels, height, width, patch_size, dim: as :class:`LinearPatcher` (p must be a power of two).
        base_channels: width of the conv blocks (doubled once per downsampling, capped at 4×).
        skip_dropout: the fraction of training images whose skips are all zeroed (see above).
        readout: add a linear readout of the transformer's outputs to the prediction (see above).
    """

    def __init__(self, channels: int, height: int, width: int, patch_size: int, dim: int, base_channels: int = 64,
                 skip_dropout: float = 0.0, readout: bool = False):
        super().__init__()
        if patch_size & (patch_size - 1):
            raise ValueError(f"patch_size={patch_size}: the unet patcher needs a power of two")
        self.c, self.h, self.w, self.p = channels, height, width, patch_size
        levels = int(math.log2(patch_size))
        widths = [base_channels * min(2**i, 4) for i in range(levels + 1)]  # channels at each resolution
        temb_dim = 4 * base_channels
        groups = math.gcd(base_channels, 32)

        def res(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb_dim, groups=groups)

        self.time_proj = Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(base_channels, temb_dim)
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList([res(widths[0], widths[0])])
        for i in range(levels):
            self.down.append(Downsample2D(widths[i], use_conv=True, out_channels=widths[i]))
            self.down.append(res(widths[i], widths[i + 1]))
        self.to_model = nn.Linear(widths[-1], dim)
        self.pos = PositionEmbedding2D(height // patch_size, width // patch_size, dim)
        self.from_model = nn.Linear(dim, widths[-1])
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            self.up.append(res(2 * widths[i + 1], widths[i]))  # input: model features ++ skip
            self.up.append(Upsample2D(widths[i], use_conv=True))
        self.up.append(res(2 * widths[0], widths[0]))
        self.norm_out = nn.GroupNorm(groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], channels, 3, padding=1)
        if not 0.0 <= skip_dropout < 1.0:
            raise ValueError(f"unet_skip_dropout={skip_dropout}: expected a fraction in [0, 1)")
        self.skip_dropout = skip_dropout
        self.readout = nn.Linear(dim, channels * patch_size * patch_size) if readout else None

    def output_layers(self) -> list[nn.Module]:
        """The layers that produce the predicted noise (zero-initialised by the model)."""
        return [self.conv_out] + ([self.readout] if self.readout is not None else [])

    def keeps_init(self, name: str) -> bool:
        """The diffusers ResNet/resampling blocks keep diffusers' init (made for these conv blocks)."""
        return name.startswith(("down.", "up."))

    def _temb(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.time_embed(self.time_proj(t).to(dtype))  # [N, 4·base]

    def encode(self, latents: Tensor, t: Tensor) -> tuple[Tensor, list[Tensor]]:
        """latents [N, C, h, w], t [N] -> patch vectors [N, P, D] and skip features (one per ResBlock)."""
        temb = self._temb(t, latents.dtype)
        x = self.conv_in(latents)  # [N, w0, h, w]
        skips = []
        for layer in self.down:
            x = layer(x, temb) if isinstance(layer, ResnetBlock2D) else layer(x)
            if isinstance(layer, ResnetBlock2D):
                skips.append(x)
        tokens = self.to_model(x.flatten(2).transpose(1, 2))  # [N, P, D]
        return tokens + self.pos(), skips

    def decode(self, hidden: Tensor, skips: list[Tensor], t: Tensor) -> Tensor:
        """hidden [N, P, D] + skips from :meth:`encode` -> predicted noise [N, C, h, w]."""
        temb = self._temb(t, hidden.dtype)
        N = hidden.shape[0]
        x = self.from_model(hidden).transpose(1, 2).reshape(N, -1, self.h // self.p, self.w // self.p)
        skips = list(skips)
        keep = None  # [N, 1, 1, 1]: 0 for the images trained without their skips
        if self.training and self.skip_dropout > 0:
            keep = (torch.rand(N, 1, 1, 1, device=hidden.device) >= self.skip_dropout).to(hidden.dtype)
        for layer in self.up:
            if isinstance(layer, ResnetBlock2D):
                skip = skips.pop()
                x = layer(torch.cat([x, skip if keep is None else skip * keep.to(skip.dtype)], dim=1), temb)
            else:
                x = layer(x)
        pred = self.conv_out(torch.nn.functional.silu(self.norm_out(x)))  # [N, C, h, w]
        if self.readout is not None:
            pred = pred + unpatchify(self.readout(hidden), self.p, self.c, self.h, self.w)
        return pred
