"""Your-own-data path, measured: prepare throughput and streaming overhead per training step.

    python benchmarks/prepare_data.py [--images 2000] [--batches 100] [--workers [1,2]]

1. Exports the shapes world as an image-caption folder (``datamodules/shapes/to_files.py``).
2. Prepares it with the shipped shapes VAE (decode, check, encode image + flip, tokenize, litdata chunks) with
   each number of worker processes: images per second, end to end.
3. Times the training loader: ms to produce one packed batch (16 rows x 128 positions) from the prepared,
   streamed data (``PreparedDataModule``) against the in-memory shapes loader (``ShapesDataModule``), same run,
   same batch geometry, no worker processes, so the difference is the streaming cost per step.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
VAE = ROOT / "datamodules" / "shapes" / "pretrained_vae"


def cpu_class() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags \
        else platform.machine()
    return f"{os.cpu_count()} cores, {kind}"


def endless(loader):
    """Batches of ``loader``, epoch after epoch (a small prepared set ends its epoch within the measurement)."""
    while True:
        yield from loader


def time_loader(loader, batches: int) -> float:
    """Milliseconds per batch over ``batches`` batches (after 5 warm-up batches)."""
    it = endless(loader)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches * 1000


def main(
    images: int = 2000,
    batches: int = 100,
    workers: list[int] = [1, 2],  # noqa: B006 (jsonargparse: a list option's default)
) -> None:
    """Your-own-data path, measured: prepare throughput and streaming overhead per training step.

    Args:
        images: shapes training images to export and prepare (plus 64 validation images)
        batches: training batches timed per loader (after 5 warm-up batches)
        workers: the numbers of prepare worker processes to time, e.g. [1,2,4]; the first one's output is streamed
    """
    from datamodules.files.prepare import prepare
    from datamodules.files.sources import SourceConfig
    from datamodules.files.streaming import PreparedDataModule
    from datamodules.shapes import ShapesDataModule
    from datamodules.shapes.to_files import export_shapes

    print(f"machine: {cpu_class()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        export_shapes(tmp / "files", formats=("imagefolder",), num_train=images, num_val=64)
        print(f"export of {images} images: {time.perf_counter() - start:.1f} s")
        source = SourceConfig(name="images", kind="imagefolder", path=str(tmp / "files" / "imagefolder"))
        for n in workers:
            out = tmp / f"prepared-{n}"
            start = time.perf_counter()
            prepare([source], str(out), str(VAE), image_size=32, seq_len=128, patch_size=2, bpe_vocab_size=512,
                    flip=True, num_workers=n)
            seconds = time.perf_counter() - start
            print(f"prepare, {n} worker(s): {images / seconds:.0f} images/s "
                  f"({seconds:.1f} s for {images} images + 64 validation, flips encoded too)")
        prepared = tmp / f"prepared-{workers[0]}"

        streamed = PreparedDataModule(data_dir=str(prepared), seq_len=128, batch_size=16, patch_size=2)
        streamed.setup("fit")
        shapes = ShapesDataModule(data_dir=str(tmp / "shapes-cache"), num_train=images, num_val=64,
                                  seq_len=128, batch_size=16)
        shapes.prepare_data()
        shapes.setup("fit")
        ms_shapes = time_loader(shapes.train_dataloader(), batches)
        ms_stream = time_loader(streamed.train_dataloader(), batches)
        print(f"loader, in-memory shapes: {ms_shapes:.1f} ms/batch; streamed prepared data: {ms_stream:.1f} ms/batch "
              f"(overhead {ms_stream - ms_shapes:+.1f} ms per step, x{ms_stream / ms_shapes:.2f})")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
