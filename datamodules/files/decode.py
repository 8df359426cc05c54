"""One raw sample -> clean inputs: an image file or tar member -> ``uint8 [S, S, 3]`` RGB, a raw caption -> a
clean ``str``. A bad sample raises :class:`BadSample` with a fixed ``reason`` key; ``prepare`` counts them.

Decoding order of an image: open + ``load()`` (truncated/corrupt files fail here) -> EXIF orientation ->
size checks -> any mode to RGB (alpha composited on ``background``, 16/32-bit scaled, not clipped) ->
resize the shorter side to ``image_size`` and center-crop (one resampling pass over the central square).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from datamodules.files.records import ImageRef

# Every reason a sample can be skipped for (here and in ``sources``), as shown in reports.
REASONS = {
    "missing_file": "the image file (or tar member) does not exist",
    "empty_file": "the image file has 0 bytes",
    "corrupt_image": "PIL cannot identify or decode the image (truncated, corrupt, decompression bomb)",
    "too_small": "the image's shorter side is below min_size",
    "bad_aspect_ratio": "the image's long/short side ratio exceeds max_aspect",
    "empty_caption": "no caption/text left after cleaning",
    "non_utf8_caption": "the caption/text (or its line) is not valid UTF-8",
    "malformed_json": "a line/json member is not JSON, or lacks or misshapes a required field",
    "duplicate_file_name": "a file name (tar key) already seen earlier in the same metadata file (shard)",
    "unreadable_tar_member": "a tar shard could not be opened or read to the end (counted once per shard)",
}

# Alpha-carrying modes: composited on the background (a transparent pixel shows the background, not black).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Integer modes with more than 8 bits per sample: PIL's own convert("L") clips them at 255.
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class BadSample(Exception):
    """One sample cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes (Exception pickles only ``args`` by default)
        return (type(self), (self.reason, self.detail))


def _open_bytes(ref: ImageRef) -> tuple[io.BytesIO | str, str]:
    """The file (path) or bytes to hand PIL, and the name used in messages; missing/empty checks first."""
    if ref.path is not None:
        if not os.path.isfile(ref.path):
            raise BadSample("missing_file", ref.path)
        if os.path.getsize(ref.path) == 0:
            raise BadSample("empty_file", ref.path)
        return ref.path, ref.path
    if ref.data is None:
        raise BadSample("missing_file", ref.name)
    if len(ref.data) == 0:
        raise BadSample("empty_file", ref.name)
    return io.BytesIO(ref.data), ref.name


def _wide_to_l(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grayscale image -> 8-bit "L", scaled to the full range it was stored in."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = a.astype(np.float64) / 257.0
    elif img.mode == "I":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            out = a.astype(np.float64) / 257.0  # 16-bit data held in a 32-bit mode (TIFF, older PIL PNGs)
        else:
            out = (a.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
    else:  # "F"
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            out = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = a
        else:
            out = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> "RGB": transparency (alpha channel or a palette/``tRNS`` transparent colour) is
    composited on ``background``; 16/32-bit and float grayscale are scaled to 8 bits, not clipped."""
    if img.mode in _WIDE_MODES or img.mode == "F":
        img = _wide_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, tuple(int(c) for c in background))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, P (opaque), CMYK, YCbCr, ...


def load_image(
    ref: ImageRef,
    image_size: int,
    min_size: int = 8,
    max_aspect: float = 4.0,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Decode ``ref`` (file or bytes) -> ``uint8 [image_size, image_size, 3]``.

    The shorter side is resized to ``image_size`` (bicubic, with ``reducing_gap`` for big reductions) and the
    longer one center-cropped, in one resampling pass over the central square. Raises :class:`BadSample`
    ("missing_file", "empty_file", "corrupt_image", "too_small", "bad_aspect_ratio")."""
    src, name = _open_bytes(ref)
    try:
        with warnings.catch_warnings():
            # a DecompressionBombWarning (between 1x and 2x Image.MAX_IMAGE_PIXELS) is not an error; beyond 2x,
            # PIL raises DecompressionBombError, reported below as corrupt_image
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as opened:
                opened.load()  # decodes now: truncated / corrupt data fails here, inside the try
                img = opened
                try:
                    img = ImageOps.exif_transpose(opened)
                except Exception:  # a malformed EXIF block: keep the pixels as stored
                    img = opened
                if img is opened:
                    img = opened.copy()  # detach from the file before the `with` closes it
    except BadSample:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, SyntaxError, ...
        raise BadSample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None

    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short < min_size:
        raise BadSample("too_small", f"{name}: {w}x{h} < {min_size}")
    if long / short > max_aspect:
        raise BadSample("bad_aspect_ratio", f"{name}: {w}x{h} (ratio {long / short:.2f} > {max_aspect})")

    try:
        img = to_rgb(img, background)
    except Exception as e:  # a mode PIL cannot convert (e.g. LAB without a profile)
        raise BadSample("corrupt_image", f"{name}: mode {img.mode}: {e}") from None

    # the central short x short square, resampled straight to image_size x image_size: the same pixels as
    # "shorter side to image_size, then center crop", without rounding the intermediate size
    left, top = (w - short) / 2.0, (h - short) / 2.0
    box = (left, top, left + short, top + short)
    if (w, h) != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    out = np.array(img, dtype=np.uint8)
    assert out.shape == (image_size, image_size, 3), out.shape
    return out


def clean_caption(raw: str | bytes | None, keep_newlines: bool = False) -> str:
    """A raw caption/text -> clean ``str``: bytes decoded as strict UTF-8, whitespace runs collapsed to one
    space and stripped. ``keep_newlines`` (documents: interleaved texts, text corpora) keeps line breaks:
    whitespace is collapsed within each line and runs of blank lines become one blank line.

    Raises :class:`BadSample`: "non_utf8_caption" (bytes that are not UTF-8, or a ``str`` holding lone
    surrogates, as ``surrogateescape`` decoding or a JSON ``\\udXXX`` escape leaves them), "empty_caption"
    (``None``, empty or whitespace only, or not a string at all)."""
    if raw is None:
        raise BadSample("empty_caption", "no caption")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("non_utf8_caption", str(e)) from None
    if not isinstance(raw, str):
        raise BadSample("empty_caption", f"not a string: {type(raw).__name__}")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise BadSample("non_utf8_caption", str(e)) from None
    if keep_newlines:
        lines = [" ".join(line.split()) for line in raw.splitlines()]
        kept: list[str] = []
        for line in lines:
            if line or (kept and kept[-1]):  # one blank line at most between non-blank lines
                kept.append(line)
        text = "\n".join(kept).strip()
    else:
        text = " ".join(raw.split())
    if not text:
        raise BadSample("empty_caption", "empty or whitespace only")
    return text
