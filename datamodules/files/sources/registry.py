"""The source kinds: name -> :class:`~datamodules.files.sources.reader.Reader`. A new kind is one module with a
``READER``, named here and in ``config.Kind`` (checked at import: the two lists must agree)."""

from __future__ import annotations

from datamodules.files.sources import imagefolder, interleaved, text, webdataset
from datamodules.files.sources.config import KINDS
from datamodules.files.sources.reader import Reader

READERS: dict[str, Reader] = {
    "imagefolder": imagefolder.READER,
    "webdataset": webdataset.READER,
    "interleaved": interleaved.READER,
    "text": text.READER,
}
if tuple(READERS) != KINDS:
    raise ImportError(f"source kinds: config.Kind names {KINDS}, registry.READERS {tuple(READERS)}: they must agree")
