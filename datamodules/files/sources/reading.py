"""Reading helpers the file readers share: JSON lines read as bytes (a bad line is a skip reason, not an error),
caption fields, the files of a source path, and the error for a path that does not exist."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from datamodules.files.decode import BadSample, clean_caption
from datamodules.files.records import ImageRef
from datamodules.files.sources.config import SourceConfig


def missing(cfg: SourceConfig, path: str, what: str = "path") -> FileNotFoundError:
    return FileNotFoundError(f"source {cfg.name!r} ({cfg.kind}): {what} {path!r} does not exist")


def decode_line(raw: bytes) -> tuple[object, str | None]:
    """A jsonl line -> (parsed JSON, the skip reason or None). A line that is not UTF-8 but parses once decoded
    with ``surrogateescape`` is "non_utf8_caption" (its JSON is returned, so a key can still be read);
    anything else that does not parse is "malformed_json"."""
    try:
        text, reason = raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text, reason = raw.decode("utf-8", "surrogateescape"), "non_utf8_caption"
    try:
        return json.loads(text), reason
    except ValueError:
        return None, "malformed_json"


def lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its line ending) of a file, read as bytes; a UTF-8 byte order
    mark at the start of the file (Windows editors write one) is dropped."""
    with open(path, "rb") as f:
        for no, line in enumerate(f, start=1):
            if no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            yield no, line.rstrip(b"\r\n")


def captions(value: object) -> list[str]:
    """A caption field (str or list of str) -> the cleaned captions; empty list entries are dropped when at
    least one remains. Raises BadSample ("malformed_json" for a field that is neither, "non_utf8_caption" if
    no entry survives and one was not UTF-8, else "empty_caption")."""
    if value is None or isinstance(value, str):
        return [clean_caption(value)]
    if not isinstance(value, list):
        raise BadSample("malformed_json", f"caption is a {type(value).__name__}")
    out, reasons = [], set()
    for v in value:
        try:
            out.append(clean_caption(v))
        except BadSample as e:
            reasons.add(e.reason)
    if not out:
        raise BadSample("non_utf8_caption" if "non_utf8_caption" in reasons else "empty_caption", "no caption left")
    return out


def file_image(folder: str, name: str) -> ImageRef:
    """An image file named relative to ``folder``; raises BadSample("missing_file") when it is not there."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise BadSample("missing_file", path)
    return ImageRef(name=path, path=path)


def files(cfg: SourceConfig, path: str, suffixes: tuple[str, ...]) -> list[str]:
    """``path`` itself if a file, else the files in it (not recursive) with one of ``suffixes``, sorted."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
        if not found:
            raise FileNotFoundError(f"source {cfg.name!r} ({cfg.kind}): no {'/'.join(suffixes)} file in {path!r}")
        return found
    raise missing(cfg, path)


def file_key(path: str, root: str) -> str:
    """The file part of a ``file:line`` key: the path relative to the source folder (its base name for a
    single file), so keys (and the val_fraction split) do not change when the data set moves."""
    return os.path.basename(path) if os.path.isfile(root) else os.path.relpath(path, root)
