"""A real prepared directory with synthetic content, for tests: what ``python -m lit_transfusion prepare`` writes
(``manifest.json``, ``tokenizer.json``, one litdata dataset per source and split), without images or a VAE.

Three sources by default: ``pairs`` (PAIR, 1-3 alternative captions per image), ``mixed`` (INTERLEAVED, text and
1-2 images in turn) and ``corpus`` (TEXT). Latents are random standardized values ``[N, F, 4, 8, 8]`` (the shapes
of ``datamodules/shapes/pretrained_vae`` on 32 px images), ``logvar`` is -6 everywhere, validation splits carry
random ``pixels`` ``[N, 32, 32, 3]``. Every sample's key is unique over the whole directory
(``<source>/<number>``, validation numbers following the training ones).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from datamodules.files.schema import (
    IMAGE,
    INTERLEAVED,
    PAIR,
    TEXT,
    TOKENIZER,
    Manifest,
    Sample,
    SourceInfo,
    SplitInfo,
    max_positions,
)
from lit_transfusion.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
VAE_PATH = ROOT / "datamodules" / "shapes" / "pretrained_vae"
IMAGE_SIZE = 32
LATENT_SHAPE = (4, 8, 8)
LOGVAR = -6.0
BPE_VOCAB = 300

KIND_OF = {"pairs": "pair", "mixed": "interleaved", "corpus": "text"}
N_TRAIN = {"pairs": 40, "mixed": 12, "corpus": 30}
N_VAL = {"pairs": 8, "mixed": 4, "corpus": 6}

_SIZES = ("small", "large", "tiny", "big")
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle", "star")
_PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")


def caption_text(rng: np.random.Generator) -> str:
    pick = lambda words: words[int(rng.integers(len(words)))]
    return f"a {pick(_SIZES)} {pick(_COLORS)} {pick(_SHAPES)} {pick(_PLACES)}"


def corpus_text(rng: np.random.Generator) -> str:
    return " and ".join(caption_text(rng) for _ in range(int(rng.integers(1, 5))))


def write_prepared(
    root: str | Path,
    n_train: dict[str, int] | None = None,
    n_val: dict[str, int] | None = None,
    seq_len: int = 128,
    patch_size: int = 2,
    flip: bool = True,
    seed: int = 0,
    chunk_bytes: str = "16KB",
    optimize: bool = False,
) -> Manifest:
    """Write a prepared directory at ``root`` and return its manifest.

    ``n_train`` / ``n_val``: samples per source name (``pairs``, ``mixed``, ``corpus``; a source absent from
    ``n_train`` is not written, a source absent from ``n_val`` or with 0 has no validation split).
    ``chunk_bytes`` is small so that each split spans several litdata chunks.
    ``optimize``: write each split with ``litdata.optimize`` (what ``prepare`` uses; about 4 s per split, most of
    it process start-up and polling) instead of litdata's ``BinaryWriter`` in this process (milliseconds). Both
    write the same chunk files and ``index.json``: ``optimize`` runs that writer in its worker.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_train = dict(N_TRAIN if n_train is None else n_train)
    n_val = dict(N_VAL if n_val is None else n_val)
    unknown = (set(n_train) | set(n_val)) - set(KIND_OF)
    if unknown:
        raise ValueError(f"unknown source names {sorted(unknown)}; known: {sorted(KIND_OF)}")
    rng = np.random.default_rng(seed)

    # The tokenizer first: the samples store token ids.
    corpus = [caption_text(rng) for _ in range(400)] + [corpus_text(rng) for _ in range(100)]
    tokenizer = TextTokenizer.train(corpus, BPE_VOCAB, save_to=root / TOKENIZER)
    patches = (LATENT_SHAPE[1] // patch_size) * (LATENT_SHAPE[2] // patch_size)

    sources: dict[str, SourceInfo] = {}
    for name in n_train:
        info = SourceInfo(kind=KIND_OF[name])
        number = 0
        for split, n in (("train", n_train[name]), ("val", n_val.get(name, 0))):
            if n <= 0:
                continue
            samples = []
            for _ in range(n):
                sample = _sample(name, f"{name}/{number:06d}", rng, tokenizer, seq_len, patches, flip,
                                 pixels=split == "val")
                if max_positions(sample, patches) > seq_len:
                    raise AssertionError(f"{sample.key}: {max_positions(sample, patches)} positions > {seq_len}")
                samples.append(sample)
                number += 1
            rel = f"{name}/{split}"
            write_split(root / rel, [s.to_item() for s in samples], chunk_bytes, optimize)
            info.splits[split] = SplitInfo(dir=rel, samples=n, images=sum(s.num_images for s in samples),
                                           tokens=sum(len(s.tokens) for s in samples),
                                           tokens_per_use=sum(_tokens_per_use(s) for s in samples))
        sources[name] = info

    manifest = Manifest(
        image_size=IMAGE_SIZE, latent_shape=list(LATENT_SHAPE), vae_path=str(VAE_PATH), vae_sha1=_vae_sha1(),
        tokenizer_sha1=hashlib.sha1((root / TOKENIZER).read_bytes()).hexdigest(),
        tokenizer_origin=f"bpe:{BPE_VOCAB}", seq_len=seq_len, patch_size=patch_size, flip=flip, sources=sources,
    )
    manifest.write(root)
    return manifest


def write_split(out: Path, items: list[dict], chunk_bytes: str, optimize: bool = False) -> None:
    """One litdata dataset of ``items`` at ``out`` (``index.json`` + ``chunk-0-<i>.bin``)."""
    import litdata  # imported here: litdata is heavy and only needed when a directory is written
    from litdata.streaming.writer import BinaryWriter

    if optimize:
        litdata.optimize(fn=functools.partial(_item, items), inputs=list(range(len(items))), output_dir=str(out),
                         num_workers=1, chunk_bytes=chunk_bytes, verbose=False)
        return
    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    for i, item in enumerate(items):
        writer[i] = item
    writer.done()
    writer.merge()


def _item(items: list[dict], index: int) -> dict:
    """litdata's per-input function (module level: it runs in a worker process)."""
    return items[index]


def _vae_sha1() -> str:
    digest = hashlib.sha1()
    for f in sorted(VAE_PATH.iterdir()):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def _latents(rng: np.random.Generator, n: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, logvar), each float16 [n, F, 4, 8, 8]."""
    shape = (n, 2 if flip else 1, *LATENT_SHAPE)
    mean = rng.standard_normal(shape).astype(np.float16)
    return mean, np.full(shape, LOGVAR, dtype=np.float16)


def _sample(name: str, key: str, rng: np.random.Generator, tokenizer: TextTokenizer, seq_len: int, patches: int,
            flip: bool, pixels: bool) -> Sample:
    kind = KIND_OF[name]
    image = patches + 2  # <boi> patches <eoi>
    if kind == "pair":
        room = seq_len - 2 - image
        captions = [tokenizer.encode(caption_text(rng))[:room] for _ in range(int(rng.integers(1, 4)))]
        tokens = np.concatenate(captions).astype(np.int32)
        segments = np.array([len(c) for c in captions], dtype=np.int32)
        n_images, code = 1, PAIR
    elif kind == "interleaved":
        n_images = int(rng.integers(1, 3))
        room = seq_len - 2 - image * n_images
        texts, segments = [], []
        for i in range(n_images + 1):  # text, image, text, ..., text (a text may be empty)
            ids = tokenizer.encode(caption_text(rng))[: max(room // (n_images + 1), 0)] if rng.random() < 0.8 else []
            texts.append(ids)
            segments.append(len(ids))
            if i < n_images:
                segments.append(IMAGE)
        tokens = np.array([t for ids in texts for t in ids], dtype=np.int32)
        segments = np.array(segments, dtype=np.int32)
        code = INTERLEAVED
    else:
        ids = tokenizer.encode(corpus_text(rng))[: seq_len - 2]
        tokens, segments = np.array(ids, dtype=np.int32), np.array([len(ids)], dtype=np.int32)
        n_images, code = 0, TEXT
    mean, logvar = _latents(rng, n_images, flip)
    px = rng.integers(0, 256, (n_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) if pixels else None
    return Sample(key=key, kind=code, tokens=tokens, segments=segments, mean=mean, logvar=logvar, pixels=px)


def _tokens_per_use(sample: Sample) -> int:
    """Text tokens one use of ``sample`` puts in a row (a PAIR sample: one of its captions, on average)."""
    return round(len(sample.tokens) / len(sample.segments)) if sample.kind == PAIR else len(sample.tokens)
