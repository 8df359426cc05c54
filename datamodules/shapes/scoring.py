"""A GenEval-style compositional scorer for (generated) shapes-world images, and a caption checker.

`detect` finds objects in an image without a learned detector: every pixel is explained as a mix
`BACKGROUND + alpha * (COLOR - BACKGROUND)` of the background and its best-fitting palette color,
which makes anti-aliased, blurred or dimmed pixels keep their hue. Pixels with alpha >= 0.5 form
per-color connected components; shape comes from soft (alpha-weighted) geometry, which survives
blur and noise far better than a thresholded mask. A component counts as an object only if it could
be one of the world's: the ideal shape fits it, it is not much smaller than the smallest object, and
its pixels keep one palette hue (a VAE decode of random latents, what an untrained model draws, makes
small muddy blobs that fail these). `score` then checks every clause of a `Prompt` the way GenEval
does, and `geneval_scores` aggregates per family.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .world import (
    BACKGROUND,
    COLORS,
    FAMILIES,
    MIN_SIZE_FRAC,
    NUMBER_WORDS,
    SHAPES,
    Prompt,
    Scene,
    relations_between,
)

CORE_ALPHA = 0.5  # a pixel is foreground if at least half of it is covered by some color
SPLIT_ALPHA = 0.8  # bridges between blurred neighbours stay below this
MAX_OFF_HUE = 0.5  # sin(angle) between a pixel's and its color's direction from the background
TRIANGLE_DROP = 0.04  # triangle: mass centroid sits ~H/6 below the bbox center (0 for circle/square)
SQUARE_FILL = 0.89  # soft fill of the bbox: square ~1.0, circle ~0.785, triangle ~0.5
MIN_FIT = 0.6  # IoU with the ideal shape at the detected box; below it a blob is not an object
# Smallest detected bbox side, as a fraction of the world's smallest object (MIN_SIZE_FRAC): renders measure >= 0.89
# of it, noisy + blurred renders >= 0.80, VAE reconstructions >= 0.85; half of the blobs of random latents < 0.77.
MIN_SIZE = 0.75
# Largest mean off-hue (MAX_OFF_HUE's sine) over an object's core pixels: renders ~0.001, noisy + blurred <= 0.05,
# tinted <= 0.15, VAE reconstructions <= 0.19 (95 % <= 0.09); blobs of random latents mix hues (median 0.24).
MAX_MEAN_OFF_HUE = 0.2


@dataclass(frozen=True)
class Detection:
    """A detected object. (cx, cy) is the bbox center in pixels (as in `Obj`, so
    `relations_between` applies); `size` the bbox side max(width, height); `area` core pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float
    area: int


def _alpha_and_color(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> (alpha float [H, W] in [0, 1], color index int [H, W], -1 = no color,
    off-hue float [H, W]: sin of the angle between the pixel's and its color's direction from the background).

    alpha is the projection of (pixel - background) onto (COLOR - BACKGROUND) for the color whose
    line through the background fits the pixel best; off-hue pixels (noise, gray) get index -1.
    `background` is estimated from the image itself (a generated one may be tinted or dimmed).
    """
    pixels = image.reshape(-1, 3).astype(np.float32)
    # Estimate the background from the darkest quarter of the pixels (objects cover well under 3/4
    # of a scene and every palette color is much brighter): a global tint/dimming then cancels.
    dark = pixels[np.argsort(pixels.sum(1))[: max(1, len(pixels) // 4)]]
    d = image.astype(np.float32) - np.median(dark, axis=0)  # [H, W, 3]
    u = np.asarray(list(COLORS.values()), np.float32) - np.asarray(BACKGROUND, np.float32)  # [K, 3]
    alpha = d @ u.T / (u * u).sum(1)  # [H, W, K]
    resid = np.linalg.norm(d[..., None, :] - alpha[..., None] * u, axis=-1)  # [H, W, K]
    resid = np.where(alpha > 0, resid, np.inf)  # a color can't be "subtracted" from the background
    k = resid.argmin(-1)
    a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    r = np.take_along_axis(resid, k[..., None], -1)[..., 0]
    off_hue = r / np.maximum(np.linalg.norm(d, axis=-1), 1e-6)
    return np.clip(a, 0.0, 1.0), np.where(off_hue <= MAX_OFF_HUE, k, -1), off_hue


def _ideal(shape: str, cx: float, cy: float, size: float, h: int, w: int, k: int = 4) -> np.ndarray:
    """Coverage [h, w] of the renderer's `shape` with bbox center (cx, cy) and side `size` (k x k samples/pixel)."""
    xs = ((np.arange(w * k) + 0.5) / k)[None, :]
    ys = ((np.arange(h * k) + 0.5) / k)[:, None]
    r = size / 2
    if shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    else:
        mask = (ys <= cy + r) & (np.abs(xs - cx) <= (ys - (cy - r)) / 2)
    return mask.reshape(h, k, w, k).mean(axis=(1, 3))


def _classify(w: np.ndarray) -> tuple[str, float, float, float, float]:
    """Soft mask w [h, w] (alpha of one component, with a 1-px halo) -> (shape, cx, cy, size, fit), local coords;
    ``fit`` is the IoU of w's half-coverage region with the ideal shape at that box (1 for a clean render, low for a
    shapeless blob).

    Width/height are sums of the column/row max profiles: for any of the three shapes the widest
    row (column) is fully covered, so these measure the bbox side with sub-pixel accuracy even
    under blur (which spreads an edge but preserves its integral).
    """
    w = np.clip(w / max(float(np.percentile(w, 95)), 1e-6), 0.0, 1.0)  # dimmed objects: interior -> 1
    cols, rows = w.max(0), w.max(1)
    width, height = float(cols.sum()), float(rows.sum())
    xs, ys = np.arange(w.shape[1]) + 0.5, np.arange(w.shape[0]) + 0.5
    cx, cy = float(cols @ xs / cols.sum()), float(rows @ ys / rows.sum())  # profile centers = bbox centers
    mass = float(w.sum())
    drop = (float(w.sum(1) @ ys) / mass - cy) / height  # mass centroid below bbox center, / height
    fill = mass / (width * height)
    if drop > TRIANGLE_DROP:
        shape = "triangle"
    else:
        shape = "square" if fill > SQUARE_FILL else "circle"
    size = max(width, height)
    ideal = _ideal(shape, cx, cy, size, *w.shape)
    # IoU of the half-coverage regions: blur moves an edge's 0.5 level little, a blob's outline a lot.
    a, b = w >= 0.5, ideal >= 0.5
    fit = float((a & b).sum() / max(int((a | b).sum()), 1))
    return shape, cx, cy, size, fit


def _split(core: np.ndarray, alpha: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Split a bool [h, w] component into objects that blur has bridged (same-color neighbours
    1-2 px apart): their cores separate at a higher alpha; every pixel goes to the nearest one."""
    peak = float(np.percentile(alpha[core], 90))  # relative, so dimmed objects split too
    seeds, n = ndimage.label(core & (alpha >= SPLIT_ALPHA * peak))
    sizes = ndimage.sum(np.ones_like(seeds), seeds, index=np.arange(1, n + 1))
    big = np.flatnonzero(sizes >= min_area / 2) + 1
    if len(big) < 2:
        return [core]
    seeds = np.where(np.isin(seeds, big), seeds, 0)
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[iy, ix]
    return [core & (nearest == j) for j in big]


def detect(image: np.ndarray, min_area: int | None = None) -> list[Detection]:
    """Objects in a uint8 [H, W, 3] image. Components with fewer than `min_area` core pixels
    (default H*W/100, i.e. ~10 px at 32x32: noise specks), a non-square bbox, a poor fit of the ideal shape,
    a size well below the world's smallest object or mixed hues are dropped."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    min_area = max(1, round(h * w / 100)) if min_area is None else min_area
    alpha, cidx, off_hue = _alpha_and_color(image)
    min_size = MIN_SIZE * MIN_SIZE_FRAC * max(h, w)
    names = list(COLORS)
    out = []
    for k, name in enumerate(names):
        same = cidx == k
        labels, _ = ndimage.label(same & (alpha >= CORE_ALPHA))
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[sl] == i
            if component.sum() < min_area:  # most noise specks: skip the work below
                continue
            for core in _split(component, alpha[sl], min_area):
                area = int(core.sum())
                bh, bw = np.ptp(np.nonzero(core), axis=1) + 1
                if area < min_area or not 0.5 <= bw / bh <= 2.0:  # objects are never elongated
                    continue
                # Soft mask: the core plus its same-color 1-px halo (anti-aliased / blurred rim).
                y0, x0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
                win = (slice(y0, sl[0].stop + 1), slice(x0, sl[1].stop + 1))
                oy, ox = sl[0].start - y0, sl[1].start - x0
                pad = np.zeros(labels[win].shape, bool)
                pad[oy:oy + core.shape[0], ox:ox + core.shape[1]] = core
                grown = ndimage.binary_dilation(pad, np.ones((3, 3), bool)) & ((labels[win] == 0) | pad)
                soft = np.where(grown & same[win], alpha[win], 0.0)
                shape, cx, cy, size, fit = _classify(soft)
                if fit < MIN_FIT:  # a shapeless blob (e.g. an undertrained model's smudge) is no object
                    continue
                if size < min_size or float(off_hue[win][pad].mean()) > MAX_MEAN_OFF_HUE:  # a small or muddy blob
                    continue
                out.append(Detection(shape, name, x0 + cx, y0 + cy, size, area))
    return out


@dataclass
class ClauseResult:
    """One checked clause: a human-readable description, whether it holds, and the detections it used."""

    clause: str
    ok: bool
    matched: list[Detection] = field(default_factory=list)


def _matching(dets: Sequence[Detection], shape: str, color: str | None = None) -> list[Detection]:
    return [d for d in dets if d.shape == shape and (color is None or d.color == color)]


def _clauses(prompt: Prompt, dets: list[Detection]) -> list[ClauseResult]:
    f, items = prompt.family, prompt.items
    if f == "counting":  # GenEval counts only the prompted class, and exactly
        m = _matching(dets, items[0].shape)
        return [ClauseResult(f"exactly {items[0].count} {items[0].shape}", len(m) == items[0].count, m)]
    out = []
    for it in items:  # single_object, two_object, colors, color_attr: existence of each (colored) object
        m = _matching(dets, it.shape, it.color)
        out.append(ClauseResult(f"a {it.color or ''} {it.shape}".replace("  ", " "), bool(m), m))
    if f == "position":
        # Like GenEval's first (most confident) detection per class: the largest one.
        a, b = (max(_matching(dets, it.shape), key=lambda d: d.area, default=None) for it in items)
        ok = a is not None and b is not None and prompt.relation in relations_between(a, b)
        out.append(ClauseResult(f"{items[0].shape} {prompt.relation} {items[1].shape}", ok, [d for d in (a, b) if d]))
    return out


def explain(prompt: Prompt, image: np.ndarray) -> dict:
    """{"family", "ok", "clauses": [ClauseResult], "detections": [Detection]} for debugging."""
    dets = detect(image)
    clauses = _clauses(prompt, dets)
    return {"family": prompt.family, "ok": all(c.ok for c in clauses), "clauses": clauses, "detections": dets}


def score(prompt: Prompt, image: np.ndarray) -> bool:
    """True iff every clause of `prompt` holds in the uint8 [H, W, 3] `image`."""
    return explain(prompt, image)["ok"]


def geneval_scores(prompts: Sequence[Prompt], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Per-family accuracy (families present only) and "overall" = unweighted mean of those."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    hits: dict[str, list[bool]] = {}
    for p, img in zip(prompts, images, strict=True):
        hits.setdefault(p.family, []).append(score(p, img))
    out = {f: float(np.mean(hits[f])) for f in FAMILIES if f in hits}
    if out:
        out["overall"] = float(np.mean(list(out.values())))
    return out


# ----------------------------------------------------------------------------- captions

_WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}
_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_NUM = "|".join(_WORD_NUMBERS)
# An object phrase: [number] [size] [color] shape[s]   ("two red circles", "a small blue square").
_OBJ = rf"(?:\b({_NUM}) )?(?:(?:small|medium|large) )?(?:\b({_COLOR}) )?\b({_SHAPE})(s?)\b"
_REL = r"(?:to the )?(?:left|right) of|above|below"
# "<obj> [is|placed] <rel> [and <rel>] a|an|the <obj>"
_RELATION_RE = re.compile(rf"{_OBJ} (?:is |placed )?((?:{_REL})(?: and (?:{_REL}))*) (?:a|an|the) {_OBJ}")
_OBJ_RE = re.compile(_OBJ)
_TOTAL_RE = re.compile(rf"\b({_NUM}) (?:objects?|shapes?)\b")


def caption_attributes_correct(text: str, scene: Scene) -> float:
    """Fraction of checkable claims in `text` that are true of `scene`; 0.0 if it claims nothing.

    Claims: each object phrase ("a red circle": such an object exists; "two circles" / "one circle":
    exactly that many of that shape, and color if stated), each total count ("three objects"),
    and each relation word of "<obj> ... left of / right of / above / below ... <obj>" (some pair
    of matching objects satisfies it under GenEval's rule).
    """
    text = text.lower()
    objs = scene.objects
    claims: list[bool] = []
    for num, color, shape, _ in _OBJ_RE.findall(text):
        m = [o for o in objs if o.shape == shape and (not color or o.color == color)]
        claims.append(len(m) == _WORD_NUMBERS[num] if num else bool(m))
    claims += [len(objs) == _WORD_NUMBERS[n] for n in _TOTAL_RE.findall(text)]
    for g in _RELATION_RE.findall(text):
        (ca, sa), rels, (cb, sb) = g[1:3], g[4], g[6:8]
        a_set = [o for o in objs if o.shape == sa and (not ca or o.color == ca)]
        b_set = [o for o in objs if o.shape == sb and (not cb or o.color == cb)]
        for rel in rels.split(" and "):
            rel = rel.removeprefix("to the ")
            claims.append(any(a is not b and rel in relations_between(a, b) for a in a_set for b in b_set))
    return float(np.mean(claims)) if claims else 0.0
