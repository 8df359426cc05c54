"""The held-out validation split of each source: where its validation data comes from, and the share held out by
key hash when it has none of its own (raised to a minimum count, so a small folder still validates)."""

from __future__ import annotations

import dataclasses
import math

from datamodules.files.prepare.errors import PrepareError
from datamodules.files.records import Skips
from datamodules.files.sources import SourceConfig, key_position, own_validation, read_source


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
