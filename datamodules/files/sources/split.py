"""The held-out split by sample key: a stable position per key, and the routing of scanned records and skips to
the split asked for (so that reading "train" then "val" counts each bad sample once)."""

from __future__ import annotations

import hashlib

from datamodules.files.records import Skips


def key_position(key: str) -> float:
    """A stable number in [0, 1) for a sample key (blake2b of the key): the same on every run, process and
    machine. A key is in the held-out ``fraction`` when its position is below it."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def in_val(key: str, fraction: float) -> bool:
    """Whether ``key`` belongs to the held-out ``fraction``: a stable hash (blake2b) of the key, not random, so
    every run, process and machine splits alike."""
    if fraction <= 0.0:
        return False
    return key_position(key) < fraction


class Splitter:
    """Routes scanned records and skips to the requested split: everything (explicit val data or train data
    without val_fraction), or by key hash under ``val_fraction``."""

    def __init__(self, split: str, fraction: float, skips: Skips):
        self.split, self.fraction, self.skips = split, fraction, skips

    def mine(self, key: str | None) -> bool:
        if self.fraction <= 0.0:
            return True
        if key is None:  # no usable key: count with train
            return self.split == "train"
        return in_val(key, self.fraction) == (self.split == "val")

    def skip(self, key: str | None, reason: str, where: str) -> None:
        if self.mine(key):
            self.skips.add(reason, where)
