"""Images from a user's own folder, for training the VAE (``configs/imagefolder/vae.yaml``).

Every image file under the folder (by extension, recursively; captions and metadata are ignored) is decoded with
``decode.load_image``: EXIF orientation, any mode to RGB, shorter side resized to ``image_size`` and center-cropped.
Batches are float ``[B, 3, image_size, image_size]`` in ``[-1, 1]``, as ``VAEModule`` expects.

``setup`` decodes each file once to find the bad ones (skipped and counted by reason, reported once), so that a
bad file can never stop training halfway through an epoch. That costs one pass over the images, which is fine
for a VAE-sized data set (thousands to a few hundred thousand small images); the items themselves are decoded
again lazily, per batch, so the folder is never held in memory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from datamodules.files.decode import BadSample, load_image
from datamodules.files.records import ImageRef, Skips
from lit_transfusion.vae import images_to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VAL_FOLDERS = ("validation",)  # with a train/ folder: the held-out images, when present


def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, case-insensitive), sorted; hidden files and
    folders (``.cache``, macOS ``._name`` resource forks) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def path_hash(relative: str) -> float:
    """A stable number in [0, 1) for a relative path (the same on every run and machine)."""
    digest = hashlib.sha1(relative.replace(os.sep, "/").encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def held_out(relative: str, fraction: float) -> bool:
    """Whether the image at ``relative`` path belongs to the validation ``fraction``: by a stable hash of the path,
    unlike a random split, which would move images between the splits whenever files are added."""
    return path_hash(relative) < fraction


class FolderImages(Dataset):
    """Map-style dataset over image files: item ``i`` is ``files[i]`` decoded to uint8 ``[S, S, 3]`` (a tensor)."""

    def __init__(self, files: list[Path], image_size: int, min_size: int = 8, max_aspect: float = 4.0):
        self.files, self.image_size, self.min_size, self.max_aspect = files, image_size, min_size, max_aspect

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> np.ndarray:
        """uint8 ``[S, S, 3]``; raises ``BadSample`` for a bad file."""
        path = str(self.files[i])
        return load_image(ImageRef(name=path, path=path), self.image_size, self.min_size, self.max_aspect)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return torch.from_numpy(self.load(i))
        except BadSample as e:  # it decoded in setup: the file changed since
            raise RuntimeError(f"{self.files[i]}: {e} (the file changed after the data module's setup)") from None


class _Collate:
    """uint8 ``[S, S, 3]`` items -> float ``[B, 3, S, S]`` in ``[-1, 1]``; with ``hflip``, each image mirrored
    left-right with probability 0.5 (only the autoencoder trains on this, so no caption can be contradicted)."""

    def __init__(self, hflip: bool):
        self.hflip = hflip

    def __call__(self, items: list[torch.Tensor]) -> torch.Tensor:
        x = images_to_tensor(torch.stack(items))
        if self.hflip:
            flip = torch.rand(x.shape[0]) < 0.5
            x[flip] = x[flip].flip(-1)
        return x


@rank_zero_only
def _report(text: str) -> None:
    print(text, flush=True)


class FolderImageDataModule(LightningDataModule):
    """The images of a folder, for VAE training.

    Args:
        path: A folder of images. With a ``train/`` sub-folder (the Hugging Face imagefolder layout), its images
            train and those of ``validation/`` validate; otherwise every image under ``path`` is used, a
            ``val_fraction`` of them held out by a stable hash of the relative path.
        image_size: Side of the square training images: the shorter side is resized to it, then center-cropped.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes (0: decode in the main process).
        val_fraction: Held-out fraction when there is no ``validation/`` folder (at least one image is held out).
        hflip: Randomly mirror training images left-right.
        min_size: Images whose shorter side is below this are skipped ("too_small").
        max_aspect: Images whose long/short side ratio exceeds this are skipped ("bad_aspect_ratio").
    """

    def __init__(
        self,
        path: str,
        image_size: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        hflip: bool = True,
        min_size: int = 8,
        max_aspect: float = 4.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path {path!r} is not a folder: expected a folder of images (png, jpg, ...), "
                                    "optionally with train/ and validation/ sub-folders")
        for name, value in [("image_size", image_size), ("batch_size", batch_size), ("min_size", min_size)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        self.train_files: list[Path] | None = None
        self.val_files: list[Path] | None = None
        self.skips = Skips()

    def _valid(self, files: list[Path]) -> list[Path]:
        """The files that decode and pass the size checks; the others are counted in ``self.skips``."""
        hp = self.hparams
        probe = FolderImages(files, hp.image_size, hp.min_size, hp.max_aspect)
        kept = []
        for i, f in enumerate(files):
            try:
                probe.load(i)
            except BadSample as e:
                self.skips.add(e.reason, str(f))
                continue
            kept.append(f)
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.train_files is not None:
            return
        root = Path(self.hparams.path)
        if (root / "train").is_dir():
            train = self._valid(find_images(root / "train"))
            val_dir = next((root / d for d in VAL_FOLDERS if (root / d).is_dir()), None)
            val = self._valid(find_images(val_dir)) if val_dir is not None else None
            base = root / "train"
        else:
            train, val, base = self._valid(find_images(root)), None, root
        if val is None:  # hold out a stable fraction of the training images
            rel = {f: os.path.relpath(f, base) for f in train}
            val = [f for f in train if held_out(rel[f], self.hparams.val_fraction)]
            if not val and len(train) > 1:  # a small folder: hold out the image whose hash is smallest
                val = [min(train, key=lambda f: path_hash(rel[f]))]
            held = set(val)
            train = [f for f in train if f not in held]
        if not train or not val:
            skipped = f" (skipped: {self._skip_text(examples=False)})" if self.skips else ""
            raise ValueError(f"path {str(root)!r}: no valid image to {'train' if not train else 'validate'} on"
                             f"{skipped}; expected image files ({', '.join(IMAGE_EXTENSIONS)}) of at least "
                             f"{self.hparams.min_size} px with aspect ratio <= {self.hparams.max_aspect}, and at least "
                             "two of them")
        self.train_files, self.val_files = train, val
        _report(f"{root}: {len(train) + len(val)} images ({len(train)} train, {len(val)} validation), skipped: "
                f"{self._skip_text() or 'none'}")

    def _skip_text(self, examples: bool = True) -> str:
        """"corrupt_image 2, too_small 1", then (``examples``) the first offending files per reason, a line each."""
        text = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skips.counts.items()))
        for reason, where in sorted(self.skips.examples.items()) if examples else []:
            text += f"\n  {reason}: {', '.join(where)}"
        return text

    def _loader(self, files: list[Path], train: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            FolderImages(files, hp.image_size, hp.min_size, hp.max_aspect),
            batch_size=hp.batch_size,
            shuffle=train,
            drop_last=train and len(files) >= hp.batch_size,  # a folder smaller than a batch still trains
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=_Collate(hflip=train and hp.hflip),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_files, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_files, train=False)
