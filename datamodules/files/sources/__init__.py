"""Source readers: a :class:`SourceConfig` (one user data set) -> picklable work :class:`Unit` s that yield raw
:class:`~datamodules.files.records.Record` s, with bad samples counted by reason in a
:class:`~datamodules.files.records.Skips`.

Formats (``SourceConfig.kind``; one module each, named in ``registry.READERS``):

imagefolder   Hugging Face layout: ``path/train/metadata.jsonl`` with the images beside it, and an optional
              validation folder (the first of ``validation/``, ``val/``, ``test/``); or a flat
              ``path/metadata.jsonl`` split by ``val_fraction``. A line:
              ``{"file_name": "relative/to/the/metadata/folder.png", "text": "a caption" | ["c1", "c2"]}``.
webdataset    tar shards: a path, a directory of ``*.tar``, a brace pattern (``data/{000000..000003}.tar``) or a
              URL / ``pipe:`` command (``webdataset.gopen``). Members sharing a key form a sample: an image
              (jpg|jpeg|png|webp) with ``txt`` or ``json[caption_column]`` -> a pair; a ``json`` with ``texts``
              and ``images`` (OBELICS layout; an images entry "0.png" is the member ``<key>.0.png``) ->
              an interleaved document.
interleaved   OBELICS-style ``.jsonl`` (or a directory of them): ``{"texts": [...], "images": [...]}``, parallel
              lists with exactly one non-null per position; images are paths relative to the ``.jsonl``.
text          ``.txt`` (a document per line, or per blank-line-separated block) / ``.jsonl`` (``text_column``),
              or a directory of them.

Validation data: ``val_path`` (same format), else the imagefolder validation folder, else ``val_fraction`` of the
samples chosen by a stable hash of the sample key (the same split on every run and machine). ``val_fraction`` None
(unset) reads as 0 here; ``prepare`` replaces it with its default held-out share (:func:`own_validation` tells
which sources have validation data of their own).

Each bad sample is skipped for exactly one reason, the first that applies in the order ``malformed_json``,
``duplicate_file_name``, ``non_utf8_caption``, ``empty_caption``, ``missing_file``. Calling :func:`read_source`
for "train" and then for "val" counts each bad sample once: under ``val_fraction`` a skip goes to the split its
key hashes to (a line without a usable key, and a shard-level tar error, to "train").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from datamodules.files.records import Skips
from datamodules.files.sources.config import SourceConfig
from datamodules.files.sources.registry import KINDS, READERS
from datamodules.files.sources.split import in_val, key_position
from datamodules.files.sources.units import UNIT_SIZE, RecordsUnit, Unit
from datamodules.files.sources.webdataset import ShardUnit, expand_shards, shard_name

__all__ = ["KINDS", "READERS", "UNIT_SIZE", "RecordsUnit", "ShardUnit", "SourceConfig", "Unit", "caption_corpus",
           "expand_shards", "in_val", "key_position", "own_validation", "read_source", "shard_name"]


def read_source(cfg: SourceConfig, split: Literal["train", "val"], skips: Skips) -> list[Unit]:
    """Scan one split of a source into work units, counting scan-time skips into ``skips`` (webdataset: none;
    its shards are read in ``Unit.records``). "val" is ``[]`` when the source has no validation data.
    Raises FileNotFoundError naming the source when its path (or val_path) does not exist."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return READERS[cfg.kind].units(cfg, split, skips)


def own_validation(cfg: SourceConfig) -> str | None:
    """Where the source's validation data of its own is: "val_path", the imagefolder validation folder
    (``"folder <name>/"``, only beside a ``train/`` folder), or None (only a held-out share can validate)."""
    if cfg.val_path is not None:
        return "val_path"
    return READERS[cfg.kind].val_folder(cfg)


def caption_corpus(cfg: SourceConfig, limit: int | None = None) -> Iterator[str]:
    """The train split's cleaned captions and texts (every alternative caption of a pair, every text segment
    of a document), for training a BPE tokenizer; bad samples are silently left out. At most ``limit``
    strings. Webdataset shards are read without keeping image bytes."""
    if limit is not None and limit <= 0:
        return
    n = 0
    for unit in read_source(cfg, "train", Skips()):
        for record in unit.text_records(Skips()):
            texts = record.captions if record.kind == "pair" else [s for s in record.segments if isinstance(s, str)]
            for t in texts:
                yield t
                n += 1
                if limit is not None and n >= limit:
                    return
