"""The OBELICS interleaved-document layout (parallel ``texts`` / ``images`` lists), shared by the interleaved
JSON-lines reader and the WebDataset reader (a shard's ``json`` member may hold such a document)."""

from __future__ import annotations

from collections.abc import Callable

from datamodules.files.decode import BadSample, clean_caption
from datamodules.files.records import ImageRef


def check_layout(doc: object) -> tuple[list, list]:
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


def _texts(texts: list) -> list[str | None]:
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


def to_segments(texts: list, images: list, image: Callable[[str], ImageRef]) -> list:
    """Parallel OBELICS lists -> segments in order: cleaned texts (empty ones dropped) and ``image(entry)``
    for each image entry (which raises ``BadSample`` for a missing image)."""
    out: list = []
    for t, im in zip(_texts(texts), images, strict=True):
        if im is not None:
            out.append(image(im))
        elif t is not None:
            out.append(t)
    return out
