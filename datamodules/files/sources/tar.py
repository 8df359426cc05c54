"""Streaming a tar shard (a local file, a URL or a ``pipe:`` command) as WebDataset samples: runs of consecutive
members sharing a key, read in one pass (``r|*``: no seeking, so a pipe or an HTTP stream works)."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from urllib.parse import urlparse


def is_url(path: str) -> bool:
    scheme = urlparse(path).scheme
    return len(scheme) > 1  # "C:\..." is a drive letter, not a scheme


def _open_stream(shard: str):
    """A readable binary stream of a shard: local files directly, anything else with ``webdataset.gopen``
    (http(s), ``pipe:``, ...; imported here: webdataset is slow to import)."""
    if not is_url(shard):
        return open(shard, "rb")
    from webdataset.gopen import gopen

    return gopen(shard, "rb")


def split_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = the member path up to the first "." of its base name, extension = the
    rest (lower-cased). None for a name without an extension."""
    if name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_samples(shard: str, on_error: Callable[[Exception], None],
                unread: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes}) of each run of consecutive members of ``shard`` sharing a key. A shard that cannot be
    opened or read to the end is handed to ``on_error`` (the sample being read then is dropped: it may be
    incomplete); the samples before it come through. Members whose last extension is in ``unread`` are left
    unread (None)."""
    stream = None
    key, members = None, {}
    try:
        stream = _open_stream(shard)
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                parts = split_name(info.name)
                if parts is None:
                    continue
                k, ext = parts
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if ext in members:  # a repeated member in one sample: keep the first
                    continue
                if ext.rsplit(".", 1)[-1] in unread:
                    members[ext] = None
                else:
                    f = tf.extractfile(info)
                    members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield key, members
    except Exception as e:  # tarfile.ReadError, OSError (missing, pipe status), EOFError, zlib.error, ...
        on_error(e)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a pipe's exit status: the read above already failed or got everything
                pass
