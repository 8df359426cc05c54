"""``prepare``'s checks on a user's data: a source without validation data of its own gets a held-out split (stable
by key, its size in the report and the manifest), and the VAE's reconstruction PSNR on each source's images is
reported, with a warning naming ``configs/imagefolder/vae.yaml`` when the VAE was trained on other images.

Settings are those of ``configs/imagefolder/prepare.yaml`` (only the sources, out_dir and worker count differ)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from datamodules.files.prepare import VAE_CONFIG, prepare, with_validation
from datamodules.files.records import Skips
from datamodules.files.schema import Manifest
from datamodules.files.sources import SourceConfig, read_source
from datamodules.shapes.world import ShapesWorld
from tests.conftest import ROOT

CONFIG = yaml.safe_load((ROOT / "configs" / "imagefolder" / "prepare.yaml").read_text())


def shipped_settings(out: Path) -> dict:
    """The shipped prepare.yaml's settings with ``out`` as out_dir and one worker (in this process: fast)."""
    settings = {k: v for k, v in CONFIG.items() if k != "sources"}
    return {**settings, "vae_path": str(ROOT / settings["vae_path"]), "out_dir": str(out), "num_workers": 1}


def flat_folder(root: Path, images: list[np.ndarray], first: int = 0) -> None:
    """A flat imagefolder (Hugging Face's layout without split folders): ``root/metadata.jsonl`` and the images
    beside it, ``{first + i:04d}.png``; appends to an existing metadata.jsonl (files added later)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "a") as f:
        for i, image in enumerate(images, start=first):
            Image.fromarray(image).save(root / f"{i:04d}.png")
            f.write(json.dumps({"file_name": f"{i:04d}.png", "text": f"picture number {i}"}) + "\n")


def shapes_images(n: int) -> list[np.ndarray]:
    world = ShapesWorld()
    return [world.sample("train", i).image for i in range(n)]


def pen_strokes(n: int, size: int = 32) -> list[np.ndarray]:
    """Gray digit-like pen strokes on black, ``[size, size, 3]`` uint8: nothing like the coloured shapes the
    shipped VAE was trained on (it reconstructs them at ~13 dB, shapes at ~33)."""
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        image = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            draw.line([tuple(rng.integers(4, size - 4, 2).tolist()) for _ in range(3)], fill=255,
                      width=int(rng.integers(2, 4)))
        out.append(np.repeat(np.asarray(image)[..., None], 3, axis=-1))
    return out


def run_prepare(source: SourceConfig, out: Path) -> tuple[Manifest, str]:
    """``prepare`` with the shipped settings; returns the manifest and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        manifest = prepare([source], **shipped_settings(out))
    return manifest, printed.getvalue()


def split_keys(out: Path, rel: str) -> set[str]:
    import litdata

    ds = litdata.StreamingDataset(str(out / rel))
    return {ds[i]["key"] for i in range(len(ds))}


@pytest.fixture(scope="module")
def flat_shapes(tmp_path_factory) -> tuple[Path, Manifest, str]:
    """40 shapes images in a flat folder, prepared with the shipped settings: (out_dir, manifest, report)."""
    root = tmp_path_factory.mktemp("flat")
    flat_folder(root / "images", shapes_images(40))
    manifest, printed = run_prepare(SourceConfig(name="flat", kind="imagefolder", path=str(root / "images")),
                                    root / "prepared")
    return root / "prepared", manifest, printed


# ------------------------------------------------------------------------------------------------ validation
def test_flat_folder_gets_a_held_out_split_stated_in_the_report(flat_shapes):
    out, manifest, printed = flat_shapes
    info = Manifest.read(out).sources["flat"]
    assert info.validation == "held_out"
    n_val, n_train = info.splits["val"].samples, info.splits["train"].samples
    # 5 % of 40 is 2: the minimum (8, at most a quarter of the samples) holds out more
    assert n_val == 8 and n_train == 32
    assert f"validation: {n_val} samples held out by key hash" in printed
    val, train = split_keys(out, "flat/val"), split_keys(out, "flat/train")
    assert len(val) == n_val and not val & train and len(val | train) == 40
    assert manifest.sources["flat"].val_fraction == info.val_fraction > CONFIG["val_fraction"]


def test_held_out_split_is_stable_by_key_when_rerun_and_when_files_are_added(tmp_path):
    root = tmp_path / "images"
    tiny = np.zeros((8, 8, 3), np.uint8)
    flat_folder(root, [tiny] * 400)
    source = SourceConfig(name="flat", kind="imagefolder", path=str(root))

    def split() -> tuple[SourceConfig, set[str]]:
        resolved, where = with_validation(source, CONFIG["val_fraction"], CONFIG["min_val_samples"])
        assert where == "held_out"
        keys = {r.key for u in read_source(resolved, "val", Skips()) for r in u.records(Skips())}
        return resolved, keys

    first, held = split()
    assert first.val_fraction == 0.05 and 8 <= len(held) <= 40  # 400 samples: the share alone holds out enough
    assert split() == (first, held)  # a rerun: the same split
    flat_folder(root, [tiny] * 100, first=400)
    _, after = split()
    old = {f"{i:04d}.png" for i in range(400)}
    assert after & old == held  # no existing sample moved, in either direction
    assert after - old  # and the new files have their own held-out share


def test_validation_of_its_own_or_explicitly_none_is_kept(tmp_path):
    flat_folder(tmp_path / "layered" / "train", [np.zeros((8, 8, 3), np.uint8)] * 4)
    flat_folder(tmp_path / "layered" / "validation", [np.zeros((8, 8, 3), np.uint8)])
    layered = SourceConfig(name="a", kind="imagefolder", path=str(tmp_path / "layered"))
    assert with_validation(layered, 0.05, 8) == (SourceConfig(name="a", kind="imagefolder", path=layered.path,
                                                               val_fraction=0.0), "folder validation/")
    off = SourceConfig(name="b", kind="text", path=str(tmp_path / "t.txt"), val_fraction=0.0)
    assert with_validation(off, 0.05, 8) == (off, "none")
    mine = SourceConfig(name="c", kind="text", path=str(tmp_path / "t.txt"), val_fraction=0.2)
    assert with_validation(mine, 0.05, 8) == (mine, "held_out")


def test_manifest_written_before_these_fields_still_loads(flat_shapes, tmp_path):
    out, _, _ = flat_shapes
    raw = json.loads((out / "manifest.json").read_text())
    for info in raw["sources"].values():
        for key in ("validation", "val_fraction", "vae_psnr", "vae_psnr_images"):
            info.pop(key)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    info = Manifest.read(tmp_path).sources["flat"]
    assert info.validation == "" and info.vae_psnr is None and info.splits["val"].samples == 8


# ------------------------------------------------------------------------------------------------ VAE check
def test_vae_psnr_of_images_it_was_trained_on_is_high_and_not_warned_about(flat_shapes):
    out, _, printed = flat_shapes
    info = Manifest.read(out).sources["flat"]
    assert info.vae_psnr_images == 32  # every training image (fewer than vae_psnr_images)
    assert info.vae_psnr > CONFIG["vae_min_psnr"] + 5  # ~33 dB
    assert f"VAE reconstruction: {info.vae_psnr:.1f} dB PSNR on 32 training images" in printed
    assert "warning" not in printed


def test_vae_that_does_not_fit_the_images_is_warned_about_naming_its_config(tmp_path):
    flat_folder(tmp_path / "digits", pen_strokes(24))
    manifest, printed = run_prepare(SourceConfig(name="digits", kind="imagefolder", path=str(tmp_path / "digits")),
                                    tmp_path / "prepared")
    info = manifest.sources["digits"]
    assert info.vae_psnr < CONFIG["vae_min_psnr"] - 5  # ~13 dB
    assert Manifest.read(tmp_path / "prepared").sources["digits"].vae_psnr == info.vae_psnr
    (warning,) = [line for line in printed.splitlines() if "warning" in line]
    assert f"{info.vae_psnr:.1f} dB" in warning and VAE_CONFIG in warning
    assert "python -m lit_transfusion vae fit --config configs/imagefolder/vae.yaml" in warning
