"""The ``text`` kind: ``.txt`` (a document per line, or per blank-line-separated block with
``text_split: paragraph``) / ``.jsonl`` (the ``text_column`` field), or a directory of them; key ``file:line``."""

from __future__ import annotations

from collections.abc import Iterator

from datamodules.files.decode import BadSample, clean_caption
from datamodules.files.records import Record, Skips
from datamodules.files.sources.config import SourceConfig
from datamodules.files.sources.reader import Reader, scanned_units
from datamodules.files.sources.reading import decode_line, file_key, files, lines
from datamodules.files.sources.split import Splitter
from datamodules.files.sources.units import Unit


def _jsonl_docs(cfg: SourceConfig, file: str) -> Iterator[tuple[int, str | None, str | None]]:
    for no, raw in lines(file):
        if not raw.strip():
            continue
        obj, reason = decode_line(raw)
        if reason == "malformed_json" or not isinstance(obj, dict):
            yield no, None, "malformed_json"
        elif reason is not None:
            yield no, None, reason
        else:
            value = obj.get(cfg.text_column)
            if value is not None and not isinstance(value, str):
                yield no, None, "malformed_json"
            else:
                yield no, value if value is not None else "", None


def _txt_docs(cfg: SourceConfig, file: str) -> Iterator[tuple[int, str | None, str | None]]:
    # decoded line by line (a non-UTF-8 line spoils only its own document); blank lines separate paragraphs
    block: list[str | None] = []
    start = 0
    for no, raw in lines(file):
        try:
            line: str | None = raw.decode("utf-8")
            blank = not line.split()
        except UnicodeDecodeError:
            line, blank = None, False
        if cfg.text_split == "line":
            if not blank:
                yield no, line, None if line is not None else "non_utf8_caption"
            continue
        if not blank:
            start = start if block else no
            block.append(line)
        elif block:
            yield start, *_paragraph(block)
            block = []
    if block:
        yield start, *_paragraph(block)


def _paragraph(block: list[str | None]) -> tuple[str | None, str | None]:
    if any(line is None for line in block):
        return None, "non_utf8_caption"
    return "\n".join(block), None  # type: ignore[arg-type]


def _docs(cfg: SourceConfig, file: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, raw text or None, skip reason or None) of each document of one text file."""
    return _jsonl_docs(cfg, file) if file.lower().endswith(".jsonl") else _txt_docs(cfg, file)


def scan(cfg: SourceConfig, root: str, sp: Splitter) -> list[Record]:
    out: list[Record] = []
    for file in files(cfg, root, (".txt", ".jsonl")):
        fkey = file_key(file, root)
        for no, raw, reason in _docs(cfg, file):
            key, where = f"{fkey}:{no}", f"{file}:{no}"
            if not sp.mine(key):
                continue
            try:
                if reason is not None:
                    raise BadSample(reason)
                text = clean_caption(raw, keep_newlines=True)
            except BadSample as e:
                sp.skip(key, e.reason, where)
                continue
            out.append(Record("text", key, [text]))
    return out


def units(cfg: SourceConfig, split: str, skips: Skips) -> list[Unit]:
    return scanned_units(cfg, split, skips, scan)


READER = Reader(units, record_kind="text")
