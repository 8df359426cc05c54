"""The ``prepare`` function: check the settings, decide each source's validation split, get the tokenizer, write
every (source, split), run the VAE check, then write the manifest and print the report."""

from __future__ import annotations

import os
import time
from pathlib import Path

from datamodules.files.prepare.checks import check_held_out_and_vae, check_settings
from datamodules.files.prepare.errors import PrepareError
from datamodules.files.prepare.report import counts, report
from datamodules.files.prepare.settings import Settings, files_sha1
from datamodules.files.prepare.tokenizer import prepare_tokenizer
from datamodules.files.prepare.vae_check import LazyCodec, vae_check
from datamodules.files.prepare.validation import with_validation
from datamodules.files.prepare.write import write_split
from datamodules.files.records import Skips
from datamodules.files.schema import TOKENIZER, Manifest, SourceInfo
from datamodules.files.sources import READERS, SourceConfig

SPLITS = ("train", "val")


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
    """Prepare ``sources`` into ``out_dir`` (see ``datamodules.files.prepare``); returns the manifest written.

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
    check_settings(sources, vae_path, image_size, seq_len, patch_size)
    check_held_out_and_vae(val_fraction, min_val_samples, vae_psnr_images)
    resolved = [with_validation(s, val_fraction, min_val_samples) for s in sources]
    sources, validation = [s for s, _ in resolved], [where for _, where in resolved]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_file, origin = prepare_tokenizer(sources, out, tokenizer_path, bpe_vocab_size, bpe_texts)
    threads = max(1, (os.cpu_count() or 1) // max(num_workers, 1))
    settings = Settings(vae_path=str(Path(vae_path).resolve()), tokenizer_file=str(tokenizer_file),
                        image_size=image_size, seq_len=seq_len, patch_size=patch_size, flip=flip,
                        min_image_size=min_image_size, max_aspect_ratio=max_aspect_ratio,
                        background=tuple(background), encode_batch=encode_batch, threads=threads)
    digest = settings.digest()
    infos: dict[str, SourceInfo] = {}
    codec = LazyCodec(settings.vae_path)
    for src, where in zip(sources, validation, strict=True):
        record_kind = READERS[src.kind].record_kind
        info = infos[src.name] = SourceInfo(kind=record_kind, validation=where,
                                            val_fraction=src.held_out if where == "held_out" else 0.0)
        skips, notes = Skips(), Skips()
        for split in SPLITS:
            done = write_split(src, split, out, settings, digest, num_workers, chunk_bytes)
            if done is None:
                continue
            split_info, split_skips, split_notes = done
            skips.merge(split_skips)
            notes.merge(split_notes)
            if split_info.samples:
                info.splits[split] = split_info
        info.skipped, info.notes = dict(skips.counts), dict(notes.counts)
        info.examples = {**skips.examples, **notes.examples}
        if record_kind != "text" and vae_psnr_images:  # a source with images
            info.vae_psnr, info.vae_psnr_images = vae_check(src, settings, digest, out, vae_psnr_images, codec)
    manifest = Manifest(
        image_size=image_size, latent_shape=list(settings.latent_shape()),
        vae_path=settings.vae_path, vae_sha1=files_sha1(Path(vae_path), ("config.json", "*.safetensors", "*.bin")),
        tokenizer_sha1=files_sha1(out, (TOKENIZER,)), tokenizer_origin=origin, seq_len=seq_len,
        patch_size=patch_size, flip=flip, sources=infos,
    )
    manifest.write(out)
    print(report(manifest, time.perf_counter() - start, vae_min_psnr))
    empty = [name for name, info in infos.items() if "train" not in info.splits]
    if empty:
        raise PrepareError("; ".join(
            f"source {name!r} ({next(s.path for s in sources if s.name == name)}) has no valid training sample"
            + (f" (skipped: {counts(infos[name].skipped)})" if infos[name].skipped else "") for name in empty))
    return manifest
