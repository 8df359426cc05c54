"""The VAE check: how well the configured VAE reconstructs a source's own training images (PSNR), kept on disk so
a rerun with the same settings does not reconstruct again."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from datamodules.files.decode import BadSample
from datamodules.files.prepare.encode import decode_image
from datamodules.files.prepare.settings import Settings
from datamodules.files.records import ImageRef, Skips
from datamodules.files.sources import SourceConfig, read_source


def _first_images(src: SourceConfig, settings: Settings, n: int) -> np.ndarray:
    """uint8 ``[n', S, S, 3]``: the first ``n`` training images of ``src`` that decode, decoded as the stored
    ones are (``n' < n`` when the source has fewer; bad images are passed over, the splits count them)."""
    images = []
    for unit in read_source(src, "train", Skips()):
        for record in unit.records(Skips()):
            for ref in record.segments:
                if not isinstance(ref, ImageRef):
                    continue
                try:
                    images.append(decode_image(ref, settings))
                except BadSample:
                    continue
                if len(images) == n:
                    return np.stack(images)
    size = settings.image_size
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


class LazyCodec:
    """The VAE in this process (a ``LatentCodec``), loaded at the first call: a rerun whose checks are all done
    never loads it."""

    def __init__(self, vae_path: str):
        self.vae_path, self._codec = vae_path, None

    def __call__(self):
        if self._codec is None:
            from lit_transfusion.vae import LatentCodec

            self._codec = LatentCodec.from_dir(self.vae_path)
        return self._codec


def vae_check(src: SourceConfig, settings: Settings, digest: str, out: Path, n: int,
              codec: LazyCodec) -> tuple[float | None, int]:
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
