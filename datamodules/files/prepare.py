"""``python -m lit_transfusion prepare --config configs/imagefolder/prepare.yaml``: a user's data, prepared once.

For every source (image-caption folder, WebDataset shards, interleaved JSON lines, text corpus) and split:
read the raw samples, decode and check each image (mode -> RGB, EXIF orientation, resize + center crop),
encode it and its horizontal flip with the frozen VAE (posterior mean and log-variance, standardized),
tokenize the text (truncating a caption that cannot fit, splitting a long document at segment boundaries),
and write the result with ``litdata.optimize`` to ``out_dir/<source>/<split>/`` (chunked, memory-mapped,
streamable, sharded across ranks at training time). ``out_dir/manifest.json`` records how (VAE, tokenizer,
sizes) and what (samples written, samples skipped by reason with the first offending paths).

Bad samples never stop the run: each is skipped and counted. A source with no valid training sample is an
error naming it. A rerun skips every (source, split) already written with the same settings.

Validation: a source without validation data of its own (``val_path``, an imagefolder ``validation/`` folder) and
without a ``val_fraction`` of its own holds out ``val_fraction`` (default 5 %) of its samples, at least
``min_val_samples``, chosen by a stable hash of each sample's key (:func:`with_validation`). Every kind does, text
too: ``fit`` evaluates on whatever held-out data there is (losses, text and caption perplexity, FID on held-out
images) and refuses a directory without any. A source's ``val_fraction: 0`` asks for no validation split.

VAE check: the VAE reconstructs the first ``vae_psnr_images`` training images of each source with images; the
report and the manifest give the PSNR, and the report warns below ``vae_min_psnr`` (a VAE trained on other
images: the model would learn, and generate, its distortions), naming the config that trains one on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datamodules.files.decode import BadSample, load_image
from datamodules.files.records import ImageRef, Record, Skips
from datamodules.files.schema import (
    FORMAT_VERSION,
    IMAGE,
    INTERLEAVED,
    PAIR,
    TEXT,
    TOKENIZER,
    Manifest,
    Sample,
    SourceInfo,
    SplitInfo,
)
from datamodules.files.sources import SourceConfig, caption_corpus, key_position, own_validation, read_source

SPLITS = ("train", "val")
# Counted but not skipped: the sample is written, changed as named.
NOTES = ("caption_truncated", "document_split")
# What trains a VAE on the user's own images (named when the configured VAE reconstructs them badly).
VAE_CONFIG = "configs/imagefolder/vae.yaml"


class PrepareError(Exception):
    """A setting or a source that makes preparing impossible: one line, exit status 2."""


@dataclass
class Settings:
    """Everything a worker process needs to turn raw records into stored samples (picklable)."""

    vae_path: str
    tokenizer_file: str
    image_size: int
    seq_len: int
    patch_size: int
    flip: bool
    min_image_size: int
    max_aspect_ratio: float
    background: tuple[int, int, int]
    encode_batch: int
    threads: int

    def digest(self) -> str:
        """Changes whenever the stored samples would: a rerun with another digest rewrites the split."""
        d = asdict(self)
        d.pop("threads")
        d.pop("encode_batch")
        d["vae"] = _files_sha1(Path(self.vae_path), ("config.json", "*.safetensors", "*.bin"))
        d["tokenizer"] = _files_sha1(Path(self.tokenizer_file).parent, (Path(self.tokenizer_file).name,))
        d["format"] = FORMAT_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class Encoder:
    """The ``litdata.optimize`` function: one work unit (a shard, or a list of records) -> stored samples.

    Runs in worker processes; the VAE and tokenizer load once per process. Skips and notes of each unit are
    appended to a JSON-lines file per process in ``tally_dir`` (workers cannot return them otherwise).
    """

    def __init__(self, settings: Settings, split: str, tally_dir: str):
        self.s, self.split, self.tally_dir = settings, split, tally_dir
        self._codec = None
        self._tokenizer = None
        self._tally_file = None

    # ------------------------------------------------------------------------------------ per process
    def _load(self):
        if self._codec is None:
            import torch

            from lit_transfusion.tokenizer import TextTokenizer
            from lit_transfusion.vae import LatentCodec

            if self.s.threads:  # 0: in the calling process, whose thread count stays as it is
                torch.set_num_threads(self.s.threads)
            self._codec = LatentCodec.from_dir(self.s.vae_path)
            self._tokenizer = TextTokenizer.from_file(self.s.tokenizer_file)
            self._tally_file = Path(self.tally_dir) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        return self._codec, self._tokenizer

    @property
    def patches_per_image(self) -> int:
        _, h, w = _latent_shape(self.s)
        return (h // self.s.patch_size) * (w // self.s.patch_size)

    def __call__(self, unit) -> Iterator[dict]:
        codec, tok = self._load()
        skips, notes = Skips(), Skips()
        written = {"samples": 0, "images": 0, "tokens": 0, "tokens_per_use": 0}
        pending: list[tuple[Record, list]] = []  # (record, its decoded pieces) waiting for one batched VAE call
        n_images = 0
        for record in unit.records(skips):
            pieces = self._decode(record, tok, skips, notes)
            if not pieces:
                continue
            pending.append((record, pieces))
            n_images += sum(len(p[2]) for p in pieces)
            if n_images >= self.s.encode_batch:
                yield from self._encode(pending, codec, written)
                pending, n_images = [], 0
        yield from self._encode(pending, codec, written)
        with open(self._tally_file, "a") as f:
            f.write(json.dumps({"skips": skips.to_dict(), "notes": notes.to_dict(), **written}) + "\n")

    # ---------------------------------------------------------------------------------------- decode
    def _decode(self, record: Record, tok, skips: Skips, notes: Skips) -> list[tuple]:
        """A record -> ``[(kind, segments, images)]``, one entry per stored sample (a long document gives
        several): segments are token-id lists (PAIR: the alternative captions) or IMAGE markers, images uint8
        ``[S, S, 3]`` arrays. ``[]`` when the record is skipped (counted in ``skips``)."""
        s = self.s
        image_positions = self.patches_per_image + 2
        try:
            if record.kind == "pair":
                image = self._image(record.segments[0])
                room = s.seq_len - 2 - image_positions  # <bos> caption <boi> ... <eoi> <eos>
                captions = []
                for text in record.captions:
                    ids = tok.encode(text)
                    if len(ids) > room:
                        ids = ids[:room]
                        notes.add("caption_truncated", record.key)
                    if ids:
                        captions.append(ids)
                if not captions:
                    raise BadSample("empty_caption")
                return [(PAIR, captions, [image])]
            if record.kind == "interleaved":
                segments: list = []
                images = []
                for seg in record.segments:
                    if isinstance(seg, ImageRef):
                        images.append(self._image(seg))
                        segments.append(IMAGE)
                    else:
                        ids = tok.encode(seg)
                        if ids:
                            segments.append(ids)
                pieces = _split_document(segments, images, s.seq_len - 2, image_positions)
                if pieces is None:
                    raise BadSample("document_too_long")
                if len(pieces) > 1:
                    notes.add("document_split", record.key)
                return [(INTERLEAVED, segs, imgs) for segs, imgs in pieces]
            if record.kind == "text":
                ids = tok.encode(record.segments[0])
                if not ids:
                    raise BadSample("empty_caption")
                room = s.seq_len - 2
                if len(ids) > room:
                    notes.add("document_split", record.key)
                return [(TEXT, [ids[i : i + room]], []) for i in range(0, len(ids), room)]
            raise ValueError(f"unknown record kind {record.kind!r}")
        except BadSample as e:
            skips.add(e.reason, _where(record, e))
            return []

    def _image(self, ref: ImageRef) -> np.ndarray:
        s = self.s
        try:
            return load_image(ref, s.image_size, min_size=s.min_image_size, max_aspect=s.max_aspect_ratio,
                              background=tuple(s.background))
        except BadSample as e:
            e.where = ref.name
            raise

    # ---------------------------------------------------------------------------------------- encode
    def _encode(self, pending: list[tuple[Record, list]], codec, written: dict) -> Iterator[dict]:
        """Encode every image of ``pending`` in one batched VAE call (and the flips), then yield the items."""
        import torch

        from lit_transfusion.vae import images_to_tensor

        all_images = [img for _, pieces in pending for _, _, imgs in pieces for img in imgs]
        if all_images:
            x = images_to_tensor(np.stack(all_images))  # [N, 3, S, S] in [-1, 1]
            if self.s.flip:
                x = torch.cat([x, x.flip(-1)])
            mean, logvar = codec.encode_distribution(x, batch_size=max(self.s.encode_batch, 1))
            n = len(all_images)
            F = 2 if self.s.flip else 1
            # [F*N, C, h, w] -> [N, F, C, h, w]: the image and its flip side by side
            mean = mean.view(F, n, *mean.shape[1:]).transpose(0, 1).numpy()
            logvar = logvar.view(F, n, *logvar.shape[1:]).transpose(0, 1).numpy()
        cursor = 0
        C, h, w = _latent_shape(self.s)
        F = 2 if self.s.flip else 1
        for record, pieces in pending:
            for p, (kind, segments, imgs) in enumerate(pieces):
                k = len(imgs)
                texts = [seg for seg in segments if not isinstance(seg, int)]  # an int is the IMAGE marker
                lengths = [IMAGE if isinstance(seg, int) else len(seg) for seg in segments]
                tokens = np.concatenate([np.asarray(t, dtype=np.int32) for t in texts]) if texts else np.zeros(
                    0, np.int32)
                if k:
                    m, lv = mean[cursor : cursor + k], logvar[cursor : cursor + k]
                else:
                    m = lv = np.zeros((0, F, C, h, w), np.float16)
                sample = Sample(
                    key=record.key if len(pieces) == 1 else f"{record.key}#{p}",
                    kind=kind, tokens=tokens, segments=np.asarray(lengths, np.int32), mean=m, logvar=lv,
                    pixels=(np.stack(imgs) if k else np.zeros((0, self.s.image_size, self.s.image_size, 3),
                                                               np.uint8)) if self.split == "val" else None,
                )
                cursor += k
                written["samples"] += 1
                written["images"] += k
                written["tokens"] += int(tokens.size)
                written["tokens_per_use"] += round(tokens.size / len(segments)) if kind == PAIR else int(tokens.size)
                yield sample.to_item()


def _split_document(segments: list, images: list, room: int, image_positions: int):
    """Greedy split of an interleaved document (token-id lists and IMAGE markers, in order) into pieces of at most
    ``room`` positions, cutting only between segments or inside a text segment, never inside an image.
    Returns ``[(segments, images)]``, or None if one image alone does not fit."""
    if image_positions > room:
        return None if images else [(list(segments), [])] if segments else []
    pieces, cur, cur_imgs, used, img_i = [], [], [], 0, 0
    for seg in segments:
        if isinstance(seg, int):  # IMAGE
            if used + image_positions > room:
                pieces.append((cur, cur_imgs))
                cur, cur_imgs, used = [], [], 0
            cur.append(IMAGE)
            cur_imgs.append(images[img_i])
            img_i += 1
            used += image_positions
            continue
        ids = list(seg)
        while ids:
            take = room - used
            if take <= 0:
                pieces.append((cur, cur_imgs))
                cur, cur_imgs, used = [], [], 0
                continue
            cur.append(ids[:take])
            used += len(ids[:take])
            ids = ids[take:]
    if cur:
        pieces.append((cur, cur_imgs))
    return [p for p in pieces if p[0]]


def _where(record: Record, error: BadSample) -> str:
    return getattr(error, "where", None) or record.key


def _latent_shape(s: Settings) -> tuple[int, int, int]:
    from lit_transfusion.vae import vae_latent_shape

    return vae_latent_shape(s.vae_path, s.image_size)


def _files_sha1(root: Path, patterns: tuple[str, ...]) -> str:
    digest = hashlib.sha1()
    for pattern in patterns:
        for f in sorted(root.glob(pattern)):
            digest.update(f.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- driver
def prepare(
    sources: list[SourceConfig],
    out_dir: str,
    vae_path: str,
    image_size: int = 256,
    seq_len: int = 1024,
    patch_size: int = 2,
    tokenizer_path: str | None = None,
    bpe_vocab_size: int = 8192,
    bpe_texts: int = 200_000,
    flip: bool = True,
    min_image_size: int = 8,
    max_aspect_ratio: float = 4.0,
    background: tuple[int, int, int] = (255, 255, 255),
    num_workers: int = 1,
    encode_batch: int = 64,
    chunk_bytes: str = "64MB",
    val_fraction: float = 0.05,
    min_val_samples: int = 8,
    vae_psnr_images: int = 64,
    vae_min_psnr: float = 25.0,
) -> Manifest:
    """Prepare ``sources`` into ``out_dir`` (see the module docstring); returns the manifest written.

    Args:
        sources: the data (``SourceConfig``: name, kind imagefolder|webdataset|interleaved|text, path, val_path,
            val_fraction, caption_column, text_column, text_split).
        out_dir: the prepared directory (a local path).
        vae_path: a diffusers ``AutoencoderKL`` directory (the shipped shapes VAE, one trained with
            ``vae fit --config configs/imagefolder/vae.yaml``, or a pretrained one such as Stable Diffusion's);
            its own latent scaling is applied.
        image_size: side of the square images the VAE encodes (resize the shorter side, center crop).
        seq_len: the longest sequence training will use: captions are truncated and documents split to fit.
        patch_size: the model's patch size, which fixes the positions an image takes (``(h/p)(w/p) + 2``).
            Training may use this size or a larger one, and this seq_len or a longer one.
        tokenizer_path: a ``tokenizer.json`` to use (e.g. Llama-2's); None trains a byte-level BPE on the sources.
        bpe_vocab_size: vocabulary of the trained BPE (including 256 bytes and the special tokens).
        bpe_texts: at most this many captions / texts of each source train the BPE.
        flip: also store each image's horizontal flip (training picks one at random). Turn off when captions
            speak of left and right.
        min_image_size: images with a shorter side below this are skipped ("too_small").
        max_aspect_ratio: images longer than this ratio are skipped ("bad_aspect_ratio").
        background: RGB colour transparent images are composited on.
        num_workers: parallel processes (each decodes and encodes whole work units: shards, or ~256 records).
        encode_batch: images per VAE call.
        chunk_bytes: litdata chunk size.
        val_fraction: the share held out for validation (by a stable hash of the sample key) from each source
            that has no validation data of its own and no ``val_fraction`` of its own (a source's own
            ``val_fraction: 0``: no validation split). 0: hold out nothing by default.
        min_val_samples: hold out at least this many samples of such a source (never more than a quarter of them)
            when ``val_fraction`` alone would hold out fewer; webdataset shards get ``val_fraction`` alone.
        vae_psnr_images: the VAE encodes (posterior mean) and decodes this many training images of each source
            with images; their PSNR goes to the report and the manifest (``vae_psnr``). 0: no check.
        vae_min_psnr: below this PSNR (dB) the report warns that the VAE does not fit the images and names
            ``configs/imagefolder/vae.yaml``, which trains one on them (the shipped shapes VAE: ~33 dB on shapes).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in sources]
    _check(sources, vae_path, image_size, seq_len, patch_size)
    _check_held_out_and_vae(val_fraction, min_val_samples, vae_psnr_images)
    resolved = [with_validation(s, val_fraction, min_val_samples) for s in sources]
    sources, validation = [s for s, _ in resolved], [where for _, where in resolved]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_file, origin = _tokenizer(sources, out, tokenizer_path, bpe_vocab_size, bpe_texts)
    threads = max(1, (os.cpu_count() or 1) // max(num_workers, 1))
    settings = Settings(vae_path=str(Path(vae_path).resolve()), tokenizer_file=str(tokenizer_file),
                        image_size=image_size, seq_len=seq_len, patch_size=patch_size, flip=flip,
                        min_image_size=min_image_size, max_aspect_ratio=max_aspect_ratio,
                        background=tuple(background), encode_batch=encode_batch, threads=threads)
    digest = settings.digest()
    infos: dict[str, SourceInfo] = {}
    notes: dict[str, Skips] = {}
    codec = _LazyCodec(settings.vae_path)
    for src, where in zip(sources, validation, strict=True):
        info = infos[src.name] = SourceInfo(kind=_kind_name(src), validation=where,
                                            val_fraction=src.held_out if where == "held_out" else 0.0)
        skips, notes[src.name] = Skips(), Skips()
        for split in SPLITS:
            done = _write_split(src, split, out, settings, digest, num_workers, chunk_bytes)
            if done is None:
                continue
            split_info, split_skips, split_notes = done
            skips.merge(split_skips)
            notes[src.name].merge(split_notes)
            if split_info.samples:
                info.splits[split] = split_info
        info.skipped, info.notes = dict(skips.counts), dict(notes[src.name].counts)
        info.examples = {**skips.examples, **notes[src.name].examples}
        if src.kind != "text" and vae_psnr_images:
            info.vae_psnr, info.vae_psnr_images = _vae_check(src, settings, digest, out, vae_psnr_images, codec)
    from lit_transfusion.vae import vae_latent_shape

    manifest = Manifest(
        image_size=image_size, latent_shape=list(vae_latent_shape(vae_path, image_size)),
        vae_path=settings.vae_path, vae_sha1=_files_sha1(Path(vae_path), ("config.json", "*.safetensors", "*.bin")),
        tokenizer_sha1=_files_sha1(out, (TOKENIZER,)), tokenizer_origin=origin, seq_len=seq_len,
        patch_size=patch_size, flip=flip, sources=infos,
    )
    manifest.write(out)
    print(report(manifest, time.perf_counter() - start, vae_min_psnr))
    empty = [name for name, info in infos.items() if "train" not in info.splits]
    if empty:
        raise PrepareError("; ".join(
            f"source {name!r} ({next(s.path for s in sources if s.name == name)}) has no valid training sample"
            + (f" (skipped: {_counts(infos[name].skipped)})" if infos[name].skipped else "") for name in empty))
    return manifest


def _kind_name(src: SourceConfig) -> str:
    return {"imagefolder": "pair", "webdataset": "pair", "interleaved": "interleaved", "text": "text"}[src.kind]


def _check(sources: list[SourceConfig], vae_path: str, image_size: int, seq_len: int, patch_size: int) -> None:
    from lit_transfusion.vae import vae_latent_shape

    if not sources:
        raise PrepareError("sources: empty; expected at least one source (imagefolder, webdataset, interleaved, text)")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise PrepareError(f"sources: names must be unique, got {names}")
    for s in sources:
        if s.kind not in ("imagefolder", "webdataset", "interleaved", "text"):
            raise PrepareError(f"sources[{s.name!r}].kind: {s.kind!r}; expected imagefolder, webdataset, "
                               "interleaved or text")
    try:
        C, h, w = vae_latent_shape(vae_path, image_size)
    except FileNotFoundError as e:
        raise PrepareError(f"vae_path: {e}") from None
    if h % patch_size or w % patch_size or h == 0:
        raise PrepareError(f"patch_size={patch_size} must divide the latent grid {h}x{w} (image_size={image_size} "
                           f"through the VAE at {vae_path!r})")
    needed = (h // patch_size) * (w // patch_size) + 2 + 2 + 1
    if needed > seq_len:
        raise PrepareError(f"seq_len={seq_len} cannot hold one image ({needed - 3} positions) with "
                           "<bos>, a caption token and <eos>")


def _check_held_out_and_vae(val_fraction: float, min_val_samples: int, vae_psnr_images: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"val_fraction: {val_fraction}; expected a share in [0, 1) (0.05 holds out 5 %)")
    for name, value in (("min_val_samples", min_val_samples), ("vae_psnr_images", vae_psnr_images)):
        if value < 0:
            raise PrepareError(f"{name}: {value}; expected a count >= 0 (0 turns it off)")


# --------------------------------------------------------------------------------------------- validation
def with_validation(src: SourceConfig, fraction: float, min_samples: int) -> tuple[SourceConfig, str]:
    """``src`` with its held-out share decided (a float ``val_fraction``), and where its validation split comes
    from (``SourceInfo.validation``: "val_path", "folder <name>/", "held_out" or "none").

    Validation data of its own wins; a ``val_fraction`` of its own is kept (0: "none"); an unset one becomes
    ``fraction``, raised to hold out ``min_samples`` samples (at most a quarter of them) when ``fraction``
    holds out fewer: a small folder still validates. Either way the split is a threshold on the position of each
    key (``key_position``): a rerun makes the same split, and once the share is ``fraction`` itself (typically
    from ``min_samples / fraction`` samples on: 160 by default) added samples never move existing ones; below
    that, adding samples can move a few held-out ones. Webdataset sources get ``fraction`` alone (the minimum
    would read every shard once more for the keys)."""
    own = own_validation(src)
    if own is not None:
        return dataclasses.replace(src, val_fraction=src.held_out), own
    if src.val_fraction is None:
        if fraction > 0 and min_samples > 0 and src.kind != "webdataset":
            fraction = _raised_to_minimum(_train_keys(src), fraction, min_samples)
        src = dataclasses.replace(src, val_fraction=fraction)
    return src, "held_out" if src.held_out > 0 else "none"


def _train_keys(src: SourceConfig) -> list[str]:
    """The key of every valid sample of ``src`` with nothing held out (a scan: no image is decoded)."""
    try:
        units = read_source(dataclasses.replace(src, val_fraction=0.0), "train", Skips())
    except FileNotFoundError as e:
        raise PrepareError(f"sources[{src.name!r}].path: {e}") from None
    return [record.key for unit in units for record in unit.records(Skips())]


def _raised_to_minimum(keys: list[str], fraction: float, min_samples: int) -> float:
    """``fraction``, or the smallest share holding out the ``k = min(min_samples, len(keys) // 4)`` keys of
    smallest position when ``fraction`` holds out fewer than ``k``."""
    k = min(min_samples, len(keys) // 4)
    positions = sorted(key_position(key) for key in keys)
    if k == 0 or positions[k - 1] < fraction:
        return fraction
    return math.nextafter(positions[k - 1], 1.0)  # the k-th position itself is held out (positions < share)


# --------------------------------------------------------------------------------------------- VAE check
def _first_images(src: SourceConfig, settings: Settings, n: int) -> np.ndarray:
    """uint8 ``[n', S, S, 3]``: the first ``n`` training images of ``src`` that decode, decoded as the stored
    ones are (``n' < n`` when the source has fewer; bad images are passed over, the splits count them)."""
    decoder = Encoder(settings, "train", tally_dir="")
    images = []
    for unit in read_source(src, "train", Skips()):
        for record in unit.records(Skips()):
            for ref in record.segments:
                if not isinstance(ref, ImageRef):
                    continue
                try:
                    images.append(decoder._image(ref))
                except BadSample:
                    continue
                if len(images) == n:
                    return np.stack(images)
    size = settings.image_size
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


class _LazyCodec:
    """The VAE in this process (a ``LatentCodec``), loaded at the first call: a rerun whose checks are all done
    never loads it."""

    def __init__(self, vae_path: str):
        self.vae_path, self._codec = vae_path, None

    def __call__(self):
        if self._codec is None:
            from lit_transfusion.vae import LatentCodec

            self._codec = LatentCodec.from_dir(self.vae_path)
        return self._codec


def _vae_check(src: SourceConfig, settings: Settings, digest: str, out: Path, n: int,
               codec: _LazyCodec) -> tuple[float | None, int]:
    """The VAE's reconstruction PSNR (dB, 2 decimals) on the first ``n`` training images of ``src``, and how many
    there were (``(None, 0)``: none). Kept in ``out/<source>/vae_check.json``: a rerun with the same settings,
    source and ``n`` reads it instead of decoding and reconstructing again (a large VAE on CPU takes a while)."""
    marker = out / src.name / "vae_check.json"
    key = {"digest": digest, "source": json.dumps(asdict(src), sort_keys=True), "images": n}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            return done["psnr"], done["count"]
    images = _first_images(src, settings, n)
    if not len(images):
        return None, 0
    psnr = round(reconstruction_psnr(codec(), images), 2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "psnr": psnr, "count": len(images)}))
    return psnr, len(images)


def reconstruction_psnr(codec, images: np.ndarray) -> float:
    """Mean PSNR (dB, ``vae.psnr``: on the [0, 1] range) of uint8 ``images`` ``[N, S, S, 3]`` against their
    reconstruction through ``codec`` (a ``LatentCodec``: posterior mean, then decode), in one batch."""
    from lit_transfusion.vae import images_to_tensor, psnr

    x = images_to_tensor(images)  # [N, 3, S, S] in [-1, 1]
    return float(psnr(codec.decode(codec.encode(x, batch_size=len(x)), batch_size=len(x)), x))


def _tokenizer(sources, out: Path, tokenizer_path, vocab_size: int, texts: int) -> tuple[Path, str]:
    """``out/tokenizer.json``: a copy of ``tokenizer_path``, or a byte-level BPE trained on the sources (kept
    across reruns with the same origin, so prepared splits stay valid)."""
    from lit_transfusion.tokenizer import TextTokenizer

    target = out / TOKENIZER
    origin_file = out / "tokenizer.origin"
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        origin = f"file:{path.resolve()}:{_files_sha1(path.parent, (path.name,))}"
    else:
        origin = f"bpe:{vocab_size}:" + ",".join(f"{s.name}={s.path}" for s in sources)
    if target.is_file() and origin_file.is_file() and origin_file.read_text() == origin:
        return target, origin
    if tokenizer_path is not None:
        try:
            TextTokenizer.from_file(tokenizer_path)  # validates, adds nothing on disk
        except (FileNotFoundError, ValueError) as e:
            raise PrepareError(f"tokenizer_path: {e}") from None
        shutil.copyfile(tokenizer_path, target)
    else:
        corpus = [t for s in sources for t in caption_corpus(s, limit=texts)]
        if not corpus:
            raise PrepareError("no caption or text found in any source to train the tokenizer on "
                               f"({', '.join(s.name for s in sources)}); give tokenizer_path instead")
        TextTokenizer.train(corpus, vocab_size, save_to=target)
    origin_file.write_text(origin)
    return target, origin


def _write_split(src: SourceConfig, split: str, out: Path, settings: Settings, digest: str, num_workers: int,
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


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)


def report(manifest: Manifest, seconds: float, vae_min_psnr: float = 25.0) -> str:
    """The end-of-run report: samples written per source and split, where validation comes from, skips by
    reason with examples, the VAE's reconstruction PSNR (a warning below ``vae_min_psnr``), and a warning when no
    source has a validation split (``fit`` refuses such a directory)."""
    lines = [f"prepared in {seconds:.1f} s:"]
    for name, info in manifest.sources.items():
        splits = ", ".join(f"{split} {s.samples} samples ({s.images} images, {s.tokens} tokens)"
                           for split, s in info.splits.items()) or "nothing written"
        lines.append(f"  {name} [{info.kind}]: {splits}")
        skipped = {k: v for k, v in info.skipped.items() if v}
        if skipped:
            lines.append(f"    skipped {sum(skipped.values())}: {_counts(skipped)}")
            for reason in sorted(skipped):
                lines.append(f"      {reason}: {', '.join(info.examples.get(reason, [])[:3])}")
        if getattr(info, "notes", None):
            lines.append(f"    written with changes: {_counts(info.notes)}")
        lines += _validation_lines(info) + _vae_lines(info, manifest.vae_path, vae_min_psnr)
    if not any("val" in info.splits for info in manifest.sources.values()):
        lines.append("warning: no source has a validation split, and fit refuses to train without evaluation: "
                     "give a source val_path, or hold out a share (val_fraction > 0)")
    return "\n".join(lines)


def _validation_lines(info: SourceInfo) -> list[str]:
    """Where the source's validation split comes from and its size (held out: the share and the rule)."""
    n = info.splits["val"].samples if "val" in info.splits else 0
    if info.validation == "none":
        return ["    validation: none (val_fraction: 0)"]
    if info.validation == "held_out":
        rule = f"{n} samples held out by key hash (val_fraction {info.val_fraction:.3g})"
        return [f"    validation: {rule}" if n else f"    warning: validation: {rule}: raise val_fraction or give "
                "val_path"]
    return [f"    validation: {n} samples from {info.validation}"] if info.validation else []


def _vae_lines(info: SourceInfo, vae_path: str, min_psnr: float) -> list[str]:
    """The VAE's reconstruction PSNR on the source's images, and what to do when it is low."""
    if info.vae_psnr is None:
        return []
    lines = [f"    VAE reconstruction: {info.vae_psnr:.1f} dB PSNR on {info.vae_psnr_images} training images"]
    if info.vae_psnr < min_psnr:
        lines.append(
            f"    warning: the VAE reconstructs these images at {info.vae_psnr:.1f} dB, below vae_min_psnr "
            f"{min_psnr:g}: {vae_path} was trained on other images, and the model learns (and generates) its "
            f"distortions, e.g. wrong colours. Train a VAE on these images: python -m lit_transfusion vae fit "
            f"--config {VAE_CONFIG} (data.init_args.path: your images), then set vae_path to its export_dir")
    return lines


def prepare_parser():
    """The command's parser: every argument of :func:`prepare`, from ``--config`` YAML and/or flags."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m lit_transfusion prepare", exit_on_error=False,
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(prepare)
    return parser


def main(argv: list[str]) -> None:
    """Command line: ``prepare --config prepare.yaml`` (every argument of :func:`prepare` as a key)."""
    from argparse import ArgumentError

    from lit_transfusion.cli import _one_line

    parser = prepare_parser()
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    kwargs = parser.instantiate_classes(ns).as_dict()
    kwargs.pop("config", None)
    try:
        prepare(**kwargs)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

