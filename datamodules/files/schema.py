"""What ``prepare`` writes and training reads: one stored sample per caption/image pair, interleaved document
(piece) or text document (chunk), plus ``manifest.json`` describing the whole prepared directory.

A stored sample (a litdata item; every field has the same type in every sample of a dataset):

    key       str                     where it came from (file name, tar key, line number), for reports
    kind      int                     PAIR, INTERLEAVED or TEXT
    tokens    int32 [T]               every text token id of the sample, concatenated (no special tokens)
    segments  int32 [S]               PAIR: the length of each alternative caption (one is drawn per use);
                                      INTERLEAVED: a text length (>= 0) or IMAGE (-1, the next image), in order;
                                      TEXT: one length
    mean      float16 [N, F, C, h, w] standardized latent mean of each image (F = 2: the image and its
                                      horizontal flip, F = 1 when flips are off); N = 0 for text
    logvar    float16 [N, F, C, h, w] standardized latent log-variance (training samples mean + std * noise)
    pixels    uint8 [N, H, W, 3]      validation splits only: the decoded images (FID reference, grids)

Lengths are guaranteed at prepare time: every document a sample can become (with ``<bos>``, ``<eos>``,
``<boi>``/``<eoi>`` and ``(h/p)(w/p)`` patches per image at the prepared ``patch_size``) fits ``seq_len``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PAIR, INTERLEAVED, TEXT = 0, 1, 2
KINDS = {"pair": PAIR, "interleaved": INTERLEAVED, "text": TEXT}
IMAGE = -1  # a segment that is the next image (INTERLEAVED)
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 2


@dataclass
class Sample:
    """One stored sample, decoded (see the module docstring for the fields)."""

    key: str
    kind: int
    tokens: np.ndarray
    segments: np.ndarray
    mean: np.ndarray
    logvar: np.ndarray
    pixels: np.ndarray | None = None

    def to_item(self) -> dict:
        """The litdata item (``pixels`` only when present: validation splits)."""
        item = {
            "key": self.key, "kind": int(self.kind),
            "tokens": np.asarray(self.tokens, dtype=np.int32), "segments": np.asarray(self.segments, dtype=np.int32),
            "mean": np.asarray(self.mean, dtype=np.float16), "logvar": np.asarray(self.logvar, dtype=np.float16),
        }
        if self.pixels is not None:
            item["pixels"] = np.asarray(self.pixels, dtype=np.uint8)
        return item

    @classmethod
    def from_item(cls, item: dict) -> Sample:
        return cls(key=item["key"], kind=int(item["kind"]), tokens=np.asarray(item["tokens"]),
                   segments=np.asarray(item["segments"]), mean=np.asarray(item["mean"]),
                   logvar=np.asarray(item["logvar"]), pixels=item.get("pixels"))

    def texts(self) -> list[np.ndarray]:
        """The token ids of each text segment (PAIR: each alternative caption), in order."""
        out, start = [], 0
        for n in self.segments:
            if n >= 0:
                out.append(self.tokens[start : start + n])
                start += n
        return out

    @property
    def num_images(self) -> int:
        return int(self.mean.shape[0])


def max_positions(sample: Sample, patches_per_image: int) -> int:
    """Positions of the longest document ``sample`` can become: ``<bos> ... <eos>`` with each image as
    ``<boi> patches <eoi>`` (PAIR: the longest caption; the image-first layout has the same length)."""
    image = patches_per_image + 2
    if sample.kind == PAIR:
        return 2 + int(sample.segments.max(initial=0)) + image
    texts = int(sample.segments[sample.segments >= 0].sum())
    return 2 + texts + image * int((sample.segments == IMAGE).sum())


@dataclass
class SplitInfo:
    """One split of one source: its litdata directory (relative to the prepared root) and what it holds."""

    dir: str
    samples: int
    images: int
    tokens: int
    # Text tokens one use of each sample puts in a row, summed (a PAIR sample stores several captions and uses
    # one): what sizes a batch in documents. 0 in directories written before it was recorded.
    tokens_per_use: int = 0


@dataclass
class SourceInfo:
    """What ``prepare`` made of one source: its kind, its splits, the samples it skipped by reason, the samples
    it wrote changed (truncated caption, split document), the first few offending paths per reason, where its
    validation split came from and how well the VAE reconstructs its images.

    The fields after ``examples`` have defaults: manifests written before them still load (validation "",
    vae_psnr None: not recorded)."""

    kind: str
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)  # written, but changed: caption_truncated, document_split
    examples: dict[str, list[str]] = field(default_factory=dict)
    # "val_path", "folder <name>/", "held_out" (val_fraction of the keys, by hash) or "none" (val_fraction 0)
    validation: str = ""
    val_fraction: float = 0.0  # "held_out": the share of key positions held out (default, raised to a minimum)
    vae_psnr: float | None = None  # dB, mean over the first vae_psnr_images training images (None: no images)
    vae_psnr_images: int = 0


@dataclass
class Manifest:
    """``manifest.json`` of a prepared directory: how its samples were made (training checks it matches)."""

    image_size: int
    latent_shape: list[int]
    vae_path: str
    vae_sha1: str
    tokenizer_sha1: str
    tokenizer_origin: str  # "bpe:<vocab size>" (trained on the sources) or the tokenizer.json it was copied from
    seq_len: int
    patch_size: int
    flip: bool
    sources: dict[str, SourceInfo] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def write(self, root: str | Path) -> None:
        path = Path(root) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, root: str | Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist: expected a directory written by "
                "`python -m lit_transfusion prepare --config ...`"
            )
        raw = json.loads(path.read_text())
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} has format version {raw.get('version')}, this code reads "
                             f"{FORMAT_VERSION}: prepare the data again")
        sources = {}
        for name, s in raw.pop("sources").items():
            splits = {k: SplitInfo(**v) for k, v in s.pop("splits").items()}
            sources[name] = SourceInfo(splits=splits, **s)
        return cls(sources=sources, **raw)
