"""The ``imagefolder`` kind, Hugging Face layout: ``path/train/metadata.jsonl`` with the images beside it and an
optional validation folder (the first of ``validation/``, ``val/``, ``test/``), or a flat ``path/metadata.jsonl``
split by ``val_fraction``. A line: ``{"file_name": "relative/to/the/metadata/folder.png", "text": "a caption" |
["c1", "c2"]}``; the key is the file name."""

from __future__ import annotations

import os

from datamodules.files.decode import BadSample
from datamodules.files.records import ImageRef, Record, Skips
from datamodules.files.sources.config import SourceConfig
from datamodules.files.sources.reader import Reader
from datamodules.files.sources.reading import captions, decode_line, lines, missing
from datamodules.files.sources.split import Splitter
from datamodules.files.sources.units import Unit, chunk

VAL_FOLDERS = ("validation", "val", "test")  # the first one found is the validation split
METADATA = "metadata.jsonl"


def _val_dir(root: str) -> str | None:
    """The validation folder beside ``root/train/`` (None for a flat folder: it splits by ``val_fraction``)."""
    if not os.path.isdir(os.path.join(root, "train")):
        return None
    return next((os.path.join(root, d) for d in VAL_FOLDERS if os.path.isdir(os.path.join(root, d))), None)


def val_folder(cfg: SourceConfig) -> str | None:
    """``"folder <name>/"`` when the source has a validation folder of its own, else None."""
    found = _val_dir(cfg.path)
    return None if found is None else f"folder {os.path.basename(found)}/"


def _metadata(cfg: SourceConfig, root: str) -> str:
    """The metadata.jsonl of an imagefolder (sub-)folder (or the file itself)."""
    if os.path.isfile(root):
        return root
    meta = os.path.join(root, METADATA)
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"source {cfg.name!r} (imagefolder): {meta!r} does not exist: expected a folder "
                                f"with {METADATA} (lines {{\"file_name\": ..., \"{cfg.caption_column}\": ...}})")
    return meta


def _scan(cfg: SourceConfig, meta: str, sp: Splitter) -> list[Record]:
    folder = os.path.dirname(os.path.abspath(meta))
    seen: set[str] = set()
    out: list[Record] = []
    for no, raw in lines(meta):
        if not raw.strip():
            continue
        where = f"{meta}:{no}"
        obj, reason = decode_line(raw)
        name = obj.get("file_name") if isinstance(obj, dict) else None
        if reason == "malformed_json" or not isinstance(name, str) or not name:
            sp.skip(None, "malformed_json", where)
            continue
        norm = os.path.normpath(name)
        if norm in seen:
            sp.skip(name, "duplicate_file_name", f"{where} ({name})")
            continue
        seen.add(norm)
        if not sp.mine(name):
            continue
        if reason is not None:
            sp.skip(name, reason, where)
            continue
        try:
            caps = captions(obj.get(cfg.caption_column))
        except BadSample as e:
            sp.skip(name, e.reason, f"{where} ({name})")
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            sp.skip(name, "missing_file", path)
            continue
        out.append(Record("pair", name, [ImageRef(name=path, path=path)], caps))
    return out


def _records(cfg: SourceConfig, split: str, skips: Skips) -> list[Record]:
    root = cfg.path
    if not os.path.exists(root):
        raise missing(cfg, root)
    train_dir = os.path.join(root, "train")
    layered = os.path.isdir(train_dir)
    val_dir = _val_dir(root)
    if split == "train":
        meta = _metadata(cfg, train_dir if layered else root)
        explicit_val = cfg.val_path is not None or val_dir is not None
        return _scan(cfg, meta, Splitter("train", 0.0 if explicit_val else cfg.held_out, skips))
    if cfg.val_path is not None:
        if not os.path.exists(cfg.val_path):
            raise missing(cfg, cfg.val_path, "val_path")
        return _scan(cfg, _metadata(cfg, cfg.val_path), Splitter("val", 0.0, skips))
    if val_dir is not None:
        return _scan(cfg, _metadata(cfg, val_dir), Splitter("val", 0.0, skips))
    if cfg.held_out > 0.0:
        meta = _metadata(cfg, train_dir if layered else root)
        return _scan(cfg, meta, Splitter("val", cfg.held_out, skips))
    return []


def units(cfg: SourceConfig, split: str, skips: Skips) -> list[Unit]:
    return chunk(cfg.name, split, _records(cfg, split, skips))


READER = Reader(units, record_kind="pair", val_folder=val_folder)
