"""Export the shapes world as files in the four "your own data" formats, so the file pipeline can be tried (and
compared with the in-memory ``ShapesDataModule``) on data whose ground truth is known.

Layout under ``out`` (``<split>`` is ``train`` or ``validation``):

    imagefolder/<split>/metadata.jsonl      {"file_name": "images/000017.png", "text": ["caption", ...]}
    imagefolder/<split>/images/*.png
    webdataset/<split>/000000.tar ...       members 000017.png + 000017.json ({"text": [...]}; .txt if 1 caption)
    interleaved/<split>.jsonl               {"texts": [str | null, ...], "images": [str | null, ...]}
    interleaved/images/<split>/*.png
    text/<split>.txt                        one scene description per line

Images are the world's renders, PNG (lossless: a file decodes to the render bit for bit). imagefolder and
webdataset hold the same samples ``0..n-1`` of the world's split; interleaved documents use the samples after
those, so a mixture of sources is not the same images twice. Every caption is drawn as
``ShapesDataModule.caption_ids`` draws one; the validation split's first caption is always the full scene caption
(the one ``ShapesDataModule`` uses for its cond-gap pairs). Everything is a pure function of ``seed``.

Command line::

    python -m datamodules.shapes.to_files data/shapes-files --num_train 2000 --num_val 256
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.shapes.transfusion import with_scene_colors
from datamodules.shapes.world import Sample, ShapesWorld, caption, scene_caption

FORMATS: tuple[str, ...] = ("imagefolder", "webdataset", "interleaved", "text")
SPLITS: dict[str, str] = {"train": "train", "validation": "val"}  # exported split -> world split
_SPLIT_CODE = {"train": 0, "val": 1}
_CAPTION_STREAM, _DOCUMENT_STREAM = 5, 6  # RNG streams beside the world's own (0: samples, 1: text documents)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG file bytes (deterministic: no timestamps or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def draw_captions(sample: Sample, rng: np.random.Generator, count: int, scene_caption_ratio: float,
                  color_detail: float, full_first: bool = False) -> list[str]:
    """``count`` phrasings of ``sample``, each drawn as ``ShapesDataModule.caption_ids`` draws one: the scene
    caption with probability ``scene_caption_ratio``, else the prompt caption with its unstated colors filled in
    with probability ``color_detail``. ``full_first``: the first is always the scene caption."""
    out = []
    for k in range(count):
        if (full_first and k == 0) or rng.random() < scene_caption_ratio:
            out.append(scene_caption(sample.scene, rng))
            continue
        prompt = sample.prompt
        if rng.random() < color_detail:
            prompt = with_scene_colors(prompt, sample.scene)
        out.append(caption(prompt, rng))
    return out


class _Exporter:
    """Renders, captions and PNG-encodes each world sample once, for every format that uses it."""

    def __init__(self, world: ShapesWorld, captions_per_image: int, scene_caption_ratio: float, color_detail: float):
        self.world = world
        self.captions_per_image = captions_per_image
        self.scene_caption_ratio, self.color_detail = scene_caption_ratio, color_detail
        self._cache: dict[tuple[str, int], tuple[bytes, list[str]]] = {}

    def item(self, split: str, index: int, count: int | None = None) -> tuple[bytes, list[str]]:
        """PNG bytes and captions of sample ``index`` of world split ``split`` (``count`` captions, default
        ``captions_per_image``; a shorter list is the prefix of the longer one)."""
        key = (split, index)
        if key not in self._cache:
            sample = self.world.sample(split, index)
            rng = np.random.default_rng([self.world.seed, _SPLIT_CODE[split], index, _CAPTION_STREAM])
            captions = draw_captions(sample, rng, self.captions_per_image, self.scene_caption_ratio,
                                     self.color_detail, full_first=split == "val")
            self._cache[key] = (png_bytes(sample.image), captions)
        data, captions = self._cache[key]
        return data, captions[: count or self.captions_per_image]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _text_field(captions: list[str]) -> str | list[str]:
    return captions[0] if len(captions) == 1 else captions


def export_imagefolder(ex: _Exporter, root: Path, sizes: dict[str, int]) -> dict[str, int]:
    """``root/<split>/metadata.jsonl`` + ``root/<split>/images/NNNNNN.png``; returns samples per split."""
    counts = {}
    for name, split in SPLITS.items():
        (root / name / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(sizes[name]):
            data, captions = ex.item(split, i)
            file_name = f"images/{i:06d}.png"
            (root / name / file_name).write_bytes(data)
            rows.append({"file_name": file_name, "text": _text_field(captions)})
        counts[name] = _write_jsonl(root / name / "metadata.jsonl", rows)
    return counts


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: the same seed gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def export_webdataset(ex: _Exporter, root: Path, sizes: dict[str, int], shard_size: int) -> dict[str, int]:
    """``root/<split>/NNNNNN.tar`` shards of ``shard_size`` samples; each sample's members are consecutive:
    ``<key>.png`` then ``<key>.json`` (``{"text": [...]}``), or ``<key>.txt`` with a single caption."""
    counts = {}
    for name, split in SPLITS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        n = sizes[name]
        for shard, start in enumerate(range(0, n, shard_size)):
            with tarfile.open(root / name / f"{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(start, min(start + shard_size, n)):
                    data, captions = ex.item(split, i)
                    key = f"{i:06d}"
                    _add_member(tar, f"{key}.png", data)
                    if len(captions) == 1:
                        _add_member(tar, f"{key}.txt", captions[0].encode("utf-8"))
                    else:
                        _add_member(tar, f"{key}.json", json.dumps({"text": captions}).encode("utf-8"))
        counts[name] = n
    return counts


def interleaved_document(images: Sequence[str], captions: Sequence[str], rng: np.random.Generator) -> dict:
    """An OBELICS-style document over ``images`` (paths) with one caption each: per image either
    ``"picture k: <caption>."`` before it, or ``"picture k."`` before and ``"it shows <caption>."`` after it;
    adjacent texts are joined. Returns ``{"texts": [...], "images": [...]}`` (parallel, one non-null each)."""
    segments: list[tuple[str, str]] = []  # ("text" | "image", value)

    def text(s: str) -> None:
        if segments and segments[-1][0] == "text":
            segments[-1] = ("text", segments[-1][1] + " " + s)
        else:
            segments.append(("text", s))

    for k, (path, cap) in enumerate(zip(images, captions, strict=True)):
        if k > 0:
            text("then another one.")
        if rng.random() < 0.5:
            text(f"picture {k + 1}: {cap}.")
            segments.append(("image", path))
        else:
            text(f"picture {k + 1}.")
            segments.append(("image", path))
            text(f"it shows {cap}.")
    return {"texts": [v if kind == "text" else None for kind, v in segments],
            "images": [v if kind == "image" else None for kind, v in segments]}


def export_interleaved(ex: _Exporter, root: Path, sizes: dict[str, int], offset: dict[str, int]) -> dict[str, int]:
    """``root/<split>.jsonl`` with ``max(1, n // 2)`` documents of 2-3 images each (n: the split's size), images
    ``root/images/<split>/NNNNNN.png`` from world samples ``offset[split]`` on; returns documents per split."""
    counts = {}
    for name, split in SPLITS.items():
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        index, rows = offset[name], []
        for doc in range(max(1, sizes[name] // 2)):
            rng = np.random.default_rng([ex.world.seed, _SPLIT_CODE[split], doc, _DOCUMENT_STREAM])
            paths, captions = [], []
            for _ in range(int(rng.integers(2, 4))):
                data, caps = ex.item(split, index, count=1)
                path = f"images/{name}/{index:06d}.png"
                (root / path).write_bytes(data)
                paths.append(path)
                captions.append(caps[0])
                index += 1
            rows.append(interleaved_document(paths, captions, rng))
        counts[name] = _write_jsonl(root / f"{name}.jsonl", rows)
    return counts


def export_text(world: ShapesWorld, root: Path, sizes: dict[str, int]) -> dict[str, int]:
    """``root/<split>.txt``: ``n`` scene descriptions (``world.text``), one per line."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, split in SPLITS.items():
        lines = [world.text(split, i) for i in range(sizes[name])]
        (root / f"{name}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        counts[name] = len(lines)
    return counts


def export_shapes(
    out: str | Path,
    formats: Sequence[str] | str = FORMATS,
    num_train: int = 2000,
    num_val: int = 256,
    seed: int = 0,
    image_size: int = 32,
    captions_per_image: int = 4,
    shard_size: int = 500,
    scene_caption_ratio: float = 0.9,
    color_detail: float = 0.5,
    report: dict | None = None,
) -> dict[str, Path]:
    """Write ``out/<format>/...`` for each of ``formats`` (see the module docstring); returns format -> folder.

    Args:
        out: output folder (one sub-folder per format)
        formats: a subset of imagefolder, webdataset, interleaved, text: a list, or comma-separated
        num_train: training images (imagefolder, webdataset), text documents (text) and twice as many documents
            (interleaved) per format
        num_val: validation images / documents per format, as num_train
        seed: world seed
        image_size: image side in pixels
        captions_per_image: phrasings stored per image
        shard_size: samples per webdataset shard
        scene_caption_ratio: fraction of full scene captions
        color_detail: prompt captions with colors filled in
        report: if given, filled with ``{format: {split: samples written}}`` (not a command-line option)
    """
    if isinstance(formats, str):
        formats = tuple(f for f in formats.split(",") if f)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats: unknown or empty {list(formats)!r}; expected a subset of {FORMATS}")
    for name, value, least in [("num_train", num_train, 1), ("num_val", num_val, 1),
                               ("captions_per_image", captions_per_image, 1), ("shard_size", shard_size, 1)]:
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    for name, value in [("scene_caption_ratio", scene_caption_ratio), ("color_detail", color_detail)]:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    world = ShapesWorld(seed=seed, image_size=image_size)
    ex = _Exporter(world, captions_per_image, scene_caption_ratio, color_detail)
    sizes = {"train": num_train, "validation": num_val}
    out = Path(out)
    written: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    for fmt in formats:
        root = out / fmt
        if fmt == "imagefolder":
            counts[fmt] = export_imagefolder(ex, root, sizes)
        elif fmt == "webdataset":
            counts[fmt] = export_webdataset(ex, root, sizes, shard_size)
        elif fmt == "interleaved":
            counts[fmt] = export_interleaved(ex, root, sizes, offset=sizes)  # after imagefolder's samples
        else:
            counts[fmt] = export_text(world, root, sizes)
        written[fmt] = root
    if report is not None:
        report.update(counts)
    return written


_UNITS = {"imagefolder": "images", "webdataset": "images", "interleaved": "documents", "text": "documents"}


def main(argv: list[str] | None = None) -> None:
    """Command line: the arguments of :func:`export_shapes` (``out`` positional, the rest ``--name value``); a
    setting it rejects ends the command with the usage, ``error: ...`` and exit status 2."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m datamodules.shapes.to_files", description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(export_shapes, as_positional=True, skip={"report"})
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report: dict = {}
    try:
        written = export_shapes(**args.as_dict(), report=report)
    except ValueError as e:  # a bad setting (export_shapes names it), not a failure while writing
        parser.error(str(e))
    for fmt, path in written.items():
        per_split = ", ".join(f"{split} {n}" for split, n in report[fmt].items())
        print(f"{fmt:<12} {path}  ({_UNITS[fmt]}: {per_split})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
