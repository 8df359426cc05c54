"""The ``interleaved`` kind: OBELICS-style ``.jsonl`` (or a directory of them), a document per line
``{"texts": [...], "images": [...]}`` with images as paths relative to the ``.jsonl``; key ``file:line``."""

from __future__ import annotations

import functools
import os

from datamodules.files.decode import BadSample
from datamodules.files.records import Record, Skips
from datamodules.files.sources.config import SourceConfig
from datamodules.files.sources.obelics import check_layout, to_segments
from datamodules.files.sources.reader import Reader, scanned_units
from datamodules.files.sources.reading import decode_line, file_image, file_key, files, lines
from datamodules.files.sources.split import Splitter
from datamodules.files.sources.units import Unit


def scan(cfg: SourceConfig, root: str, sp: Splitter) -> list[Record]:
    out: list[Record] = []
    for file in files(cfg, root, (".jsonl",)):
        folder, fkey = os.path.dirname(os.path.abspath(file)), file_key(file, root)
        for no, raw in lines(file):
            if not raw.strip():
                continue
            key, where = f"{fkey}:{no}", f"{file}:{no}"
            if not sp.mine(key):
                continue
            doc, reason = decode_line(raw)
            try:
                texts, images = check_layout(doc)
                if reason is not None:
                    raise BadSample(reason)
                segments = to_segments(texts, images, functools.partial(file_image, folder))
            except BadSample as e:
                sp.skip(key, e.reason, e.detail if e.reason == "missing_file" else where)
                continue
            out.append(Record("interleaved", key, segments))
    return out


def units(cfg: SourceConfig, split: str, skips: Skips) -> list[Unit]:
    return scanned_units(cfg, split, skips, scan)


READER = Reader(units, record_kind="interleaved")
