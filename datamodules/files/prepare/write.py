"""Writing one (source, split) as litdata chunks: the work units through the :class:`Encoder` (in this process, or
``litdata.optimize`` workers), the workers' tallies of skips and counts gathered, and a marker that lets a rerun
with the same settings skip the split."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from datamodules.files.prepare.encode import Encoder
from datamodules.files.prepare.errors import PrepareError
from datamodules.files.prepare.settings import Settings
from datamodules.files.records import Skips
from datamodules.files.schema import SplitInfo
from datamodules.files.sources import SourceConfig, read_source


def write_split(src: SourceConfig, split: str, out: Path, settings: Settings, digest: str, num_workers: int,
                chunk_bytes: str):
    """Write one (source, split) with litdata.optimize unless already done with these settings.
    Returns ``(SplitInfo, skips, notes)``, or None when the source has no data for ``split``."""
    import litdata

    rel = f"{src.name}/{split}"
    target = out / rel
    marker = out / src.name / f"{split}.done.json"
    source_key = json.dumps(asdict(src), sort_keys=True)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("digest") == digest and done.get("source") == source_key:
            print(f"{rel}: already prepared ({done['info']['samples']} samples), skipped")
            return SplitInfo(**done["info"]), Skips.from_dict(done["skips"]), Skips.from_dict(done["notes"])
    scan_skips = Skips()
    try:
        units = read_source(src, split, scan_skips)
    except FileNotFoundError as e:
        raise PrepareError(f"sources[{src.name!r}].path: {e}") from None
    if not units:
        return None if not scan_skips else (SplitInfo(dir=rel, samples=0, images=0, tokens=0), scan_skips, Skips())
    shutil.rmtree(target, ignore_errors=True)
    marker.unlink(missing_ok=True)
    tally = out / src.name / f".{split}.tally"
    shutil.rmtree(tally, ignore_errors=True)
    tally.mkdir(parents=True)
    print(f"{rel}: {len(units)} work units, {num_workers} worker(s)")
    workers = max(1, min(num_workers, len(units)))
    try:
        if workers == 1:  # in this process: litdata's writer without a worker's start-up (torch import, VAE load)
            _write_here(Encoder(dataclasses.replace(settings, threads=0), split, str(tally)), units, target,
                        chunk_bytes)
        else:
            litdata.optimize(fn=Encoder(settings, split, str(tally)), inputs=units, output_dir=str(target),
                             num_workers=workers, chunk_bytes=chunk_bytes, mode="overwrite",
                             # spawn, never fork: a fork of a process whose torch/OpenMP threads have run can hang
                             start_method="spawn", verbose=True)
    except Exception as e:
        if _tally_samples(tally) == 0:  # litdata refuses to finish a dataset with no item
            pass
        else:
            raise RuntimeError(f"preparing {rel} failed: {e}") from e
    skips, notes = scan_skips, Skips()
    info = SplitInfo(dir=rel, samples=0, images=0, tokens=0)
    for line in _tally_lines(tally):
        skips.merge(Skips.from_dict(line["skips"]))
        notes.merge(Skips.from_dict(line["notes"]))
        info.samples += line["samples"]
        info.images += line["images"]
        info.tokens += line["tokens"]
        info.tokens_per_use += line["tokens_per_use"]
    shutil.rmtree(tally, ignore_errors=True)
    if info.samples:
        marker.write_text(json.dumps({"digest": digest, "source": source_key, "info": asdict(info),
                                      "skips": skips.to_dict(), "notes": notes.to_dict()}, indent=1))
    return info, skips, notes


def _write_here(encoder: Encoder, units: list, target: Path, chunk_bytes: str) -> None:
    """What ``litdata.optimize`` does with one worker, in this process: the same ``BinaryWriter`` and files."""
    from litdata.streaming.writer import BinaryWriter
    from tqdm.auto import tqdm

    writer = BinaryWriter(str(target), chunk_bytes=chunk_bytes)
    index = 0
    for unit in tqdm(units, desc=str(target), unit="unit"):
        for item in encoder(unit):
            writer[index] = item
            index += 1
    if index == 0:  # every sample skipped: no dataset (merge would wait for an index that never comes)
        return
    writer.done()
    writer.merge()


def _tally_lines(tally: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(tally.glob("*.jsonl")) for line in f.read_text().splitlines() if line]


def _tally_samples(tally: Path) -> int:
    return sum(line["samples"] for line in _tally_lines(tally))
