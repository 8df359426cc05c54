"""Bad-data fixtures: valid data sets in each of the four input formats with every kind of bad sample mixed in,
each writer returning what ``prepare`` must make of it.

A writer returns ``{reason: count}`` for the samples that must be skipped (the reason keys of
``datamodules.files.decode.REASONS``), plus ``"valid"``: the samples (pairs, documents) that must survive,
summed over the splits; imagefolder and webdataset also return ``"truncated"``: captions too long for any
sequence, which are kept but cut (counted, not skipped). Each bad sample has exactly one defect, so its reason is
unambiguous. Valid samples include every image mode a user's data may hold: grayscale, palette, CMYK JPEG, RGBA
PNG, 16-bit PNG, an EXIF-rotated JPEG and a non-square image.

Images are small generated pictures (a gradient with a coloured rectangle, >= 32 px); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# A caption far longer than any training sequence: prepare truncates it and counts "caption_truncated".
LONG_CAPTION = " ".join(f"word{i % 50}" for i in range(2000))
INVALID_UTF8 = b"caf\xe9 \xff\xfe au lait"  # Latin-1 bytes: not UTF-8


# ----------------------------------------------------------------------------------------------- images

def picture(seed: int, width: int = 32, height: int = 32) -> np.ndarray:
    """A simple test picture: uint8 ``[height, width, 3]``, a diagonal gradient with a coloured rectangle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.float64)
    for c in range(3):
        img[..., c] = 255 * (x / max(width - 1, 1) * rng.random() + y / max(height - 1, 1) * (1 - rng.random())) / 2
    x0, y0 = int(rng.integers(0, max(width // 2, 1))), int(rng.integers(0, max(height // 2, 1)))
    img[y0 : y0 + max(height // 3, 1), x0 : x0 + max(width // 3, 1)] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **save_args) -> bytes:
    """A PIL image (or uint8 ``[H, W, 3]`` array) -> file bytes in ``fmt``."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def png(seed: int, width: int = 32, height: int = 32) -> bytes:
    return encode(picture(seed, width, height))


def _pil(seed: int, size: int) -> Image.Image:
    return Image.fromarray(picture(seed, size, size))


def _exif_rotated_jpeg(seed: int) -> bytes:
    """A 48x32 JPEG whose EXIF orientation (6: rotate 90 degrees clockwise) makes it 32x48 when displayed."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(picture(seed, 48, 32), "JPEG", exif=exif.tobytes())


def _sixteen_bit_png(seed: int, size: int) -> bytes:
    """A 16-bit grayscale PNG (PIL mode "I;16"), values spread over 0..65535."""
    gray = picture(seed, size, size).mean(axis=2).astype(np.uint16) * 257
    return encode(Image.fromarray(gray))  # uint16 -> mode "I;16"


def _rgba_png(seed: int, size: int) -> bytes:
    rgba = np.dstack([picture(seed, size, size), np.linspace(0, 255, size * size).reshape(size, size)])
    return encode(Image.fromarray(rgba.astype(np.uint8)))  # 4 channels -> "RGBA"


# Valid images in unusual modes: (name, extension, bytes maker(seed, size)). All must decode to RGB.
MODES: list[tuple[str, str, Callable[[int, int], bytes]]] = [
    ("grayscale", "png", lambda s, n: encode(_pil(s, n).convert("L"))),
    ("palette", "png", lambda s, n: encode(_pil(s, n).convert("P", palette=Image.Palette.ADAPTIVE))),
    ("cmyk", "jpg", lambda s, n: encode(_pil(s, n).convert("CMYK"), "JPEG")),
    ("rgba", "png", _rgba_png),
    ("sixteen_bit", "png", _sixteen_bit_png),
    ("exif_rotated", "jpg", lambda s, n: _exif_rotated_jpeg(s)),
    ("non_square", "png", lambda s, n: png(s, 2 * n, n)),
]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_images(seed: int) -> list[tuple[str, bytes]]:
    """Three "corrupt_image" files: a truncated PNG, a truncated JPEG, random bytes named .png."""
    noisy = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # does not compress away
    return [("truncated.png", _truncated(encode(noisy))),
            ("truncated.jpg", _truncated(encode(noisy, "JPEG", quality=95))),
            ("random_bytes.png", np.random.default_rng(seed + 1).bytes(300))]


# Images that decode but must be skipped at the default min_size=8, max_aspect=4.0.
TOO_SMALL = (6, 6)  # shorter side 6 < 8
BAD_ASPECT = (200, 20)  # ratio 10 > 4 (and 20 >= 8, so not also too small)


# ----------------------------------------------------------------------------------------------- files

def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _json_line(obj: dict) -> bytes:
    return json.dumps(obj).encode("utf-8")


def _caption(i: int) -> str:
    return f"picture number {i} with a coloured box"


def write_bad_imagefolder(root: str | Path, n_valid: int = 12, image_size: int = 32) -> dict[str, int]:
    """A Hugging Face imagefolder (``root/train/metadata.jsonl``, ``root/validation/metadata.jsonl``, images in
    ``images/``): ``n_valid`` plain valid pairs in train, 4 in validation, the valid image modes (``MODES``), and in
    train one or a known number of each bad case:

    - corrupt_image 3: a truncated PNG, a truncated JPEG, random bytes named ``.png``
    - empty_file 1: a zero-byte ``.png``
    - missing_file 1: a line naming a file that does not exist
    - too_small 1: a 6x6 PNG; bad_aspect_ratio 1: a 200x20 PNG
    - empty_caption 4: ``"text": ""``, ``"text": "   "``, no ``text`` field, ``"text": ["", " "]``
    - non_utf8_caption 1: a line with invalid UTF-8 bytes inside the caption string
    - duplicate_file_name 1: a valid line's file_name again (the second one is skipped)
    - malformed_json 3: a line that is not JSON, an unterminated object, an object without ``file_name``
    - truncated 1 (kept, not skipped): a caption of 2000 words

    Valid images are ``image_size`` px pictures. Returns the skip counts by reason, ``"valid"`` (pairs kept over
    both splits) and ``"truncated"``."""
    root = Path(root)
    train, val = root / "train", root / "validation"
    (train / "images").mkdir(parents=True, exist_ok=True)
    (val / "images").mkdir(parents=True, exist_ok=True)
    lines: list[bytes] = []
    counts = {"valid": 0, "truncated": 0}

    def add(name: str, data: bytes | None, text: object = "", reason: str | None = None, **extra) -> str:
        """Write ``images/name`` (unless data is None) and its metadata line; count the outcome."""
        file_name = f"images/{name}"
        if data is not None:
            (train / file_name).write_bytes(data)
        row = {"file_name": file_name, **extra}
        if text is not None:
            row["text"] = text
        lines.append(_json_line(row))
        counts[reason or "valid"] = counts.get(reason or "valid", 0) + 1
        return file_name

    for i in range(n_valid):
        add(f"{i:06d}.png", png(i, image_size, image_size), [_caption(i), f"box {i}"] if i % 2 else _caption(i))
    for k, (mode, ext, make) in enumerate(MODES):
        add(f"{mode}.{ext}", make(1000 + k, image_size), f"a {mode.replace('_', ' ')} picture")
    for name, data in _corrupt_images(7):
        add(name, data, "a broken picture", "corrupt_image")
    add("empty.png", b"", "an empty file", "empty_file")
    add("does_not_exist.png", None, "a missing picture", "missing_file")
    add("too_small.png", png(1, *TOO_SMALL), "a tiny picture", "too_small")
    add("bad_aspect.png", png(2, *BAD_ASPECT), "a long thin picture", "bad_aspect_ratio")
    add("empty_caption_1.png", png(3, image_size, image_size), "", "empty_caption")
    add("empty_caption_2.png", png(4, image_size, image_size), "   ", "empty_caption")
    add("empty_caption_3.png", png(5, image_size, image_size), None, "empty_caption")  # no text field
    add("empty_caption_4.png", png(6, image_size, image_size), ["", " "], "empty_caption")
    (train / "images" / "non_utf8.png").write_bytes(png(8, image_size, image_size))
    lines.append(b'{"file_name": "images/non_utf8.png", "text": "' + INVALID_UTF8 + b'"}')
    counts["non_utf8_caption"] = 1
    lines.append(_json_line({"file_name": "images/000000.png", "text": "the first picture again"}))
    counts["duplicate_file_name"] = 1
    lines += [b"this line is not json", b'{"file_name": "images/000001.png", "text": "unterminated',
              _json_line({"text": "a caption without a file name"})]
    counts["malformed_json"] = 3
    add("long_caption.png", png(9, image_size, image_size), LONG_CAPTION)
    counts["truncated"] += 1
    _write_lines(train / "metadata.jsonl", lines)

    val_lines = []
    for i in range(4):
        (val / "images" / f"{i:06d}.png").write_bytes(png(500 + i, image_size, image_size))
        val_lines.append(_json_line({"file_name": f"images/{i:06d}.png", "text": _caption(500 + i)}))
    counts["valid"] += len(val_lines)
    _write_lines(val / "metadata.jsonl", val_lines)
    return counts


def write_all_bad_imagefolder(root: str | Path) -> dict[str, int]:
    """An imagefolder (``root/train/metadata.jsonl``, no validation) in which every sample is bad: corrupt,
    empty, missing, too small, wrong aspect ratio, empty caption, malformed line. Returns the skip counts
    (``"valid": 0``)."""
    root = Path(root)
    train = root / "train"
    (train / "images").mkdir(parents=True, exist_ok=True)
    lines: list[bytes] = []
    counts = {"valid": 0, "corrupt_image": 0}
    for name, data in _corrupt_images(11):
        (train / "images" / name).write_bytes(data)
        lines.append(_json_line({"file_name": f"images/{name}", "text": "a broken picture"}))
        counts["corrupt_image"] += 1
    (train / "images" / "empty.png").write_bytes(b"")
    (train / "images" / "small.png").write_bytes(png(1, *TOO_SMALL))
    (train / "images" / "thin.png").write_bytes(png(2, *BAD_ASPECT))
    (train / "images" / "fine.png").write_bytes(png(3))
    lines += [_json_line({"file_name": "images/empty.png", "text": "an empty file"}),
              _json_line({"file_name": "images/missing.png", "text": "a missing picture"}),
              _json_line({"file_name": "images/small.png", "text": "a tiny picture"}),
              _json_line({"file_name": "images/thin.png", "text": "a thin picture"}),
              _json_line({"file_name": "images/fine.png", "text": "  "}),
              b"not json at all"]
    counts.update(empty_file=1, missing_file=1, too_small=1, bad_aspect_ratio=1, empty_caption=1, malformed_json=1)
    _write_lines(train / "metadata.jsonl", lines)
    return counts


# ----------------------------------------------------------------------------------------------- tar shards

class _Shard:
    """A tar shard being written: members of one sample consecutive, fixed mtime."""

    def __init__(self, path: Path):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.USTAR_FORMAT)
        self.path = path

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close(self, cut_at: int | None = None) -> None:
        """Write the shard; ``cut_at``: keep only its first ``cut_at`` bytes (a truncated download)."""
        self.tar.close()
        data = self.buf.getvalue()
        self.path.write_bytes(data if cut_at is None else data[:cut_at])


def write_bad_shards(root: str | Path, n_valid: int = 12) -> dict[str, int]:
    """WebDataset shards ``root/000000.tar`` .. ``root/000002.tar`` (all training data; no validation shard).

    ``000000.tar``: ``n_valid`` plain valid pairs (``<key>.png`` + ``<key>.txt``, or ``<key>.json`` with
    ``{"text": [...]}`` for every other key), the valid image modes (``.png`` / ``.jpg`` members), and:

    - corrupt_image 3: a truncated PNG, a truncated JPEG, random bytes as ``.png``
    - empty_file 1: a zero-byte ``.png`` member
    - missing_file 1: a sample with a caption but no image member
    - too_small 1 (6x6), bad_aspect_ratio 1 (200x20)
    - empty_caption 4: an empty ``.txt``, a whitespace ``.txt``, ``{"text": []}``, a sample with no caption member
    - non_utf8_caption 1: a ``.txt`` member with invalid UTF-8
    - malformed_json 1: a ``.json`` member that is not JSON
    - duplicate_file_name 1: the key of the first sample again at the end of the shard
    - truncated 1 (kept): a 2000-word caption

    ``000001.tar``: 4 valid pairs. ``000002.tar``: 3 valid pairs, then cut in the middle of the next sample's
    image member: unreadable_tar_member 1 (that sample is lost; the 3 before it are kept).

    Returns the skip counts by reason, ``"valid"`` and ``"truncated"``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"valid": 0, "truncated": 0}

    def count(reason: str | None) -> None:
        counts[reason or "valid"] = counts.get(reason or "valid", 0) + 1

    shard = _Shard(root / "000000.tar")
    n = 0

    def key() -> str:
        nonlocal n
        n += 1
        return f"{n - 1:06d}"

    for i in range(n_valid):
        k = key()
        shard.add(f"{k}.png", png(i))
        if i % 2:
            shard.add(f"{k}.json", _json_line({"text": [_caption(i), f"box {i}"]}))
        else:
            shard.add(f"{k}.txt", _caption(i).encode())
        count(None)
    for j, (mode, ext, make) in enumerate(MODES):
        k = key()
        shard.add(f"{k}.{ext}", make(1000 + j, 32))
        shard.add(f"{k}.txt", f"a {mode.replace('_', ' ')} picture".encode())
        count(None)
    for name, data in _corrupt_images(17):
        k = key()
        shard.add(f"{k}.{name.rsplit('.', 1)[1]}", data)
        shard.add(f"{k}.txt", b"a broken picture")
        count("corrupt_image")
    bad_samples: list[tuple[list[tuple[str, bytes]], str | None]] = [
        ([("png", b""), ("txt", b"an empty file")], "empty_file"),
        ([("txt", b"a caption without its picture")], "missing_file"),
        ([("png", png(1, *TOO_SMALL)), ("txt", b"a tiny picture")], "too_small"),
        ([("png", png(2, *BAD_ASPECT)), ("txt", b"a long thin picture")], "bad_aspect_ratio"),
        ([("png", png(3)), ("txt", b"")], "empty_caption"),
        ([("png", png(4)), ("txt", b"  \n ")], "empty_caption"),
        ([("png", png(5)), ("json", _json_line({"text": []}))], "empty_caption"),
        ([("png", png(6))], "empty_caption"),  # no caption member at all
        ([("png", png(7)), ("txt", INVALID_UTF8)], "non_utf8_caption"),
        ([("png", png(8)), ("json", b'{"text": ["unterminated')], "malformed_json"),
        ([("png", png(9)), ("txt", LONG_CAPTION.encode())], None),
    ]
    for members, reason in bad_samples:
        k = key()
        for ext, data in members:
            shard.add(f"{k}.{ext}", data)
        count(reason)
    counts["truncated"] += 1  # the long caption above
    shard.add("000000.png", png(0))  # key 000000 again, after other keys: a duplicate
    shard.add("000000.txt", b"the first picture again")
    count("duplicate_file_name")
    shard.close()

    shard = _Shard(root / "000001.tar")
    for i in range(4):
        shard.add(f"{100 + i:06d}.png", png(100 + i))
        shard.add(f"{100 + i:06d}.txt", _caption(100 + i).encode())
        count(None)
    shard.close()

    shard = _Shard(root / "000002.tar")
    for i in range(3):
        shard.add(f"{200 + i:06d}.png", png(200 + i))
        shard.add(f"{200 + i:06d}.txt", _caption(200 + i).encode())
        count(None)
    start = shard.tar.offset  # where the next member's 512-byte header begins
    lost = png(203, 64, 64)
    shard.add("000203.png", lost)
    shard.add("000203.txt", b"never read")
    shard.close(cut_at=start + 512 + len(lost) // 2)
    count("unreadable_tar_member")
    return counts


# ----------------------------------------------------------------------------------------------- interleaved

def _document(names: list[str], seed: int) -> dict:
    """An OBELICS line over image paths ``names``: "picture k." before each image, a caption after it."""
    texts: list[str | None] = []
    images: list[str | None] = []
    for k, name in enumerate(names):
        texts += [f"picture {k + 1}.", None, f"it shows {_caption(seed + k)}."]
        images += [None, name, None]
    return {"texts": texts, "images": images}


def write_bad_interleaved(root: str | Path, n_valid: int = 6, image_size: int = 32) -> dict[str, int]:
    """OBELICS-style documents: ``root/train.jsonl`` (``n_valid`` valid documents of 2-3 images) and
    ``root/validation.jsonl`` (2 valid documents), images under ``root/images/``. Train also holds the valid image
    modes (one document) and one document per bad case; a document with one bad image is skipped whole:

    - malformed_json 3: a line that is not JSON, ``texts``/``images`` of different lengths, a position with both
      a text and an image
    - non_utf8_caption 1: invalid UTF-8 bytes inside a text
    - empty_caption 1: a document whose only text is ``""``
    - missing_file 1, corrupt_image 1 (truncated PNG), too_small 1: a document with one such image among good ones

    Returns the skip counts by reason and ``"valid"`` (documents kept over both files)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    counter = iter(range(10**6))

    def image(data: bytes, ext: str = "png") -> str:
        name = f"images/{next(counter):06d}.{ext}"
        (root / name).write_bytes(data)
        return name

    def good(seed: int) -> str:
        return image(png(seed, image_size, image_size))

    counts = {"valid": 0}
    lines = []
    for d in range(n_valid):
        lines.append(_json_line(_document([good(10 * d + k) for k in range(2 + d % 2)], 10 * d)))
        counts["valid"] += 1
    modes = [image(make(2000 + j, image_size), ext) for j, (_, ext, make) in enumerate(MODES)]
    lines.append(_json_line(_document(modes, 2000)))
    counts["valid"] += 1

    lines.append(b'{"texts": ["picture 1.", null], "images": [null, "images/000000.png"')
    lines.append(_json_line({"texts": ["picture 1.", None, "extra"], "images": [None, good(900)]}))
    lines.append(_json_line({"texts": ["picture 1.", "both"], "images": [None, good(901)]}))
    counts["malformed_json"] = 3
    bad_text = b'{"texts": ["' + INVALID_UTF8 + b'", null], "images": [null, "' + good(902).encode() + b'"]}'
    lines.append(bad_text)
    counts["non_utf8_caption"] = 1
    lines.append(_json_line({"texts": ["", None], "images": [None, good(903)]}))
    counts["empty_caption"] = 1
    for reason, bad in [("missing_file", "images/not_there.png"), ("corrupt_image", image(_corrupt_images(5)[0][1])),
                        ("too_small", image(png(904, *TOO_SMALL)))]:
        lines.append(_json_line(_document([good(905), bad, good(906)], 905)))
        counts[reason] = 1
    _write_lines(root / "train.jsonl", lines)

    val = [_json_line(_document([good(950 + 3 * d + k) for k in range(2)], 950 + 3 * d)) for d in range(2)]
    counts["valid"] += len(val)
    _write_lines(root / "validation.jsonl", val)
    return counts


# ----------------------------------------------------------------------------------------------- text

def write_bad_text(root: str | Path, n_valid: int = 10) -> dict[str, int]:
    """A text corpus: ``root/train.txt`` (one document per line: ``n_valid`` valid lines, blank and whitespace-only
    lines, which separate and are not documents, one 2000-word line that prepare splits into several samples, and
    one line of invalid UTF-8), ``root/validation.txt`` (3 valid lines) and ``root/more.jsonl`` (``{"text": ...}``
    lines: 2 valid, one not JSON, one with ``"text": ""``, one with ``"text": 5``). Skips:

    - non_utf8_caption 1 (the invalid line), empty_caption 1 (``""``), malformed_json 2 (not JSON; a number)

    Returns the skip counts by reason and ``"valid"`` (documents kept over the three files)."""
    root = Path(root)
    counts = {"valid": 0}
    lines: list[bytes] = []
    for i in range(n_valid):
        lines.append(f"document {i}: {_caption(i)}, and another sentence about it.".encode())
        counts["valid"] += 1
        if i % 4 == 1:
            lines += [b"", b"   \t "]  # not documents
    lines.append(LONG_CAPTION.encode())
    counts["valid"] += 1
    lines.append(b"a document with " + INVALID_UTF8)
    counts["non_utf8_caption"] = 1
    _write_lines(root / "train.txt", lines)
    _write_lines(root / "validation.txt", [f"held-out document {i}: {_caption(100 + i)}.".encode() for i in range(3)])
    counts["valid"] += 3
    _write_lines(root / "more.jsonl", [_json_line({"text": "a document from a json line."}),
                                       _json_line({"text": "another one, with two\nlines."}),
                                       b"{not json", _json_line({"text": ""}), _json_line({"text": 5})])
    counts["valid"] += 2
    counts["empty_caption"] = 1
    counts["malformed_json"] = 2
    return counts
