"""Pixels as the codecs and datamodules exchange them: uint8 ``[N, H, W, 3]`` <-> float ``[N, 3, H, W]`` in [-1, 1].

A neutral home (no model, no codec) so that datamodules, the VAE and VQ trainers, ``sample`` and notebooks share
one conversion.
"""

from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` (numpy or tensor) -> float32 ``[N, 3, H, W]`` in ``[-1, 1]``."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, H, W]`` in ``[-1, 1]`` -> uint8 numpy ``[N, H, W, 3]`` (clamped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
