"""FolderImageDataModule: a user's image folder for VAE training — bad files skipped and counted, a stable
train/validation split, batches in [-1, 1], and a short ``vae fit`` through the command line that exports a
loadable VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.files.images import FolderImageDataModule, find_images
from lit_transfusion.vae import LatentCodec
from tests.bad_data import TOO_SMALL, encode, picture
from tests.conftest import run_cli


def _write_folder(root: Path, n_valid: int = 10) -> None:
    """``n_valid`` good images of several sizes, modes and formats (some in a sub-folder), 2 corrupt, 1 too small,
    plus files that are not images."""
    (root / "more").mkdir(parents=True, exist_ok=True)
    for i in range(n_valid):
        size = (40 + 8 * (i % 3), 32 + 4 * (i % 2))
        folder = root / "more" if i % 4 == 3 else root
        if i % 3 == 2:
            Image.fromarray(picture(i, *size)).convert("L").save(folder / f"gray{i}.jpg")
        else:
            Image.fromarray(picture(i, *size)).save(folder / f"img{i}.PNG")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "half.jpg").write_bytes(encode(picture(99, 64, 64), "JPEG")[:300])
    Image.fromarray(picture(98, *TOO_SMALL)).save(root / "tiny.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.PNG", "text": "ignored"}) + "\n")
    (root / ".hidden.png").write_bytes(b"not an image, and hidden")


def test_bad_files_are_counted_and_batches_are_images_in_range(tmp_path, capsys):
    _write_folder(tmp_path)
    assert len(find_images(tmp_path)) == 13  # metadata and hidden files are not images
    dm = FolderImageDataModule(str(tmp_path), image_size=16, batch_size=4, val_fraction=0.3)
    dm.setup("fit")
    out = capsys.readouterr().out
    assert "10 images" in out and "corrupt_image 2" in out and "too_small 1" in out, out
    assert dm.skips.counts == {"corrupt_image": 2, "too_small": 1}
    train, val = set(dm.train_files), set(dm.val_files)
    assert train and val and not train & val and len(train | val) == 10
    assert not any(f.name in ("broken.png", "half.jpg", "tiny.png") for f in train | val)

    batches = list(dm.train_dataloader())
    assert sum(len(b) for b in batches) == 4 * (len(train) // 4)  # full batches only
    for b in batches + list(dm.val_dataloader()):
        assert b.dtype == torch.float32 and b.shape[1:] == (3, 16, 16)
        assert -1.0 <= b.min() and b.max() <= 1.0 and b.std() > 0.05  # real pixels, not a constant
    # validation images come unflipped, in order: the same tensor every time
    v1, v2 = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    torch.testing.assert_close(v1, v2)

    again = FolderImageDataModule(str(tmp_path), image_size=16, batch_size=4, val_fraction=0.3)
    again.setup("fit")
    assert again.val_files == dm.val_files  # the split is a stable hash of the path, not random


def test_train_and_validation_folders_are_the_splits(tmp_path):
    for split, n in (("train", 6), ("validation", 2)):
        (tmp_path / split / "images").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(picture(i, 32, 32)).save(tmp_path / split / "images" / f"{i}.png")
    dm = FolderImageDataModule(str(tmp_path), image_size=32, batch_size=8, hflip=False)
    dm.setup("fit")
    assert len(dm.train_files) == 6 and all("train" in f.parts for f in dm.train_files)
    assert len(dm.val_files) == 2 and all("validation" in f.parts for f in dm.val_files)
    batch = next(iter(dm.train_dataloader()))  # fewer images than a batch: still one (partial) batch
    assert batch.shape == (6, 3, 32, 32)
    decoded = {tuple(((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).flatten().tolist()) for x in batch}
    assert decoded == {tuple(picture(i, 32, 32).flatten().tolist()) for i in range(6)}  # 32 px: no resampling


def test_small_folder_still_holds_one_image_out(tmp_path):
    for i in range(3):
        Image.fromarray(picture(i, 32, 32)).save(tmp_path / f"{i}.png")
    dm = FolderImageDataModule(str(tmp_path), val_fraction=0.01)
    dm.setup("fit")
    assert len(dm.val_files) == 1 and len(dm.train_files) == 2


def test_no_valid_image_is_an_error_naming_the_folder(tmp_path):
    bad = tmp_path / "only_bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(b"garbage")
    dm = FolderImageDataModule(str(bad))
    with pytest.raises(ValueError, match="only_bad.*no valid image.*corrupt_image 1, empty_file 1"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        FolderImageDataModule(str(tmp_path / "no_such_folder"))
    with pytest.raises(ValueError, match="val_fraction"):
        FolderImageDataModule(str(bad), val_fraction=0.0)


def test_vae_fit_on_a_folder_through_the_cli(tmp_path):
    """``vae fit --config configs/imagefolder/vae.yaml`` for 3 steps on a small folder exports a VAE that loads."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(picture(i, 48, 40)).save(images / f"{i:02d}.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG broken")
    export = tmp_path / "vae"
    proc = run_cli(
        "vae", "fit", "--config", "configs/imagefolder/vae.yaml",
        f"--data.init_args.path={images}", "--data.init_args.batch_size=4", "--data.init_args.val_fraction=0.2",
        "--model.init_args.block_out_channels=[32, 32]", f"--model.init_args.export_dir={export}",
        "--model.init_args.stats_batches=2", "--trainer.accelerator=cpu", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped: corrupt_image 1" in proc.stdout, proc.stdout[-2000:]
    codec = LatentCodec.from_dir(export)
    assert codec.latent_shape(32) == (4, 16, 16)  # two blocks: factor 2
    x = torch.from_numpy(np.stack([picture(0, 32, 32)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = codec.encode(x)
    assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()
