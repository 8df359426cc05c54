"""What every worker needs to turn raw records into stored samples (:class:`Settings`), and the digest that tells
a rerun whether a split it finds on disk was written the same way."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from datamodules.files.schema import FORMAT_VERSION


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
        d["vae"] = files_sha1(Path(self.vae_path), ("config.json", "*.safetensors", "*.bin"))
        d["tokenizer"] = files_sha1(Path(self.tokenizer_file).parent, (Path(self.tokenizer_file).name,))
        d["format"] = FORMAT_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one image's latents through the VAE."""
        from lit_transfusion.vae import vae_latent_shape

        return vae_latent_shape(self.vae_path, self.image_size)


def files_sha1(root: Path, patterns: tuple[str, ...]) -> str:
    """One SHA-1 over the contents of the files of ``root`` matching ``patterns`` (in sorted order)."""
    digest = hashlib.sha1()
    for pattern in patterns:
        for f in sorted(root.glob(pattern)):
            digest.update(f.read_bytes())
    return digest.hexdigest()
