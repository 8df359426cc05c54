"""Does training on prepared files learn like training on the embedded shapes world? Same images, same seed.

    python benchmarks/data_parity.py [--steps 1500] [--every 250] [--size nano] [--seeds [0,1]] [--out runs/parity]

The shapes world's first ``--images`` training renders (and 256 validation renders) are exported as an
image-caption folder, prepared (shapes VAE, no flips: captions say left/right), and trained on with
``configs/imagefolder/fit.yaml``; the same model trains on ``ShapesDataModule`` (``configs/shapes/tiny.yaml``,
no text-only documents: the folder has none). Both log ``val/cond_gap`` (true against shuffled captions on the
same 256 validation images, full scene captions) to CSV every ``--every`` steps. Several seeds of the embedded
path give the seed-to-seed spread the prepared path's curve is judged against.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit(config: str, extra: list[str], out: Path, name: str, seed: int, steps: int, every: int,
        size: str) -> dict[int, float]:
    """One run through the CLI (``size`` model, ``steps`` steps, validated every ``every``); returns
    {step: val/cond_gap}."""
    cmd = [sys.executable, "-m", "lit_transfusion", "fit", "--config", config, *extra,
           f"--seed_everything={seed}", f"--model.init_args.seed={seed}", f"--model.init_args.size={size}",
           f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={every}",
           "--trainer.max_time=null", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
           "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={out}",
           f"--trainer.logger.init_args.name={name}", "--data.init_args.batch_size=16"]
    shutil.rmtree(out / name, ignore_errors=True)  # a stale run would take version_0
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader((out / name / "version_0" / "metrics.csv").open()))
    curve = {int(r["step"]): float(r["val/cond_gap"]) for r in rows if r.get("val/cond_gap")}
    print(f"{name}: {time.perf_counter() - start:.0f} s, cond_gap by step {curve}", flush=True)
    return curve


def run_parity(out: Path, steps: int, every: int, size: str = "nano", images: int = 20000,
               shapes_seeds=(0, 1), prepared_seeds=(0, 1)) -> dict:
    """Export + prepare once, then the runs; returns (and writes to ``out/parity.json``) the cond_gap curves."""
    from datamodules.files.prepare import prepare
    from datamodules.files.sources import SourceConfig
    from datamodules.shapes.to_files import export_shapes

    out.mkdir(parents=True, exist_ok=True)
    files, prepared = out / "files", out / "prepared"
    if not (files / "imagefolder").is_dir():
        export_shapes(files, formats=("imagefolder",), num_train=images, num_val=256)
    prepare([SourceConfig(name="images", kind="imagefolder", path=str(files / "imagefolder"))], str(prepared),
            str(ROOT / "datamodules" / "shapes" / "pretrained_vae"), image_size=32, seq_len=128, patch_size=2,
            bpe_vocab_size=512, flip=False, num_workers=2)
    schedule = dict(steps=steps, every=every, size=size)
    shapes = ["--data.init_args.text_ratio=0", f"--data.init_args.num_train={images}",
              f"--data.init_args.data_dir={out / 'shapes-cache'}",
              "--model.init_args.patcher=linear"]  # the model of configs/imagefolder/fit.yaml: only the data differs
    files_args = [f"--data.init_args.data_dir={prepared}", "--data.init_args.weights=null",
                  "--data.init_args.num_workers=0"]
    results = {"steps": steps, "size": size, "images": images, "shapes": {}, "prepared": {}}
    for seed in sorted(set(shapes_seeds) | set(prepared_seeds)):
        if seed in shapes_seeds:
            results["shapes"][seed] = fit("configs/shapes/tiny.yaml", shapes, out, f"shapes-s{seed}", seed, **schedule)
        if seed in prepared_seeds:
            results["prepared"][seed] = fit("configs/imagefolder/fit.yaml", files_args, out, f"prepared-s{seed}",
                                            seed, **schedule)
        (out / "parity.json").write_text(json.dumps(results, indent=1))
    return results


def main(
    steps: int = 1500,
    every: int = 250,
    size: str = "nano",
    images: int = 20000,
    seeds: list[int] = [0, 1],  # noqa: B006 (jsonargparse: a list option's default)
    out: Path = ROOT / "runs" / "parity",
) -> None:
    """Does training on prepared files learn like training on the embedded shapes world? Same images, same seed.

    Args:
        steps: training steps of each run
        every: validate (and log val/cond_gap) every this many steps
        size: the model size of every run
        images: shapes training renders to export and prepare (plus 256 validation renders)
        seeds: the seeds to run, each on both paths, e.g. [0,1]
        out: the directory for the export, the prepared data, the runs' CSV logs and parity.json
    """
    sys.path.insert(0, str(ROOT))
    results = run_parity(Path(out).resolve(), steps, every, size, images, seeds, seeds)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
