"""Captions stay with their images through ``prepare``: every stored latent, decoded back through the VAE, shows
what its own caption names, in each input format, with several records in every batched VAE call.

The data are shapes-world renders of one large object whose caption names it ("a large red circle on the left"),
exported in each format by ``datamodules.shapes.to_files``' writers (plus OBELICS documents inside WebDataset
shards). Neighbouring images always differ in colour and no two images of a split are alike, so a latent handed to
another record of its batch (a roll, a swap, a shuffle) shows another colour than its caption names and is nearer
another caption's render than its own. The text format stores no latent: its documents must come through without
one, in order.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import litdata
import numpy as np
import pytest

from datamodules.files.prepare import Encoder, prepare
from datamodules.files.schema import IMAGE, INTERLEAVED, PAIR, TEXT, TOKENIZER, Manifest, Sample
from datamodules.files.sources import SourceConfig
from datamodules.shapes.to_files import (
    _SPLIT_CODE,
    _add_member,
    export_imagefolder,
    export_interleaved,
    export_text,
    export_webdataset,
    interleaved_document,
    png_bytes,
)
from datamodules.shapes.world import (
    BACKGROUND,
    COLORS,
    SHAPES,
    Item,
    Obj,
    Prompt,
    Scene,
    ShapesWorld,
    caption,
    render,
    scene_caption,
)
from tests.prepared_data import VAE_PATH

SIZES = dict(image_size=32, seq_len=256, patch_size=2, bpe_vocab_size=300)  # 256: no document is split
ENCODE_BATCH = 4
N = {"train": 12, "validation": 4}  # images per split (imagefolder, webdataset); interleaved: N // 2 documents
SIDES = {"left": 10.0, "right": 22.0}  # object centre x: "on the left" / "on the right" in its scene caption
# Every (colour, shape, side): 36 distinct renders. Image i is COMBOS[7 i % 36]; 7 = 1 mod 6, so image i has
# colour i % 6 and any 6 consecutive images differ in colour, while shapes and sides vary unevenly.
COMBOS = [(c, s, side) for side in SIDES for s in SHAPES for c in COLORS]
IMAGE_SOURCES = ("folder", "shards", "docs", "shard_docs")


def _scene(colour: str, shape: str, side: str) -> Scene:
    return Scene((Obj(shape, colour, SIDES[side], 16.0, 13.0),), 32)


RENDERS = {combo: render(_scene(*combo)) for combo in COMBOS}


def _combo(index: int) -> tuple[str, str, str]:
    return COMBOS[7 * index % len(COMBOS)]


class _OneObjectExporter:
    """What ``to_files``' writers ask of their exporter (``item``, ``world``), over one-object renders: sample
    ``index`` is ``_combo(index)``, captioned by its scene caption and then a GenEval "colors" prompt caption."""

    world = ShapesWorld(seed=0)  # export_interleaved seeds its documents with it; export_text writes its texts

    def item(self, split: str, index: int, count: int | None = None) -> tuple[bytes, list[str]]:
        colour, shape, side = _combo(index)
        rng = np.random.default_rng([_SPLIT_CODE[split], index, 11])
        captions = [scene_caption(_scene(colour, shape, side), rng),
                    caption(Prompt("colors", (Item(shape, colour),)), rng)]
        return png_bytes(RENDERS[colour, shape, side]), captions[: count or len(captions)]


def _write_document_shards(ex: _OneObjectExporter, root: Path, first: int, n_docs: int) -> None:
    """OBELICS documents inside WebDataset shards (``<key>.json`` + ``<key>.<k>.png``), 2 documents a shard."""
    root.mkdir(parents=True)
    index = first
    for shard in range(0, n_docs, 2):
        with tarfile.open(root / f"{shard // 2:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for doc in range(shard, min(shard + 2, n_docs)):
                rng = np.random.default_rng([doc, 12])
                names, captions = [], []
                for k in range(int(rng.integers(2, 4))):
                    data, caps = ex.item("train", index, count=1)
                    _add_member(tar, f"doc{doc:04d}.{k}.png", data)
                    names.append(f"{k}.png")
                    captions.append(caps[0])
                    index += 1
                body = json.dumps(interleaved_document(names, captions, rng)).encode()
                _add_member(tar, f"doc{doc:04d}.json", body)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict[str, list[tuple[int, int]]]]:
    """Every format prepared in one run (in this process); returns the directory and, per source, the
    (records, images) of each batched VAE call."""
    files = tmp_path_factory.mktemp("pairing")
    ex = _OneObjectExporter()
    export_imagefolder(ex, files / "imagefolder", N)
    export_webdataset(ex, files / "webdataset", N, shard_size=6)
    export_interleaved(ex, files / "interleaved", N, offset=N)  # images after the pairs' ones
    export_text(ex.world, files / "text", N)
    _write_document_shards(ex, files / "document_shards", first=2 * N["train"] + 6, n_docs=N["train"] // 2)
    sources = [
        SourceConfig(name="folder", kind="imagefolder", path=str(files / "imagefolder")),
        SourceConfig(name="shards", kind="webdataset", path=str(files / "webdataset" / "train"),
                     val_path=str(files / "webdataset" / "validation")),
        SourceConfig(name="docs", kind="interleaved", path=str(files / "interleaved" / "train.jsonl"),
                     val_path=str(files / "interleaved" / "validation.jsonl")),
        SourceConfig(name="shard_docs", kind="webdataset", path=str(files / "document_shards")),
        SourceConfig(name="corpus", kind="text", path=str(files / "text" / "train.txt"),
                     val_path=str(files / "text" / "validation.txt")),
    ]

    batches: dict[str, list[tuple[int, int]]] = {}
    call, encode = Encoder.__call__, Encoder._encode

    def spy_call(self, unit):
        self._spy_source = unit.source
        yield from call(self, unit)

    def spy_encode(self, pending, *args, **kwargs):  # pending: [(record, [(kind, segments, images)])]
        if pending:
            images = sum(len(piece[-1]) for _, pieces in pending for piece in pieces)
            batches.setdefault(self._spy_source, []).append((len(pending), images))
        return encode(self, pending, *args, **kwargs)

    out = files / "prepared"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Encoder, "__call__", spy_call)
        mp.setattr(Encoder, "_encode", spy_encode)
        prepare(sources, str(out), str(VAE_PATH), flip=True, num_workers=1, encode_batch=ENCODE_BATCH, **SIZES)
    return out, batches


def _read(root: Path, rel: str) -> list[Sample]:
    ds = litdata.StreamingDataset(str(root / rel))
    return [Sample.from_item(ds[i]) for i in range(len(ds))]


def _named(text: str, words) -> list[str]:
    return [w for w in words if re.search(rf"\b{w}\b", text)]


def _combo_of(captions: list[str]) -> tuple[str, str, str] | str:
    """The (colour, shape, side) the captions of one image name, or why they do not name one."""
    colours = {c for t in captions for c in _named(t, COLORS)}
    shapes = {s for t in captions for s in _named(t, SHAPES)}
    sides = {s for t in captions for s in _named(t, SIDES)}
    if len(colours) != 1 or len(shapes) != 1 or len(sides) != 1:
        return f"captions {captions!r} do not name one colour, shape and side"
    return colours.pop(), shapes.pop(), sides.pop()


def _interleaved_captions(texts: list[str], segments: list[int]) -> list[list[str] | str]:
    """Per image of a document written by ``interleaved_document``: its caption, from "picture k: <caption>."
    just before it or "it shows <caption>." just after it (or why none is found)."""
    out: list[list[str] | str] = []
    t = 0  # index of the next text
    for p, n in enumerate(segments):
        if n != IMAGE:
            t += 1
            continue
        before = texts[t - 1] if p > 0 and segments[p - 1] != IMAGE else ""
        after = texts[t] if p + 1 < len(segments) and segments[p + 1] != IMAGE else ""
        m = re.search(r"picture (\d+)(?:: ([^.]*))?\.$", before)
        if m is None or int(m.group(1)) != len(out) + 1:
            out.append(f"image {len(out)}: text before it {before!r} is not 'picture {len(out) + 1}...'")
        elif m.group(2):
            out.append([m.group(2)])
        elif (m := re.match(r"it shows ([^.]*)\.", after)) is not None:
            out.append([m.group(1)])
        else:
            out.append(f"image {len(out)}: no caption before ({before!r}) or after ({after!r}) it")
    return out


def _nearest(image: np.ndarray) -> tuple[str, str, str]:
    return min(COMBOS, key=lambda c: float(((image - RENDERS[c]) ** 2).mean()))


def _shown_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour (or "background") nearest the mean of ``image`` over ``mask``."""
    colours = {**COLORS, "background": BACKGROUND}
    mean = image[mask].mean(axis=0)
    return min(colours, key=lambda c: float(np.linalg.norm(mean - np.asarray(colours[c], np.float32))))


def _label(combo: tuple[str, str, str]) -> str:
    return "{} {} on the {}".format(*combo)


@pytest.mark.parametrize("source", IMAGE_SOURCES)
def test_every_stored_latent_shows_what_its_own_caption_names(prepared, source):
    import torch

    from lit_transfusion.tokenizer import TextTokenizer
    from lit_transfusion.vae import LatentCodec, tensor_to_images

    root, batches = prepared
    # several records in the VAE calls: a latent handed to the wrong record of its batch is possible, and caught
    assert max(records for records, _ in batches[source]) >= 2, batches[source]
    assert any(images >= ENCODE_BATCH for _, images in batches[source]), batches[source]

    manifest = Manifest.read(root)
    tok = TextTokenizer.from_file(root / TOKENIZER)
    codec = LatentCodec.from_dir(manifest.vae_path)  # the VAE named in the manifest undoes its standardization
    info = manifest.sources[source]
    assert not info.skipped and not info.notes, (info.skipped, info.notes)
    failures, checked = [], 0
    for split, split_info in info.splits.items():
        samples = _read(root, split_info.dir)
        assert samples and all(s.mean.shape[1:] == (2, *manifest.latent_shape) for s in samples)
        assert sum(s.num_images for s in samples) == split_info.images
        latents = torch.from_numpy(np.concatenate([s.mean for s in samples]).astype(np.float32))  # [M, 2, C, h, w]
        decoded = tensor_to_images(codec.decode(latents.flatten(0, 1))).astype(np.float32)
        decoded = decoded.reshape(len(latents), 2, *decoded.shape[1:])  # [M, 2 (image, flip), S, S, 3]
        row = 0
        for s in samples:
            texts = [tok.decode(ids.tolist()) for ids in s.texts()]
            if s.kind == PAIR:
                named = [texts]  # one image, every alternative caption names it
            else:
                assert s.kind == INTERLEAVED, (s.key, s.kind)
                named = _interleaved_captions(texts, s.segments.tolist())
            assert len(named) == s.num_images, (s.key, texts)
            for j, captions in enumerate(named):
                images, row = decoded[row], row + 1
                where = f"{source}/{split} {s.key} image {j}"
                combo = _combo_of(captions) if isinstance(captions, list) else captions
                if isinstance(combo, str):
                    failures.append(f"{where}: {combo}")
                    continue
                colour, shape, side = combo
                flipped = (colour, shape, next(other for other in SIDES if other != side))
                if s.pixels is not None and not np.array_equal(s.pixels[j], RENDERS[combo]):
                    failures.append(f"{where}: stored pixels are not the {_label(combo)} its caption names")
                for f, want in enumerate((combo, flipped)):  # the image, then its stored horizontal flip
                    checked += 1
                    mask = np.all(RENDERS[want] == COLORS[colour], axis=-1)  # the object, fully covered pixels
                    shown, nearest = _shown_colour(images[f], mask), _nearest(images[f])
                    if shown != colour or nearest != want:
                        failures.append(f"{where}{' (flip)' if f else ''}: caption {captions[0]!r} names "
                                        f"{_label(want)}, the decoded latent shows {shown} (nearest render: "
                                        f"{_label(nearest)})")
        assert row == len(decoded)
    assert checked >= 2 * N["validation"]
    assert not failures, (f"{len(failures)} of {checked} stored latents of {source!r} do not show what their own "
                          "caption names:\n" + "\n".join(failures[:12]))


def test_text_documents_come_through_without_a_latent_in_order(prepared):
    from lit_transfusion.tokenizer import TextTokenizer

    root, batches = prepared
    assert all(images == 0 for _, images in batches["corpus"])  # no image reaches the VAE
    tok = TextTokenizer.from_file(root / TOKENIZER)
    info = Manifest.read(root).sources["corpus"]
    for split, name in (("train", "train"), ("val", "validation")):
        samples = _read(root, info.splits[split].dir)
        assert all(s.kind == TEXT and s.num_images == 0 for s in samples)
        lines = (root.parent / "text" / f"{name}.txt").read_text().splitlines()
        # a long line becomes consecutive chunks: the chunks, in order, are the lines, in order
        assert "".join(tok.decode(s.tokens.tolist()) for s in samples) == "".join(lines)
