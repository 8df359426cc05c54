"""The ``webdataset`` kind: tar shards (a path, a directory of ``*.tar``, a brace pattern
``data/{000000..000003}.tar``, or a URL / ``pipe:`` command). Members sharing a key form a sample: an image
(jpg|jpeg|png|webp) with ``txt`` or ``json[caption_column]`` -> a pair; a ``json`` with ``texts`` and ``images``
(OBELICS layout; an images entry "0.png" is the member ``<key>.0.png``) -> an interleaved document. Each shard is
one work unit, read in the worker; the key is ``shard:key``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from datamodules.files.decode import BadSample, clean_caption
from datamodules.files.records import ImageRef, Record, Skips
from datamodules.files.sources.config import SourceConfig
from datamodules.files.sources.obelics import check_layout, to_segments
from datamodules.files.sources.reader import Reader
from datamodules.files.sources.reading import captions, decode_line, missing
from datamodules.files.sources.split import in_val
from datamodules.files.sources.tar import is_url, tar_samples
from datamodules.files.sources.units import Unit

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # pair samples: the first present is the image
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def shard_name(shard: str) -> str:
    """The shard's name in keys and reports: its base name (``pipe:`` commands: the last word's)."""
    tail = shard.rsplit(" ", 1)[-1] if shard.startswith("pipe:") else shard
    return os.path.basename(urlparse(tail).path if is_url(tail) else tail) or shard


@dataclass
class ShardUnit(Unit):
    """One WebDataset shard, read in ``records``. ``val_fraction`` > 0: the split is decided per sample key
    (samples of the other split are passed over without a count). ``count_shard_errors``: whether a shard that
    cannot be read counts here (False for the val unit of a shard both splits read)."""

    source: str
    split: str
    shard: str
    caption_column: str = "text"
    val_fraction: float = 0.0
    count_shard_errors: bool = True

    @property
    def shard_name(self) -> str:
        return shard_name(self.shard)

    def records(self, skips: Skips) -> Iterator[Record]:
        return _records(self, skips, want_images=True)

    def text_records(self, skips: Skips) -> Iterator[Record]:
        return _records(self, skips, want_images=False)  # the image bytes stay in the tar


def expand_shards(cfg: SourceConfig, pattern: str) -> list[str]:
    """A shard spec -> shard paths/URLs: brace patterns expanded (``braceexpand``), a local directory -> its
    ``*.tar`` (``.tar.gz``, ``.tgz``) files, sorted. Raises FileNotFoundError (naming the source) when no local
    shard exists; some missing shards are left in and counted as unreadable when read."""
    from braceexpand import braceexpand

    shards: list[str] = []
    for s in braceexpand(pattern):
        if not is_url(s) and os.path.isdir(s):
            shards += sorted(str(p) for p in Path(s).iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
        else:
            shards.append(s)
    local = [s for s in shards if not is_url(s)]
    if not shards:
        raise FileNotFoundError(f"source {cfg.name!r} (webdataset): no {'/'.join(TAR_SUFFIXES)} shard in {pattern!r}")
    if len(local) == len(shards) and not any(os.path.isfile(s) for s in local):
        raise missing(cfg, pattern)
    return shards


def _json_member(data: bytes) -> dict:
    obj, reason = decode_line(data)
    if reason == "malformed_json" or not isinstance(obj, dict):
        raise BadSample("malformed_json", "json member")
    if reason is not None:
        raise BadSample(reason, "json member")
    return obj


def _sample(unit: ShardUnit, key: str, members: dict[str, bytes | None]) -> Record:
    """One tar sample -> a pair or interleaved Record; raises BadSample."""
    shard = unit.shard_name
    meta = _json_member(members["json"] or b"") if "json" in members else None
    if meta is not None and ("texts" in meta or "images" in meta):
        texts, images = check_layout(meta)

        def member(name: str) -> ImageRef:
            ext = name.lower()
            if ext not in members:
                raise BadSample("missing_file", f"{shard}:{key}.{name}")
            return ImageRef(name=f"{shard}:{key}.{ext}", data=members[ext])

        return Record("interleaved", f"{shard}:{key}", to_segments(texts, images, member))
    if "txt" in members:
        caps = [clean_caption(members["txt"] or b"")]
    elif meta is not None:
        caps = captions(meta.get(unit.caption_column))
    else:
        raise BadSample("empty_caption", f"{shard}:{key}: no txt or json member")
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise BadSample("missing_file", f"{shard}:{key}: no {'/'.join(IMAGE_EXTS)} member")
    return Record("pair", f"{shard}:{key}", [ImageRef(name=f"{shard}:{key}.{ext}", data=members[ext])], caps)


def _records(unit: ShardUnit, skips: Skips, want_images: bool) -> Iterator[Record]:
    def unreadable(e: Exception) -> None:
        if unit.count_shard_errors:
            skips.add("unreadable_tar_member", f"{unit.shard_name}: {type(e).__name__}: {e}")

    seen: set[str] = set()
    shard = unit.shard_name
    for key, members in tar_samples(unit.shard, unreadable, unread=() if want_images else IMAGE_EXTS):
        rkey = f"{shard}:{key}"
        mine = unit.val_fraction <= 0.0 or in_val(rkey, unit.val_fraction) == (unit.split == "val")
        if key in seen:
            if mine:
                skips.add("duplicate_file_name", rkey)
            continue
        seen.add(key)
        if not mine:
            continue
        try:
            record = _sample(unit, key, members)
        except BadSample as e:
            skips.add(e.reason, e.detail if e.reason == "missing_file" else rkey)
            continue
        yield record


def units(cfg: SourceConfig, split: str, skips: Skips) -> list[Unit]:
    """One unit per shard; skips are counted when the shards are read (``ShardUnit.records``), none here."""
    if split == "train":
        fraction = 0.0 if cfg.val_path is not None else cfg.held_out
        return [ShardUnit(cfg.name, "train", s, cfg.caption_column, fraction) for s in expand_shards(cfg, cfg.path)]
    if cfg.val_path is not None:
        return [ShardUnit(cfg.name, "val", s, cfg.caption_column) for s in expand_shards(cfg, cfg.val_path)]
    if cfg.held_out > 0.0:  # the train shards again: each sample goes to one split by its key's hash
        return [ShardUnit(cfg.name, "val", s, cfg.caption_column, cfg.held_out, count_shard_errors=False)
                for s in expand_shards(cfg, cfg.path)]
    return []


READER = Reader(units, record_kind="pair")
