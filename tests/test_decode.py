"""decode.load_image / clean_caption: every PIL mode to RGB, EXIF orientation, resize + centered crop, and
every skip reason, on images generated here."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from datamodules.files.decode import REASONS, BadSample, clean_caption, load_image
from datamodules.files.records import ImageRef

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save(img: Image.Image, path, fmt: str | None = None, **kw) -> ImageRef:
    img.save(path, fmt, **kw)
    return ImageRef(name=str(path), path=str(path))


def as_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reason(ref: ImageRef, **kw) -> str:
    with pytest.raises(BadSample) as e:
        load_image(ref, kw.pop("image_size", 16), **kw)
    return e.value.reason


# --------------------------------------------------------------------------------------------- modes


def test_rgb_from_path_and_bytes_same(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    a = load_image(save(img, tmp_path / "a.png"), 24)
    b = load_image(ImageRef(name="a.png", data=as_bytes(img)), 24)
    assert a.dtype == np.uint8 and a.shape == (24, 24, 3)
    np.testing.assert_array_equal(a, np.asarray(img))  # same size: no resampling at all
    np.testing.assert_array_equal(a, b)


def test_grayscale_L(tmp_path):
    out = load_image(save(Image.new("L", (16, 16), 100), tmp_path / "g.png"), 16)
    assert out.shape == (16, 16, 3)
    assert (out == 100).all()


def test_bilevel_1(tmp_path):
    img = Image.new("1", (16, 16), 0)
    img.paste(1, (0, 0, 8, 16))
    out = load_image(save(img, tmp_path / "b.png"), 16)
    assert (out[:, :8] == 255).all() and (out[:, 8:] == 0).all()


def test_LA_composited_on_background(tmp_path):
    img = Image.new("LA", (16, 16), (200, 0))  # fully transparent
    img.paste((200, 255), (0, 0, 8, 16))  # left half opaque gray 200
    out = load_image(save(img, tmp_path / "la.png"), 16, background=(10, 20, 30))
    assert (out[:, :8] == 200).all()
    assert (out[:, 8:] == np.array([10, 20, 30], np.uint8)).all()


def test_RGBA_on_background_by_pixel_value(tmp_path):
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # transparent red: must not show as red (or black)
    img.paste((0, 0, 255, 255), (0, 0, 8, 8))  # opaque blue
    img.paste((255, 0, 0, 128), (8, 8, 16, 16))  # half-transparent red
    out = load_image(save(img, tmp_path / "rgba.png"), 16)  # default background: white
    assert tuple(out[2, 2]) == BLUE
    assert tuple(out[2, 12]) == (255, 255, 255)  # fully transparent -> background
    r, g, b = (int(v) for v in out[12, 12])
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # 50% red over white
    black = load_image(save(img, tmp_path / "rgba2.png"), 16, background=(0, 0, 0))
    assert tuple(black[2, 12]) == (0, 0, 0)
    assert abs(int(black[12, 12, 0]) - 128) <= 1


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black (transparent), 1 red
    img.paste(1, (0, 0, 8, 16))
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_image(ImageRef(name=str(path), path=str(path)), 16, background=(0, 255, 0))
    assert (out[:, :8] == np.array(RED, np.uint8)).all()
    assert (out[:, 8:] == np.array(GREEN, np.uint8)).all()  # transparent index -> background, not black


def test_palette_opaque_gif(tmp_path):
    img = Image.new("RGB", (16, 16), BLUE).convert("P")
    out = load_image(save(img, tmp_path / "p.gif"), 16)
    assert (out == np.array(BLUE, np.uint8)).all()


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    for name, fmt in (("c.jpg", "JPEG"), ("c.tif", "TIFF")):
        out = load_image(save(img, tmp_path / name, fmt), 16).astype(int)
        assert (out[..., 0] > 240).all() and (out[..., 1:] < 15).all(), name


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16bit_scaled_not_clipped(tmp_path, mode):
    values = (np.arange(64) * 1040).astype(np.int64)  # 0 .. 65520 across the columns
    grad = np.tile(values, (64, 1))
    img = Image.fromarray(grad.astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    path = tmp_path / ("g16.png" if mode == "I;16" else "g32.tif")  # a 16-bit PNG; a 32-bit integer TIFF
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    out = load_image(ImageRef(name=str(path), path=str(path)), 64)
    expect = np.rint(values / 257.0)
    np.testing.assert_allclose(out[0, :, 0], expect, atol=1)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (out == 255).mean() < 0.05  # PIL's convert("L") would saturate nearly all of it at 255
    assert abs(int(out[0, 32, 0]) - 130) <= 1  # the middle of the range stays in the middle


def test_32bit_wide_range_stretched():
    grad = np.tile(np.arange(32, dtype=np.int32) * 100_000 - 1_000_000, (32, 1))  # beyond 16 bits, negative too
    out = load_image(ImageRef(name="w.tif", data=as_bytes(Image.fromarray(grad), "TIFF")), 32)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert (np.diff(out[0, :, 0].astype(int)) > 0).all()


def test_float_mode(tmp_path):
    grad = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (32, 1))
    out = load_image(ImageRef(name="f.tif", data=as_bytes(Image.fromarray(grad, "F"), "TIFF")), 32)
    np.testing.assert_allclose(out[0, :, 0], np.rint(np.linspace(0, 255, 32)), atol=1)


# --------------------------------------------------------------------------------------------- geometry


def quadrant_image() -> Image.Image:
    """32x32 blue with a red top-left quadrant."""
    img = Image.new("RGB", (32, 32), BLUE)
    img.paste(RED, (0, 0, 16, 16))
    return img


def is_red(px) -> bool:
    r, g, b = (int(v) for v in px)
    return r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation, red_at", [(1, (4, 4)), (6, (4, 28)), (8, (28, 4)), (3, (28, 28))])
def test_exif_orientation(tmp_path, fmt, orientation, red_at):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise to display; 8: counter-clockwise
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    quadrant_image().save(path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    out = load_image(ImageRef(name=str(path), path=str(path)), 32)
    corners = {(4, 4), (4, 28), (28, 4), (28, 28)}
    assert is_red(out[red_at]), (orientation, out[red_at])
    for other in corners - {red_at}:
        assert not is_red(out[other]), (orientation, other)


def test_exif_orientation_non_square(tmp_path):
    """48x16, top half red: stored wide, displayed tall (orientation 6, clockwise), the top edge becomes the
    right edge; the center crop then shows red on the right, blue on the left (untransposed: red on top)."""
    img = Image.new("RGB", (48, 16), BLUE)
    img.paste(RED, (0, 0, 48, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(ImageRef(name="t.png", data=as_bytes(img, "PNG", exif=exif)), 16)
    assert out.shape == (16, 16, 3)
    assert is_red(out[2, 13]) and is_red(out[13, 13])
    assert tuple(out[2, 2]) == BLUE and tuple(out[13, 2]) == BLUE


@pytest.mark.parametrize("size", [(50, 10), (10, 50)])
def test_center_crop_is_centered(tmp_path, size):
    """Five stripes of 10 px along the long side: the crop is exactly the middle one."""
    colors = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255)]
    img = Image.new("RGB", size)
    for i, c in enumerate(colors):
        img.paste(c, (i * 10, 0, i * 10 + 10, 10) if size[0] > size[1] else (0, i * 10, 10, i * 10 + 10))
    out = load_image(save(img, tmp_path / "s.png"), 10, max_aspect=5.0)
    assert out.shape == (10, 10, 3)
    assert (out == np.array(GREEN, np.uint8)).all()


def test_resize_shorter_side_then_crop(tmp_path):
    """120x40 in three 40-px stripes -> 20x20: the shorter side 40 -> 20 and the green middle third kept."""
    img = Image.new("RGB", (120, 40), RED)
    img.paste(GREEN, (40, 0, 80, 40))
    img.paste(BLUE, (80, 0, 120, 40))
    out = load_image(save(img, tmp_path / "r.png"), 20).astype(int)
    assert out.shape == (20, 20, 3)
    inner = out[:, 2:-2]
    assert (inner[..., 1] == 255).all() and (inner[..., [0, 2]] == 0).all()
    assert (out[..., 1] > 200).all()  # even the edge columns are mostly green (filter support only)


def test_upscale_and_big_downscale(tmp_path):
    small = load_image(save(Image.new("RGB", (10, 12), GREEN), tmp_path / "small.png"), 32)
    assert small.shape == (32, 32, 3) and (small == np.array(GREEN, np.uint8)).all()
    big = load_image(save(Image.new("RGB", (2000, 1500), BLUE), tmp_path / "big.png"), 16)
    assert big.shape == (16, 16, 3) and (big == np.array(BLUE, np.uint8)).all()


# --------------------------------------------------------------------------------------------- reasons


def test_missing_and_empty(tmp_path):
    assert reason(ImageRef(name="x", path=str(tmp_path / "nope.png"))) == "missing_file"
    assert reason(ImageRef(name="x", path=str(tmp_path))) == "missing_file"  # a directory is not an image
    assert reason(ImageRef(name="x")) == "missing_file"  # neither path nor bytes
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason(ImageRef(name="x", path=str(tmp_path / "empty.png"))) == "empty_file"
    assert reason(ImageRef(name="x", data=b"")) == "empty_file"


def test_corrupt_and_truncated(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all" * 10)
    assert reason(ImageRef(name="j", path=str(tmp_path / "junk.jpg"))) == "corrupt_image"
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = as_bytes(noise, fmt)
        assert load_image(ImageRef(name="ok", data=data), 16).shape == (16, 16, 3)
        assert reason(ImageRef(name="t", data=data[: len(data) // 2])) == "corrupt_image", fmt
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on globally


def test_decompression_bomb(monkeypatch):
    data = as_bytes(Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: PIL raises
    assert reason(ImageRef(name="bomb", data=data)) == "corrupt_image"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: only a warning, decoded
    assert load_image(ImageRef(name="ok", data=data), 8).shape == (8, 8, 3)


def test_too_small_and_bad_aspect():
    assert reason(ImageRef(name="s", data=as_bytes(Image.new("RGB", (7, 7))))) == "too_small"
    assert load_image(ImageRef(name="s", data=as_bytes(Image.new("RGB", (8, 8)))), 16).shape == (16, 16, 3)
    assert reason(ImageRef(name="s", data=as_bytes(Image.new("RGB", (20, 7))))) == "too_small"
    assert reason(ImageRef(name="a", data=as_bytes(Image.new("RGB", (100, 20))))) == "bad_aspect_ratio"
    assert reason(ImageRef(name="a", data=as_bytes(Image.new("RGB", (20, 100))))) == "bad_aspect_ratio"
    assert load_image(ImageRef(name="a", data=as_bytes(Image.new("RGB", (80, 20)))), 16).shape == (16, 16, 3)
    assert reason(ImageRef(name="s", data=as_bytes(Image.new("RGB", (12, 12)))), min_size=16) == "too_small"
    assert reason(ImageRef(name="a", data=as_bytes(Image.new("RGB", (30, 20)))), max_aspect=1.2) == "bad_aspect_ratio"


def test_bad_sample_pickles_and_reasons_are_known():
    e = pickle.loads(pickle.dumps(BadSample("too_small", "x.png: 4x4")))
    assert e.reason == "too_small" and "x.png" in str(e)
    for r in ("missing_file", "empty_file", "corrupt_image", "too_small", "bad_aspect_ratio", "empty_caption",
              "non_utf8_caption", "malformed_json", "duplicate_file_name", "unreadable_tar_member"):
        assert r in REASONS


# --------------------------------------------------------------------------------------------- captions


def test_clean_caption():
    assert clean_caption("  a   red\tsquare \n on  blue ") == "a red square on blue"
    assert clean_caption("un café".encode()) == "un café"
    assert clean_caption(bytearray(b"ok")) == "ok"
    assert clean_caption("para one\n  more\n\n\n\npara  two\n", keep_newlines=True) == "para one\nmore\n\npara two"


@pytest.mark.parametrize("raw", [None, "", "   ", " \n\t ", b"", b"  \n", "\u3000\u00a0"])
def test_clean_caption_empty(raw):
    with pytest.raises(BadSample) as e:
        clean_caption(raw)
    assert e.value.reason == "empty_caption"


@pytest.mark.parametrize("raw", [b"caf\xe9", b"\xff\xfe", b"caf\xe9".decode("utf-8", "surrogateescape"), "lone \ud800"])
def test_clean_caption_non_utf8(raw):
    with pytest.raises(BadSample) as e:
        clean_caption(raw)
    assert e.value.reason == "non_utf8_caption"
