"""VAE: the shipped weights reconstruct well with standardized latents; brief retraining works; loading errors are
clear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_transfusion.vae import (
    LatentCodec,
    VAEModule,
    build_autoencoder,
    images_to_tensor,
    psnr,
    tensor_to_images,
    vae_latent_shape,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "datamodules" / "shapes" / "pretrained_vae"


def _renders(split: str, count: int, start: int = 0) -> torch.Tensor:
    """``count`` shapes-world renders of ``split`` as float [count, 3, 32, 32] in [-1, 1]."""
    from datamodules.shapes.world import ShapesWorld

    world = ShapesWorld(seed=0, image_size=32)
    return images_to_tensor(np.stack([world.sample(split, start + i).image for i in range(count)]))


@pytest.fixture(scope="module")
def codec() -> LatentCodec:
    return LatentCodec.from_dir(SHIPPED)


def test_shipped_vae_reconstructs_with_standardized_latents(codec):
    x = _renders("val", 64)
    z = codec.encode(x, batch_size=16)
    assert z.shape == (64, 4, 8, 8) == (64, *codec.latent_shape(32))
    assert vae_latent_shape(SHIPPED, 32) == (4, 8, 8)
    assert abs(z.mean().item()) < 0.2
    assert 0.7 <= z.std().item() <= 1.3
    channel_std = z.transpose(0, 1).flatten(1).std(1)
    assert ((channel_std > 0.75) & (channel_std < 1.25)).all(), channel_std  # every channel standardized
    assert psnr(codec.decode(z), x).item() >= 28.0
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert size < 4.5 * 2**20


def test_codec_is_frozen_and_deterministic(codec):
    codec.train()  # a parent module calling .train() must not unfreeze it
    assert not codec.training and not any(p.requires_grad for p in codec.parameters())
    x = _renders("test", 4)
    torch.testing.assert_close(codec.encode(x), codec.encode(x))


def test_round_trip_shapes_and_image_helpers():
    codec = LatentCodec(build_autoencoder())  # untrained: shapes only
    assert codec.downsample_factor == 4 and codec.latent_channels == 4
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    z = codec.encode(x, batch_size=2)
    assert z.shape == (5, 4, 8, 8)
    y = codec.decode(z, batch_size=2)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1

    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    t = images_to_tensor(images)
    assert t.shape == (3, 3, 32, 32) and t.dtype == torch.float32 and t.min() >= -1 and t.max() <= 1
    np.testing.assert_array_equal(tensor_to_images(t), images)
    np.testing.assert_array_equal(tensor_to_images(images_to_tensor(torch.from_numpy(images))), images)


def test_missing_directory_error_names_the_path(tmp_path):
    missing = tmp_path / "no_such_vae"
    for load in (LatentCodec.from_dir, lambda p: vae_latent_shape(p, 32)):
        with pytest.raises(FileNotFoundError, match="no_such_vae") as info:
            load(missing)
        assert "configs/shapes/vae.yaml" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LatentCodec.from_dir(tmp_path / "empty")


@pytest.mark.slow
def test_brief_retraining_reconstructs_and_exports(tmp_path):
    """A few hundred CPU steps on in-memory renders: far above an untrained model (~10 dB), and it exports."""
    import lightning as L

    from datamodules.shapes.images import ShapesImageDataModule

    torch.manual_seed(0)
    dm = ShapesImageDataModule(num_train=1024, num_val=64, batch_size=16)
    # A quarter-width VAE (same 4x downsampling) keeps this ≈30 s on 2 CPU cores; 400 steps reach ≈24 dB,
    # while an untrained model gives ≈10 dB and a "paint the background" one ≈15 dB.
    model = VAEModule(block_out_channels=[16, 32, 32], norm_num_groups=8, lr=3e-3, warmup_steps=20,
                      export_dir=str(tmp_path / "vae"), stats_batches=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=400, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)

    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["scaling_factor"] > 0 and config["shift_factor"] is not None
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 4  # per-channel standardization
    codec = LatentCodec.from_dir(tmp_path / "vae")
    assert codec.latent_shape(32) == vae_latent_shape(tmp_path / "vae", 32) == (4, 8, 8)
    held_out = _renders("test", 64)
    assert psnr(codec.decode(codec.encode(held_out)), held_out).item() >= 20.0
