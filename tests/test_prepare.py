"""``prepare``: every sample written or counted, long documents split without cutting an image, reruns skip
finished work, an all-bad source fails naming itself, and export -> prepare -> fit -> sample runs through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import litdata
import numpy as np
import pytest
import yaml

from datamodules.files.prepare import PrepareError, prepare
from datamodules.files.prepare.encode import split_document
from datamodules.files.schema import IMAGE, INTERLEAVED, PAIR, TEXT, Manifest, Sample, max_positions
from datamodules.files.sources import SourceConfig
from tests.conftest import ROOT, run_cli

VAE = str(ROOT / "datamodules" / "shapes" / "pretrained_vae")  # 32 px -> 8x8x4 latents: 16 patches at p=2
SIZES = dict(image_size=32, seq_len=128, patch_size=2, bpe_vocab_size=300)


def test_long_document_split_between_segments_never_inside_an_image():
    img = "I"  # stands for a decoded image
    segments = [list(range(30)), IMAGE, list(range(100, 150)), IMAGE, IMAGE, list(range(200, 290))]
    pieces = split_document(segments, [img, img, img], room=60, image_positions=18)
    flat_text = []
    for segs, imgs in pieces:
        n = sum(18 if isinstance(s, int) else len(s) for s in segs)
        assert 0 < n <= 60
        assert len(imgs) == sum(isinstance(s, int) for s in segs)
        flat_text += [t for s in segs if not isinstance(s, int) for t in s]
    # every token kept, in order; every image kept
    assert flat_text == list(range(30)) + list(range(100, 150)) + list(range(200, 290))
    assert sum(len(imgs) for _, imgs in pieces) == 3
    # an image that cannot fit even alone: the document cannot be split
    assert split_document([[1, 2], IMAGE], [img], room=10, image_positions=18) is None


def _read(root: Path, rel: str) -> list[Sample]:
    ds = litdata.StreamingDataset(str(root / rel))
    return [Sample.from_item(ds[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory) -> Path:
    from datamodules.shapes.to_files import export_shapes

    out = tmp_path_factory.mktemp("files")
    export_shapes(out, num_train=24, num_val=8, shard_size=10)
    return out


def _sources(files: Path) -> list[SourceConfig]:
    return [
        SourceConfig(name="folder", kind="imagefolder", path=str(files / "imagefolder")),
        SourceConfig(name="shards", kind="webdataset",
                     path=str(files / "webdataset" / "train" / "{000000..000002}.tar"),
                     val_path=str(files / "webdataset" / "validation" / "000000.tar")),
        SourceConfig(name="docs", kind="interleaved", path=str(files / "interleaved" / "train.jsonl"),
                     val_path=str(files / "interleaved" / "validation.jsonl")),
        SourceConfig(name="corpus", kind="text", path=str(files / "text" / "train.txt"),
                     val_path=str(files / "text" / "validation.txt")),
    ]


def test_prepare_four_formats_counts_layout_and_rerun(shapes_files, tmp_path, capsys):
    out = tmp_path / "prepared"
    manifest = prepare(_sources(shapes_files), str(out), VAE, flip=True, num_workers=1, **SIZES)
    assert Manifest.read(out).sources.keys() == {"folder", "shards", "docs", "corpus"}
    m = manifest.sources
    assert m["folder"].splits["train"].samples == 24 and m["folder"].splits["val"].samples == 8
    assert m["shards"].splits["train"].samples == 24 and m["shards"].splits["val"].samples == 8
    assert all(not info.skipped for info in m.values())  # the export is clean
    # the shipped VAE was trained on shapes: it reconstructs each format's images well (~33 dB); text has none
    assert all(m[name].vae_psnr > 28 and m[name].vae_psnr_images > 0 for name in ("folder", "shards", "docs"))
    assert m["corpus"].vae_psnr is None
    n_lines = len((shapes_files / "text" / "train.txt").read_text().splitlines())
    assert m["corpus"].splits["train"].samples >= n_lines  # long lines become several chunks, none is lost

    folder = _read(out, "folder/train")
    assert {s.kind for s in folder} == {PAIR}
    meta = [json.loads(line) for line in (shapes_files / "imagefolder" / "train" / "metadata.jsonl").open()]
    assert sorted(s.key for s in folder) == sorted(r["file_name"] for r in meta)
    for s in folder:
        assert s.mean.shape == (1, 2, 4, 8, 8) and s.logvar.shape == (1, 2, 4, 8, 8)  # image + its flip
        assert len(s.segments) == len(meta[0]["text"])  # every caption of the image kept
        assert max_positions(s, 16) <= 128
    # the flip really is the mirrored image's latent, not a copy
    assert not np.allclose(folder[0].mean[0, 0], folder[0].mean[0, 1])
    docs = _read(out, "docs/train")
    lines = [json.loads(line) for line in (shapes_files / "interleaved" / "train.jsonl").open()]
    assert {s.kind for s in docs} == {INTERLEAVED}
    # long documents are split into several samples, and no image is lost on the way
    assert sum(s.num_images for s in docs) == sum(x is not None for d in lines for x in d["images"])
    assert len(docs) >= len(lines) and all(max_positions(s, 16) <= 128 for s in docs)
    assert {s.kind for s in _read(out, "corpus/train")} == {TEXT}
    val = _read(out, "folder/val")
    assert all(s.pixels is not None and s.pixels.shape == (1, 32, 32, 3) for s in val)

    capsys.readouterr()
    stamp = {p: p.stat().st_mtime_ns for p in [*out.rglob("*.bin"), *out.rglob("vae_check.json")]}
    prepare(_sources(shapes_files), str(out), VAE, flip=True, num_workers=1, **SIZES)
    rerun = capsys.readouterr().out
    assert rerun.count("already prepared") == 8  # 4 sources x 2 splits
    assert rerun.count("VAE reconstruction") == 3  # kept from the first run (vae_check.json), not computed again
    assert len(stamp) > 3 and stamp == {p: p.stat().st_mtime_ns for p in [*out.rglob("*.bin"),
                                                                         *out.rglob("vae_check.json")]}
    # a changed setting rewrites: no flips stored now
    prepare(_sources(shapes_files)[:1], str(out), VAE, flip=False, num_workers=1, **SIZES)
    assert _read(out, "folder/train")[0].mean.shape == (1, 1, 4, 8, 8)


def test_all_bad_source_fails_naming_it(tmp_path):
    from tests.bad_data import write_all_bad_imagefolder

    write_all_bad_imagefolder(tmp_path / "bad")
    with pytest.raises(PrepareError, match="'broken'.*no valid training sample"):
        prepare([SourceConfig(name="broken", kind="imagefolder", path=str(tmp_path / "bad"))], str(tmp_path / "out"),
                VAE, num_workers=1, **SIZES)


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_bad_data_counted_exactly_and_training_never_sees_it(tmp_path):
    """Every bad case mixed into valid sets of all four kinds: each skipped and counted by reason (exact), the
    overlong caption truncated and counted, and a 20-step fit over the result completes."""
    from tests import bad_data

    expected = {
        "folder": bad_data.write_bad_imagefolder(tmp_path / "folder"),
        "shards": bad_data.write_bad_shards(tmp_path / "shards"),
        "docs": bad_data.write_bad_interleaved(tmp_path / "docs"),
        "corpus": bad_data.write_bad_text(tmp_path / "corpus"),
    }
    shards = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    sources = [
        SourceConfig(name="folder", kind="imagefolder", path=str(tmp_path / "folder")),
        SourceConfig(name="shards", kind="webdataset", path=str(tmp_path / "shards" / ("{" + ",".join(shards) + "}"))),
        SourceConfig(name="docs", kind="interleaved", path=str(tmp_path / "docs")),
        SourceConfig(name="corpus", kind="text", path=str(tmp_path / "corpus")),
    ]
    out = tmp_path / "prepared"
    manifest = prepare(sources, str(out), VAE, flip=False, num_workers=1, **SIZES)
    for name, want in expected.items():
        info = manifest.sources[name]
        want = dict(want)
        valid, truncated = want.pop("valid"), want.pop("truncated", 0)
        assert {k: v for k, v in info.skipped.items() if v} == {k: v for k, v in want.items() if v}, name
        assert info.notes.get("caption_truncated", 0) == truncated, name
        assert sum(s.samples for s in info.splits.values()) >= valid, name

    config = _write_yaml(tmp_path / "fit.yaml", {"data": {"init_args": {"data_dir": str(out), "weights": None}}})
    proc = run_cli("fit", "--config", "configs/imagefolder/fit.yaml", "--config", str(config), *_tiny_fit(tmp_path, 20))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def _tiny_fit(tmp: Path, steps: int) -> list[str]:
    return [
        "--model.init_args.size=nano",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.val_samples=8",
        "--data.init_args.cond_gap_pairs=8",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        "--trainer.callbacks.init_args.fid_images=8",
        "--trainer.callbacks.init_args.grid_images=1",
    ]


@pytest.mark.slow
def test_export_prepare_fit_sample_through_the_cli(tmp_path):
    """docs/your_data.md's path, command by command, on data laid out exactly as a user's would be."""
    import subprocess
    import sys

    files = tmp_path / "files"
    proc = subprocess.run([sys.executable, "-m", "datamodules.shapes.to_files", str(files), "--num_train", "40",
                           "--num_val", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = yaml.safe_load((ROOT / "configs" / "imagefolder" / "prepare.yaml").read_text())
    for src in config["sources"]:
        for key in ("path", "val_path"):
            if src.get(key):
                src[key] = src[key].replace("data/shapes-files", str(files))
    if any("{000000..000003}" in s["path"] for s in config["sources"]):
        for s in config["sources"]:
            s["path"] = s["path"].replace("{000000..000003}", "000000")
    config.update(out_dir=str(tmp_path / "prepared"), num_workers=1)
    proc = run_cli("prepare", "--config", str(_write_yaml(tmp_path / "prepare.yaml", config)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" not in proc.stdout.split("prepared in")[-1]  # the export has no bad sample

    fit = _write_yaml(tmp_path / "fit.yaml", {"data": {"init_args": {"data_dir": str(tmp_path / "prepared")}}})
    proc = run_cli("fit", "--config", "configs/imagefolder/fit.yaml", "--config", str(fit), *_tiny_fit(tmp_path, 6))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "imagefolder" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())["latest"]
    for key in ("val/loss", "val/cond_gap", "val/ppl_text", "val/ppl_caption", "val/fid"):
        assert np.isfinite(metrics[key]), key
    assert list((run / "samples").glob("*.png"))

    proc = run_cli("sample", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--prompt", "a red circle",
                   "--num_images", "2", "--steps", "5", "--out", str(tmp_path / "samples"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 2
