"""Settings ``prepare`` checks before reading any data: each failure is a :class:`PrepareError` naming the
setting and what it should be."""

from __future__ import annotations

from datamodules.files.prepare.errors import PrepareError
from datamodules.files.sources import KINDS, SourceConfig


def check_settings(sources: list[SourceConfig], vae_path: str, image_size: int, seq_len: int,
                   patch_size: int) -> None:
    """Sources named uniquely with known kinds; a VAE whose latent grid ``patch_size`` divides; a ``seq_len``
    that holds one image with a caption."""
    from lit_transfusion.vae import vae_latent_shape

    if not sources:
        raise PrepareError(f"sources: empty; expected at least one source ({', '.join(KINDS)})")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise PrepareError(f"sources: names must be unique, got {names}")
    for s in sources:
        if s.kind not in KINDS:
            raise PrepareError(f"sources[{s.name!r}].kind: {s.kind!r}; expected {', '.join(KINDS[:-1])} or "
                               f"{KINDS[-1]}")
    try:
        C, h, w = vae_latent_shape(vae_path, image_size)
    except FileNotFoundError as e:
        raise PrepareError(f"vae_path: {e}") from None
    if h % patch_size or w % patch_size or h == 0:
        raise PrepareError(f"patch_size={patch_size} must divide the latent grid {h}x{w} (image_size={image_size} "
                           f"through the VAE at {vae_path!r})")
    needed = (h // patch_size) * (w // patch_size) + 2 + 2 + 1
    if needed > seq_len:
        raise PrepareError(f"seq_len={seq_len} cannot hold one image ({needed - 3} positions) with "
                           "<bos>, a caption token and <eos>")


def check_held_out_and_vae(val_fraction: float, min_val_samples: int, vae_psnr_images: int) -> None:
    """A held-out share in [0, 1); counts >= 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"val_fraction: {val_fraction}; expected a share in [0, 1) (0.05 holds out 5 %)")
    for name, value in (("min_val_samples", min_val_samples), ("vae_psnr_images", vae_psnr_images)):
        if value < 0:
            raise PrepareError(f"{name}: {value}; expected a count >= 0 (0 turns it off)")
