"""Labeled sample grids: rows of images, each image nearest-upscaled to a readable size, its row's label at the left.

    grid = labeled_grid(images, prompts, ncol=4)     # images [R * 4, 3, 32, 32] -> [3, R * 130 + 2, 778]
    save_labeled_grid("grid.png", images, prompts, ncol=4)

Text is drawn with Pillow's built-in font (a scalable one where the installed Pillow has it), black on the white
background that also pads the tiles (the shapes world renders on a dark background, so tiles stand out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND = 1.0  # white, for padding and the label column
TEXT = 0  # black (8-bit grey)


def labeled_grid(images: Tensor, labels: Sequence[str], ncol: int, min_side: int = 128, padding: int = 2,
                 label_width: int | None = None) -> Tensor:
    """Lay ``images`` out in rows of ``ncol`` with each row's label written to its left.

    Args:
        images: float [N, 3, H, W] in [0, 1], row-major: row r holds images ``r * ncol ... r * ncol + ncol - 1``.
        labels: one string per row (N == len(labels) * ncol); long labels wrap over several lines, and lines
            that do not fit the row's height are dropped (the last kept line then ends in "...").
        ncol: images per row.
        min_side: each image is nearest-upscaled by the smallest integer k with k * min(H, W) >= min_side
            (k = 1 when it is already that large), so every source pixel becomes an exact k x k block.
        padding: pixels of background around every tile (as ``torchvision.utils.make_grid``).
        label_width: width of the label column in pixels (default: twice the upscaled image width).

    Returns:
        float [3, H', W'] in [0, 1] with H' = R * (k H + padding) + padding and
        W' = label_width + ncol * (k W + padding) + padding, R = len(labels).
    """
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    n, rows = images.shape[0], len(labels)
    if ncol < 1 or n != rows * ncol:
        raise ValueError(f"got {n} images but {rows} labels x ncol={ncol} = {rows * ncol} (need one label per row)")
    k = max(1, math.ceil(min_side / min(images.shape[-2:])))
    tiles = images.float().repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)  # [N, 3, kH, kW]
    side_h, side_w = tiles.shape[-2:]
    grid = make_grid(tiles, nrow=ncol, padding=padding, pad_value=BACKGROUND)  # [3, H', ncol (kW + p) + p]
    width = 2 * side_w if label_width is None else label_width

    column = Image.new("L", (width, grid.shape[1]), color=round(BACKGROUND * 255))
    draw = ImageDraw.Draw(column)
    font = _font(max(10, side_h // 8))
    line_h = _line_height(draw, font)
    box_w = width - 2 * padding - 4  # text area: inset from the column's left edge and from the first tile
    for r, label in enumerate(labels):
        lines = _wrap(draw, label, font, box_w)
        fit = max(1, side_h // line_h)
        if len(lines) > fit:
            lines = lines[: fit - 1] + [lines[fit - 1].rstrip() + "..."]
        top = padding + r * (side_h + padding) + (side_h - len(lines) * line_h) // 2  # vertically centred
        for i, line in enumerate(lines):
            draw.text((padding + 4, top + i * line_h), line, fill=TEXT, font=font)
    text = torch.from_numpy(np.asarray(column, dtype=np.float32) / 255).expand(3, -1, -1)  # [3, H', width]
    return torch.cat([text, grid], dim=2)


def save_labeled_grid(path: str | Path, images: Tensor, labels: Sequence[str], ncol: int, **kwargs) -> Tensor:
    """``labeled_grid(images, labels, ncol, **kwargs)`` written to ``path`` (PNG); returns the [3, H', W'] grid."""
    from torchvision.utils import save_image

    grid = labeled_grid(images, labels, ncol, **kwargs)
    save_image(grid, path)
    return grid


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (scalable since Pillow 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError, AttributeError):  # older Pillow, or Pillow built without FreeType
        return ImageFont.load_default()


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    top, bottom = draw.textbbox((0, 0), "Ag|", font=font)[1::2]
    return bottom - top + 3


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` split into lines no wider than ``width`` px (at word boundaries; a too-long word is cut)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:  # cut an over-long word
            cut = 1
            while draw.textlength(word[: cut + 1], font=font) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines
