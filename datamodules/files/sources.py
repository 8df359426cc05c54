"""Source readers: a :class:`SourceConfig` (one user data set) -> picklable work :class:`Unit` s that yield raw
:class:`~datamodules.files.records.Record` s, with bad samples counted by reason in a
:class:`~datamodules.files.records.Skips`.

Formats (``SourceConfig.kind``):

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

import functools
import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from datamodules.files.decode import BadSample, clean_caption
from datamodules.files.records import ImageRef, Record, Skips

UNIT_SIZE = 256  # records per Unit (non-webdataset sources)
VAL_FOLDERS = ("validation", "val", "test")  # imagefolder: the first one found is the validation split
METADATA = "metadata.jsonl"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # webdataset pair samples: the first present is the image
KINDS = ("imagefolder", "webdataset", "interleaved", "text")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class SourceConfig:
    """One source of user data.

    name            unique; names the output sub-directory and the source in reports
    kind            "imagefolder" | "webdataset" | "interleaved" | "text" (formats: the module docstring)
    path            the data: a folder, a file, a shard brace pattern or URL (per kind)
    val_path        explicit validation data (same format); else the imagefolder validation folder or val_fraction
    val_fraction    held-out fraction, chosen by a stable hash of the sample key (not random); None: unset
                    (``prepare`` holds out its default share), 0: no validation split
    caption_column  imagefolder metadata / webdataset json caption field (a str or a list of str)
    text_column     text corpus ``.jsonl`` field
    text_split      ``.txt`` documents: one per "line", or one per blank-line-separated "paragraph"
    """

    name: str
    kind: Literal["imagefolder", "webdataset", "interleaved", "text"]
    path: str
    val_path: str | None = None
    val_fraction: float | None = None
    caption_column: str = "text"
    text_column: str = "text"
    text_split: Literal["line", "paragraph"] = "line"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.val_fraction is not None and not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"source {self.name!r}: val_fraction {self.val_fraction} must be in [0, 1)")
        if self.text_split not in ("line", "paragraph"):
            raise ValueError(f"source {self.name!r}: text_split {self.text_split!r} is not 'line' or 'paragraph'")
        self.path = str(self.path)
        if self.val_path is not None:
            self.val_path = str(self.val_path)

    @property
    def held_out(self) -> float:
        """The share held out by key hash when the source has no validation data of its own (unset: 0)."""
        return float(self.val_fraction or 0.0)


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


# ----------------------------------------------------------------------------------------------- work units


class Unit:
    """A picklable piece of work for one ``prepare`` process: ``records(skips)`` yields its Records and counts
    the skips it finds while reading (webdataset: the whole shard is read there)."""

    source: str
    split: str

    def records(self, skips: Skips) -> Iterator[Record]:
        raise NotImplementedError


@dataclass
class RecordsUnit(Unit):
    """Records already scanned (imagefolder, interleaved, text): up to ``UNIT_SIZE`` of them."""

    source: str
    split: str
    items: list[Record] = field(default_factory=list)

    def records(self, skips: Skips) -> Iterator[Record]:
        yield from self.items

    def __len__(self) -> int:
        return len(self.items)


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
        return _shard_records(self, skips, want_images=True)


def _chunk(source: str, split: str, records: list[Record]) -> list[Unit]:
    return [RecordsUnit(source, split, records[i : i + UNIT_SIZE]) for i in range(0, len(records), UNIT_SIZE)]


# ------------------------------------------------------------------------------------------------ helpers


def _missing(cfg: SourceConfig, path: str, what: str = "path") -> FileNotFoundError:
    return FileNotFoundError(f"source {cfg.name!r} ({cfg.kind}): {what} {path!r} does not exist")


def _decode_line(raw: bytes) -> tuple[object, str | None]:
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


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its line ending) of a file, read as bytes; a UTF-8 byte order
    mark at the start of the file (Windows editors write one) is dropped."""
    with open(path, "rb") as f:
        for no, line in enumerate(f, start=1):
            if no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            yield no, line.rstrip(b"\r\n")


def _captions(value: object) -> list[str]:
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


def _interleaved_layout(doc: object) -> tuple[list, list]:
    """Check the OBELICS layout: ``texts`` and ``images`` lists of equal length, exactly one non-null
    (string) per position. Raises BadSample("malformed_json")."""
    if not isinstance(doc, dict):
        raise BadSample("malformed_json", "not a JSON object")
    texts, images = doc.get("texts"), doc.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        raise BadSample("malformed_json", "'texts' and 'images' must both be lists")
    if len(texts) != len(images):
        raise BadSample("malformed_json", f"'texts' ({len(texts)}) and 'images' ({len(images)}) differ in length")
    for i, (t, im) in enumerate(zip(texts, images, strict=True)):
        if (t is None) == (im is None):
            raise BadSample("malformed_json", f"position {i}: both or neither of text and image")
        if not isinstance(t if t is not None else im, str):
            raise BadSample("malformed_json", f"position {i}: not a string")
    return texts, images


def _interleaved_texts(texts: list) -> list[str | None]:
    """Clean each text entry (line breaks kept); an empty one becomes None (dropped), a non-UTF-8 one skips
    the document; no text at all -> "empty_caption"."""
    out: list[str | None] = []
    for t in texts:
        if t is None:
            out.append(None)
            continue
        try:
            out.append(clean_caption(t, keep_newlines=True))
        except BadSample as e:
            if e.reason != "empty_caption":
                raise
            out.append(None)
    if not any(t is not None for t in out):
        raise BadSample("empty_caption", "no text in the document")
    return out


def _interleaved_segments(texts: list, images: list, image: Callable[[str], ImageRef]) -> list:
    """Parallel OBELICS lists -> segments in order: cleaned texts (empty ones dropped) and ``image(entry)``
    for each image entry (which raises ``BadSample`` for a missing image)."""
    segments: list = []
    for t, im in zip(_interleaved_texts(texts), images, strict=True):
        if im is not None:
            segments.append(image(im))
        elif t is not None:
            segments.append(t)
    return segments


def _file_image(folder: str, name: str) -> ImageRef:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise BadSample("missing_file", path)
    return ImageRef(name=path, path=path)


def _files(cfg: SourceConfig, path: str, suffixes: tuple[str, ...]) -> list[str]:
    """``path`` itself if a file, else the files in it (not recursive) with one of ``suffixes``, sorted."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
        if not found:
            raise FileNotFoundError(f"source {cfg.name!r} ({cfg.kind}): no {'/'.join(suffixes)} file in {path!r}")
        return found
    raise _missing(cfg, path)


def _file_key(path: str, root: str) -> str:
    """The file part of a ``file:line`` key: the path relative to the source folder (its base name for a
    single file), so keys (and the val_fraction split) do not change when the data set moves."""
    return os.path.basename(path) if os.path.isfile(root) else os.path.relpath(path, root)


class _Splitter:
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


# ------------------------------------------------------------------------------------------------ imagefolder


def _imagefolder_metadata(cfg: SourceConfig, root: str) -> str:
    """The metadata.jsonl of an imagefolder (sub-)folder (or the file itself)."""
    if os.path.isfile(root):
        return root
    meta = os.path.join(root, METADATA)
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"source {cfg.name!r} (imagefolder): {meta!r} does not exist: expected a folder "
                                f"with {METADATA} (lines {{\"file_name\": ..., \"{cfg.caption_column}\": ...}})")
    return meta


def _scan_imagefolder(cfg: SourceConfig, meta: str, sp: _Splitter) -> list[Record]:
    folder = os.path.dirname(os.path.abspath(meta))
    seen: set[str] = set()
    out: list[Record] = []
    for no, raw in _lines(meta):
        if not raw.strip():
            continue
        where = f"{meta}:{no}"
        obj, reason = _decode_line(raw)
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
            captions = _captions(obj.get(cfg.caption_column))
        except BadSample as e:
            sp.skip(name, e.reason, f"{where} ({name})")
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            sp.skip(name, "missing_file", path)
            continue
        out.append(Record("pair", name, [ImageRef(name=path, path=path)], captions))
    return out


def _read_imagefolder(cfg: SourceConfig, split: str, skips: Skips) -> list[Record]:
    root = cfg.path
    if not os.path.exists(root):
        raise _missing(cfg, root)
    train_dir = os.path.join(root, "train")
    layered = os.path.isdir(train_dir)
    val_dir = next((os.path.join(root, d) for d in VAL_FOLDERS if os.path.isdir(os.path.join(root, d))), None)
    if split == "train":
        meta = _imagefolder_metadata(cfg, train_dir if layered else root)
        explicit_val = cfg.val_path is not None or (layered and val_dir is not None)
        return _scan_imagefolder(cfg, meta, _Splitter("train", 0.0 if explicit_val else cfg.held_out, skips))
    if cfg.val_path is not None:
        if not os.path.exists(cfg.val_path):
            raise _missing(cfg, cfg.val_path, "val_path")
        return _scan_imagefolder(cfg, _imagefolder_metadata(cfg, cfg.val_path), _Splitter("val", 0.0, skips))
    if layered and val_dir is not None:
        return _scan_imagefolder(cfg, _imagefolder_metadata(cfg, val_dir), _Splitter("val", 0.0, skips))
    if cfg.held_out > 0.0:
        meta = _imagefolder_metadata(cfg, train_dir if layered else root)
        return _scan_imagefolder(cfg, meta, _Splitter("val", cfg.held_out, skips))
    return []


# ------------------------------------------------------------------------------------------------ interleaved


def _scan_interleaved(cfg: SourceConfig, root: str, sp: _Splitter) -> list[Record]:
    out: list[Record] = []
    for file in _files(cfg, root, (".jsonl",)):
        folder, fkey = os.path.dirname(os.path.abspath(file)), _file_key(file, root)
        for no, raw in _lines(file):
            if not raw.strip():
                continue
            key, where = f"{fkey}:{no}", f"{file}:{no}"
            if not sp.mine(key):
                continue
            doc, reason = _decode_line(raw)
            try:
                texts, images = _interleaved_layout(doc)
                if reason is not None:
                    raise BadSample(reason)
                segments = _interleaved_segments(texts, images, functools.partial(_file_image, folder))
            except BadSample as e:
                sp.skip(key, e.reason, e.detail if e.reason == "missing_file" else where)
                continue
            out.append(Record("interleaved", key, segments))
    return out


# ------------------------------------------------------------------------------------------------ text


def _text_docs(cfg: SourceConfig, file: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, raw text or None, skip reason or None) of each document of one text file."""
    if file.lower().endswith(".jsonl"):
        for no, raw in _lines(file):
            if not raw.strip():
                continue
            obj, reason = _decode_line(raw)
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
        return
    # .txt: decoded line by line (a non-UTF-8 line spoils only its own document); blank lines separate
    block: list[str | None] = []
    start = 0
    for no, raw in _lines(file):
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


def _paragraph(lines: list[str | None]) -> tuple[str | None, str | None]:
    if any(line is None for line in lines):
        return None, "non_utf8_caption"
    return "\n".join(lines), None  # type: ignore[arg-type]


def _scan_text(cfg: SourceConfig, root: str, sp: _Splitter) -> list[Record]:
    out: list[Record] = []
    for file in _files(cfg, root, (".txt", ".jsonl")):
        fkey = _file_key(file, root)
        for no, raw, reason in _text_docs(cfg, file):
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


# ------------------------------------------------------------------------------------------------ webdataset


def _is_url(path: str) -> bool:
    scheme = urlparse(path).scheme
    return len(scheme) > 1  # "C:\..." is a drive letter, not a scheme


def shard_name(shard: str) -> str:
    """The shard's name in keys and reports: its base name (``pipe:`` commands: the last word's)."""
    tail = shard.rsplit(" ", 1)[-1] if shard.startswith("pipe:") else shard
    return os.path.basename(urlparse(tail).path if _is_url(tail) else tail) or shard


def expand_shards(cfg: SourceConfig, pattern: str) -> list[str]:
    """A shard spec -> shard paths/URLs: brace patterns expanded (``braceexpand``), a local directory -> its
    ``*.tar`` (``.tar.gz``, ``.tgz``) files, sorted. Raises FileNotFoundError (naming the source) when no local
    shard exists; some missing shards are left in and counted as unreadable when read."""
    from braceexpand import braceexpand

    shards: list[str] = []
    for s in braceexpand(pattern):
        if not _is_url(s) and os.path.isdir(s):
            shards += sorted(str(p) for p in Path(s).iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
        else:
            shards.append(s)
    local = [s for s in shards if not _is_url(s)]
    if not shards:
        raise FileNotFoundError(f"source {cfg.name!r} (webdataset): no {'/'.join(TAR_SUFFIXES)} shard in {pattern!r}")
    if len(local) == len(shards) and not any(os.path.isfile(s) for s in local):
        raise _missing(cfg, pattern)
    return shards


def _open_stream(shard: str):
    """A readable binary stream of a shard: local files directly, anything else with ``webdataset.gopen``
    (http(s), ``pipe:``, ...; imported here: webdataset is slow to import)."""
    if not _is_url(shard):
        return open(shard, "rb")
    from webdataset.gopen import gopen

    return gopen(shard, "rb")


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = the member path up to the first "." of its base name, extension = the
    rest (lower-cased). None for a name without an extension."""
    if name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_samples(unit: ShardUnit, skips: Skips, want_images: bool) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes}) of each run of consecutive members sharing a key. A shard that cannot be opened or
    read to the end counts one "unreadable_tar_member" (the sample being read then is dropped: it may be
    incomplete); the samples before it come through. ``want_images=False`` leaves image bytes unread (None)."""
    stream = None
    key, members = None, {}
    try:
        stream = _open_stream(unit.shard)
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                parts = _split_name(info.name)
                if parts is None:
                    continue
                k, ext = parts
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if ext in members:  # a repeated member in one sample: keep the first
                    continue
                last = ext.rsplit(".", 1)[-1]
                if not want_images and last in IMAGE_EXTS:
                    members[ext] = None
                else:
                    f = tf.extractfile(info)
                    members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield key, members
    except Exception as e:  # tarfile.ReadError, OSError (missing, pipe status), EOFError, zlib.error, ...
        if unit.count_shard_errors:
            skips.add("unreadable_tar_member", f"{unit.shard_name}: {type(e).__name__}: {e}")
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a pipe's exit status: the read above already failed or got everything
                pass


def _json_member(data: bytes) -> dict:
    obj, reason = _decode_line(data)
    if reason == "malformed_json" or not isinstance(obj, dict):
        raise BadSample("malformed_json", "json member")
    if reason is not None:
        raise BadSample(reason, "json member")
    return obj


def _shard_sample(unit: ShardUnit, key: str, members: dict[str, bytes | None]) -> Record:
    """One tar sample -> a pair or interleaved Record; raises BadSample."""
    shard = unit.shard_name
    meta = _json_member(members["json"] or b"") if "json" in members else None
    if meta is not None and ("texts" in meta or "images" in meta):
        texts, images = _interleaved_layout(meta)

        def member(name: str) -> ImageRef:
            ext = name.lower()
            if ext not in members:
                raise BadSample("missing_file", f"{shard}:{key}.{name}")
            return ImageRef(name=f"{shard}:{key}.{ext}", data=members[ext])

        return Record("interleaved", f"{shard}:{key}", _interleaved_segments(texts, images, member))
    if "txt" in members:
        captions = [clean_caption(members["txt"] or b"")]
    elif meta is not None:
        captions = _captions(meta.get(unit.caption_column))
    else:
        raise BadSample("empty_caption", f"{shard}:{key}: no txt or json member")
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise BadSample("missing_file", f"{shard}:{key}: no {'/'.join(IMAGE_EXTS)} member")
    return Record("pair", f"{shard}:{key}", [ImageRef(name=f"{shard}:{key}.{ext}", data=members[ext])], captions)


def _shard_records(unit: ShardUnit, skips: Skips, want_images: bool) -> Iterator[Record]:
    seen: set[str] = set()
    shard = unit.shard_name
    for key, members in _tar_samples(unit, skips, want_images):
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
            record = _shard_sample(unit, key, members)
        except BadSample as e:
            skips.add(e.reason, e.detail if e.reason == "missing_file" else rkey)
            continue
        yield record


def _webdataset_units(cfg: SourceConfig, split: str) -> list[Unit]:
    if split == "train":
        fraction = 0.0 if cfg.val_path is not None else cfg.held_out
        return [ShardUnit(cfg.name, "train", s, cfg.caption_column, fraction) for s in expand_shards(cfg, cfg.path)]
    if cfg.val_path is not None:
        return [ShardUnit(cfg.name, "val", s, cfg.caption_column) for s in expand_shards(cfg, cfg.val_path)]
    if cfg.held_out > 0.0:  # the train shards again: each sample goes to one split by its key's hash
        return [ShardUnit(cfg.name, "val", s, cfg.caption_column, cfg.held_out, count_shard_errors=False)
                for s in expand_shards(cfg, cfg.path)]
    return []


# ------------------------------------------------------------------------------------------------ API


def read_source(cfg: SourceConfig, split: Literal["train", "val"], skips: Skips) -> list[Unit]:
    """Scan one split of a source into work units, counting scan-time skips into ``skips`` (webdataset: none;
    its shards are read in ``Unit.records``). "val" is ``[]`` when the source has no validation data.
    Raises FileNotFoundError naming the source when its path (or val_path) does not exist."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.kind == "webdataset":
        return _webdataset_units(cfg, split)
    if cfg.kind == "imagefolder":
        return _chunk(cfg.name, split, _read_imagefolder(cfg, split, skips))
    scan = _scan_interleaved if cfg.kind == "interleaved" else _scan_text
    if not os.path.exists(cfg.path):
        raise _missing(cfg, cfg.path)
    if split == "train":
        fraction = 0.0 if cfg.val_path is not None else cfg.held_out
        return _chunk(cfg.name, split, scan(cfg, cfg.path, _Splitter("train", fraction, skips)))
    if cfg.val_path is not None:
        if not os.path.exists(cfg.val_path):
            raise _missing(cfg, cfg.val_path, "val_path")
        return _chunk(cfg.name, split, scan(cfg, cfg.val_path, _Splitter("val", 0.0, skips)))
    if cfg.held_out > 0.0:
        return _chunk(cfg.name, split, scan(cfg, cfg.path, _Splitter("val", cfg.held_out, skips)))
    return []


def own_validation(cfg: SourceConfig) -> str | None:
    """Where the source's validation data of its own is: "val_path", the imagefolder validation folder
    (``"folder <name>/"``, only beside a ``train/`` folder), or None (only a held-out share can validate)."""
    if cfg.val_path is not None:
        return "val_path"
    if cfg.kind == "imagefolder" and os.path.isdir(os.path.join(cfg.path, "train")):
        found = next((d for d in VAL_FOLDERS if os.path.isdir(os.path.join(cfg.path, d))), None)
        if found is not None:
            return f"folder {found}/"
    return None


def caption_corpus(cfg: SourceConfig, limit: int | None = None) -> Iterator[str]:
    """The train split's cleaned captions and texts (every alternative caption of a pair, every text segment
    of a document), for training a BPE tokenizer; bad samples are silently left out. At most ``limit``
    strings. Webdataset shards are read without keeping image bytes."""
    if limit is not None and limit <= 0:
        return
    n = 0
    for unit in read_source(cfg, "train", Skips()):
        records = (_shard_records(unit, Skips(), want_images=False) if isinstance(unit, ShardUnit)
                   else unit.records(Skips()))
        for record in records:
            texts = record.captions if record.kind == "pair" else [s for s in record.segments if isinstance(s, str)]
            for t in texts:
                yield t
                n += 1
                if limit is not None and n >= limit:
                    return
