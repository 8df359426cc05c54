"""The shapes world exported to the four input formats (layout, bit-exact images, captions, determinism, command
line), and the bad-data fixtures of ``tests/bad_data.py`` (files written, counts that add up)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.shapes.to_files import FORMATS, export_shapes, main
from datamodules.shapes.world import ShapesWorld
from tests import bad_data
from tests.conftest import ROOT

N_TRAIN, N_VAL = 20, 8
SPLITS = {"train": "train", "validation": "val"}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("files")
    written = export_shapes(out, num_train=N_TRAIN, num_val=N_VAL, shard_size=8)
    assert written == {fmt: out / fmt for fmt in FORMATS}
    return out


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=0, image_size=32)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _states_every_object(text: str, scene) -> bool:
    """A full scene caption: one "a <size> <color> <shape> <location>" clause per object."""
    clauses = text.split(" and ")
    return len(clauses) == len(scene.objects) and all(
        any(f"{size} {o.color} {o.shape}" in c for c in clauses for size in ("small", "medium", "large"))
        for o in scene.objects)


def test_imagefolder_layout_images_and_captions(export, world):
    for name, split in SPLITS.items():
        rows = _read_jsonl(export / "imagefolder" / name / "metadata.jsonl")
        assert len(rows) == (N_TRAIN if name == "train" else N_VAL)
        for i, row in enumerate(rows):
            assert row["file_name"] == f"images/{i:06d}.png"
            sample = world.sample(split, i)
            image = _decode((export / "imagefolder" / name / row["file_name"]).read_bytes())
            np.testing.assert_array_equal(image, sample.image)  # lossless: the render bit for bit
            captions = row["text"]
            assert isinstance(captions, list) and len(captions) == 4
            assert all(isinstance(c, str) and c.strip() for c in captions)
            if split == "val":  # the first validation caption states the whole scene (cond-gap pairs)
                assert _states_every_object(captions[0], sample.scene), captions[0]


def test_webdataset_shards_hold_the_imagefolder_samples(export):
    for name, n in (("train", N_TRAIN), ("validation", N_VAL)):
        shards = sorted((export / "webdataset" / name).glob("*.tar"))
        assert [s.name for s in shards] == [f"{k:06d}.tar" for k in range(-(-n // 8))]  # 8 samples per shard
        members = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        rows = _read_jsonl(export / "imagefolder" / name / "metadata.jsonl")
        assert [m[0] for m in members] == [f"{i:06d}.{ext}" for i in range(n) for ext in ("png", "json")]
        for i, row in enumerate(rows):
            png, meta = members[2 * i][1], members[2 * i + 1][1]
            assert png == (export / "imagefolder" / name / row["file_name"]).read_bytes()
            assert json.loads(meta) == {"text": row["text"]}


def test_interleaved_documents(export, world):
    folder_images = {(export / "imagefolder" / n / r["file_name"]).read_bytes()
                     for n in SPLITS for r in _read_jsonl(export / "imagefolder" / n / "metadata.jsonl")}
    for name, split in SPLITS.items():
        docs = _read_jsonl(export / "interleaved" / f"{name}.jsonl")
        assert len(docs) == (N_TRAIN if name == "train" else N_VAL) // 2
        for doc in docs:
            texts, images = doc["texts"], doc["images"]
            assert len(texts) == len(images)
            assert all((t is None) != (im is None) for t, im in zip(texts, images, strict=True))
            assert all(t.strip() for t in texts if t is not None)
            paths = [im for im in images if im is not None]
            assert 2 <= len(paths) <= 3
            for p in paths:  # relative to the .jsonl's folder; the world's samples after imagefolder's
                data = (export / "interleaved" / p).read_bytes()
                index = int(Path(p).stem)
                assert index >= (N_TRAIN if name == "train" else N_VAL)
                np.testing.assert_array_equal(_decode(data), world.sample(split, index).image)
                assert data not in folder_images


def test_text_documents_are_the_world_descriptions(export, world):
    for name, split in SPLITS.items():
        lines = (export / "text" / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        assert lines == [world.text(split, i) for i in range(N_TRAIN if name == "train" else N_VAL)]


def test_export_is_deterministic_and_seeded(export, tmp_path):
    again = export_shapes(tmp_path / "again", num_train=N_TRAIN, num_val=N_VAL, shard_size=8)
    files = sorted(p.relative_to(export) for p in export.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for rel in files:
        assert (export / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = export_shapes(tmp_path / "other", formats=("text",), num_train=N_TRAIN, num_val=N_VAL, seed=1)
    assert set(other) == {"text"} and not (tmp_path / "other" / "imagefolder").exists()
    assert (other["text"] / "train.txt").read_text() != (again["text"] / "train.txt").read_text()


def test_caption_mix_follows_the_ratios(tmp_path, world):
    def captions(ratio: float, split: str = "train") -> list[list[str]]:
        out = export_shapes(tmp_path / str(ratio), formats=("imagefolder",), num_train=30, num_val=6,
                            captions_per_image=3, scene_caption_ratio=ratio, color_detail=0.0)
        return [r["text"] for r in _read_jsonl(out["imagefolder"] / split / "metadata.jsonl")]

    scenes = [world.sample("train", i).scene for i in range(30)]
    full = captions(1.0)
    assert all(_states_every_object(c, s) for caps, s in zip(full, scenes, strict=True) for c in caps)
    prompt_only = captions(0.0)  # GenEval-style prompt captions: no sizes, and with color_detail=0 no added colors
    sizes = ("small ", "medium ", "large ")
    assert not any(w in c for caps in prompt_only for c in caps for w in sizes)
    val = captions(0.0, "validation")  # the first validation caption is the full one whatever the ratio
    for i, caps in enumerate(val):
        assert _states_every_object(caps[0], world.sample("val", i).scene), caps[0]
        assert not any(w in c for c in caps[1:] for w in sizes)
    one = export_shapes(tmp_path / "one", formats=("imagefolder", "webdataset"), num_train=3, num_val=1,
                        captions_per_image=1)
    assert all(isinstance(r["text"], str) for r in _read_jsonl(one["imagefolder"] / "train" / "metadata.jsonl"))
    with tarfile.open(one["webdataset"] / "train" / "000000.tar") as tar:
        assert tar.getnames() == ["000000.png", "000000.txt", "000001.png", "000001.txt", "000002.png", "000002.txt"]


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="formats.*'pictures'"):
        export_shapes(tmp_path, formats=("pictures",))
    with pytest.raises(ValueError, match="num_train"):
        export_shapes(tmp_path, num_train=0)


def test_command_line(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "datamodules.shapes.to_files", str(tmp_path / "out"), "--num_train",
                           "4", "--num_val", "2", "--formats", "text,imagefolder"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imagefolder" in proc.stdout and "train 4, validation 2" in proc.stdout and "done in" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["imagefolder", "text"]
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "bad"), "--formats", "jpeg"])
    assert info.value.code == 2 and "formats" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- bad-data fixtures

def _skips(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k not in ("valid", "truncated"))


def test_bad_imagefolder_counts_add_up(tmp_path):
    counts = bad_data.write_bad_imagefolder(tmp_path)
    lines = sum(len((tmp_path / s / "metadata.jsonl").read_bytes().splitlines()) for s in ("train", "validation"))
    assert counts["valid"] + _skips(counts) == lines
    assert counts["valid"] == 12 + len(bad_data.MODES) + 1 + 4  # plain, modes, long caption, validation
    assert counts["truncated"] == 1 and counts["corrupt_image"] == 3 and counts["empty_caption"] == 4
    for line in (tmp_path / "train" / "metadata.jsonl").read_bytes().splitlines():
        try:
            name = json.loads(line).get("file_name")
        except ValueError:
            continue  # the malformed and non-UTF-8 lines
        if name and "does_not_exist" not in name:
            assert (tmp_path / "train" / name).is_file(), name
    assert (tmp_path / "train" / "images" / "empty.png").stat().st_size == 0

    all_bad = bad_data.write_all_bad_imagefolder(tmp_path / "all_bad")
    assert all_bad["valid"] == 0
    assert _skips(all_bad) == len((tmp_path / "all_bad" / "train" / "metadata.jsonl").read_bytes().splitlines())


def _tar_samples(path: Path) -> int:
    """Runs of consecutive members sharing a key, up to where the shard can no longer be read."""
    keys = []
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                keys.append(m.name.split(".")[0])
    except tarfile.ReadError:
        pass
    return sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)


def test_bad_shards_counts_add_up(tmp_path):
    counts = bad_data.write_bad_shards(tmp_path)
    shards = sorted(tmp_path.glob("*.tar"))
    assert [s.name for s in shards] == ["000000.tar", "000001.tar", "000002.tar"]
    assert counts["valid"] + _skips(counts) == sum(_tar_samples(s) for s in shards)
    assert counts["unreadable_tar_member"] == 1 and counts["duplicate_file_name"] == 1
    with pytest.raises(tarfile.ReadError), tarfile.open(shards[2], "r|") as tar:
        for m in tar:
            tar.extractfile(m).read()


def test_bad_interleaved_and_text_counts_add_up(tmp_path):
    counts = bad_data.write_bad_interleaved(tmp_path / "docs")
    lines = sum(len((tmp_path / "docs" / f).read_bytes().splitlines()) for f in ("train.jsonl", "validation.jsonl"))
    assert counts["valid"] + _skips(counts) == lines
    assert counts["malformed_json"] == 3 and counts["missing_file"] == 1

    counts = bad_data.write_bad_text(tmp_path / "corpus")
    documents = sum(1 for f in ("train.txt", "validation.txt", "more.jsonl")
                    for line in (tmp_path / "corpus" / f).read_bytes().splitlines() if line.strip())
    assert counts["valid"] + _skips(counts) == documents
    assert counts["non_utf8_caption"] == 1


def test_valid_modes_are_the_modes_they_claim(tmp_path):
    """Each valid-mode image really is in the unusual mode it stands for (so the readers are tested on it)."""
    want = {"grayscale": "L", "palette": "P", "cmyk": "CMYK", "rgba": "RGBA", "sixteen_bit": "I;16",
            "exif_rotated": "RGB", "non_square": "RGB"}
    for name, _, make in bad_data.MODES:
        with Image.open(io.BytesIO(make(0, 32))) as im:
            assert im.mode == want[name], name
            if name == "exif_rotated":
                assert im.getexif()[0x0112] == 6 and im.size == (48, 32)
            if name == "non_square":
                assert im.size[0] != im.size[1]
            if name == "sixteen_bit":
                assert np.asarray(im).max() > 255
