"""What a source kind provides (:class:`Reader`), and the split routing the kinds scanned file by file share
(:func:`scanned_units`: train, an explicit ``val_path``, or a held-out share by key hash)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from datamodules.files.records import Record, Skips
from datamodules.files.sources.config import SourceConfig
from datamodules.files.sources.reading import missing
from datamodules.files.sources.split import Splitter
from datamodules.files.sources.units import Unit, chunk


def no_folder(cfg: SourceConfig) -> str | None:
    return None


@dataclass(frozen=True)
class Reader:
    """One source kind.

    units          (config, "train" | "val", skips) -> the split's work units, counting scan-time skips; ``[]``
                   when the source has no data for the split
    record_kind    what its records are ("pair" | "interleaved" | "text"): ``prepare`` names a source by it and
                   checks the VAE on every kind but "text"
    val_folder     (config) -> validation data of the source's own besides ``val_path`` (e.g. ``"folder val/"``),
                   or None
    """

    units: Callable[[SourceConfig, str, Skips], list[Unit]]
    record_kind: str
    val_folder: Callable[[SourceConfig], str | None] = no_folder


def scanned_units(cfg: SourceConfig, split: str, skips: Skips,
                  scan: Callable[[SourceConfig, str, Splitter], list[Record]]) -> list[Unit]:
    """One split of a source read by ``scan(cfg, root, splitter)`` (a file or a folder of them): the train data,
    ``val_path`` for "val", or the train data's held-out share under ``val_fraction``."""
    if not os.path.exists(cfg.path):
        raise missing(cfg, cfg.path)
    if split == "train":
        fraction = 0.0 if cfg.val_path is not None else cfg.held_out
        return chunk(cfg.name, split, scan(cfg, cfg.path, Splitter("train", fraction, skips)))
    if cfg.val_path is not None:
        if not os.path.exists(cfg.val_path):
            raise missing(cfg, cfg.val_path, "val_path")
        return chunk(cfg.name, split, scan(cfg, cfg.val_path, Splitter("val", 0.0, skips)))
    if cfg.held_out > 0.0:
        return chunk(cfg.name, split, scan(cfg, cfg.path, Splitter("val", cfg.held_out, skips)))
    return []
