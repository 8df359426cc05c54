"""Image-only datamodule over the shapes world, used to train the VAE (``configs/shapes/vae.yaml``).

Batches are float tensors ``[B, 3, H, W]`` in ``[-1, 1]``; captions are ignored here.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from datamodules.shapes.world import ShapesWorld
from lit_transfusion.vae import images_to_tensor


def render_images(world: ShapesWorld, split: str, count: int) -> torch.Tensor:
    """The first ``count`` renders of ``split`` as a uint8 tensor ``[count, H, W, 3]``."""
    return torch.from_numpy(np.stack([world.sample(split, i).image for i in range(count)]))


def _collate_flip(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` items -> float ``[B, 3, H, W]`` in [-1, 1], each mirrored left-right with p=0.5.

    Flips double the variety the VAE sees; only the autoencoder trains on this data, so a flipped
    scene never meets a caption that says "left of".
    """
    x = images_to_tensor(torch.stack([item[0] for item in items]))
    flip = torch.rand(x.shape[0]) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def _collate(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return images_to_tensor(torch.stack([item[0] for item in items]))


class ShapesImageDataModule(LightningDataModule):
    """Rendered shapes images held in memory as uint8, converted to ``[-1, 1]`` floats per batch.

    Args:
        seed: Seed of the ``ShapesWorld`` (which scenes each split holds).
        image_size: Side of the rendered square images (pixels).
        num_train: Training images (from the world's ``train`` split).
        num_val: Validation images (from the world's ``val`` split).
        batch_size: Images per batch.
        num_workers: DataLoader worker processes (0: render/convert in the main process).
        hflip: Randomly mirror training images left-right.
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 32,
        num_train: int = 20000,
        num_val: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        hflip: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_images: torch.Tensor | None = None  # uint8 [num_train, H, W, 3]
        self.val_images: torch.Tensor | None = None  # uint8 [num_val, H, W, 3]

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:
            return
        world = ShapesWorld(seed=self.hparams.seed, image_size=self.hparams.image_size)
        self.train_images = render_images(world, "train", self.hparams.num_train)
        self.val_images = render_images(world, "val", self.hparams.num_val)

    def _loader(self, images: torch.Tensor, train: bool) -> DataLoader:
        return DataLoader(
            TensorDataset(images),
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            collate_fn=_collate_flip if (train and self.hparams.hflip) else _collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_images, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_images, train=False)
