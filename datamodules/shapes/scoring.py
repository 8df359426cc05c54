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
    _LOCATIONS,
    BACKGROUND,
    COLORS,
    FAMILIES,
    MIN_SIZE_FRAC,
    NUMBER_WORDS,
    SHAPES,
    Prompt,
    Scene,
    _location,  # the words scene_caption uses for an object's coarse location and size
    _size_word,
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


# ----------------------------------------------------------------------------- caption precision and recall

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "location")  # the facts a scene holds per object
_LOCATION_PHRASES = tuple(loc for row in _LOCATIONS for loc in row)  # "in the top left", ..., "in the center"
_LOC = "|".join(re.escape(p) for p in _LOCATION_PHRASES)
_SIZE = "small|medium|large"
# A mention: [determiner or number] [size] [color] shape[s] [[is] location], or a total "<number> objects".
_MENTION_RE = re.compile(
    rf"\b(?:(a|an|another|the|{_NUM}) )?(?:({_SIZE}) )?(?:({_COLOR}) )?\b({_SHAPE})(s?)\b(?:(?: is)? ({_LOC})\b)?"
    rf"|\b({_NUM}) (?:objects?|shapes?)\b"
)
# What may stand between two mentions for a relation: "<a> [is|placed] <rel> [and <rel>] <b>".
_BETWEEN_RE = re.compile(rf" (?:is |placed )?((?:{_REL})(?: and (?:{_REL}))*) ")
# describe()'s summaries list counts ("this picture contains a circle and two triangles", "... objects: a
# circle"); their "a circle" means exactly one circle and re-mentions objects that later sentences describe.
_SUMMARY_RE = re.compile(r"\bcontains\b[^.]*|:[^.]*")


@dataclass(frozen=True)
class Described:
    """What a phrase states about one object ("a small red circle in the top left"); None = not stated."""

    shape: str
    color: str | None = None
    size: str | None = None
    location: str | None = None

    def stated(self) -> dict[str, str]:
        """{attribute: value} of the stated attributes, in ATTRIBUTES order."""
        return {a: v for a in ATTRIBUTES if (v := getattr(self, a)) is not None}


@dataclass(frozen=True)
class Claim:
    """One checkable statement of a caption; `text` is the phrase it was read from.

    kind "object": an object fitting `what` exists, distinct from the objects of the other object claims;
    "count": exactly `count` objects fit `what`; "total": the scene has exactly `count` objects;
    "relation": some object fitting `what` is `relation` ("left of", "right of", "above", "below") of another
    object fitting `other`, under GenEval's rule (`relations_between`).
    """

    kind: str
    text: str
    what: Described | None = None
    count: int | None = None
    relation: str | None = None
    other: Described | None = None


def caption_claims(text: str) -> list[Claim]:
    """The claims of a caption in the shapes world's phrasing (prompt captions, `scene_caption`, `describe`).

    "a/an/another [size] [color] shape [location]" (or no article) -> an "object" claim; "<number> ... shape(s)"
    -> a "count" claim, as is each item of describe()'s summary list; "<number> objects/shapes" -> a "total"
    claim; each relation word between two mentions (definite ones too: "the red circle") -> a "relation"
    claim. A definite mention ("the red circle") refers to an object stated elsewhere and claims nothing by
    itself; text the grammar does not cover ("a photo of", "the background is dark") claims nothing.
    """
    text = " ".join(text.lower().split())
    summaries = [m.span() for m in _SUMMARY_RE.finditer(text)]
    mentions = list(_MENTION_RE.finditer(text))
    claims: list[Claim] = []
    for m in mentions:
        det, size, color, shape, _, location, total = m.groups()
        if total:
            claims.append(Claim("total", m.group(), count=_WORD_NUMBERS[total]))
            continue
        if det == "the":
            continue
        what = Described(shape, color or None, size or None, location or None)
        in_summary = any(lo <= m.start() < hi for lo, hi in summaries)
        if det in _WORD_NUMBERS or in_summary:
            claims.append(Claim("count", m.group(), what, count=_WORD_NUMBERS.get(det, 1)))
        else:
            claims.append(Claim("object", m.group(), what))
    for a, b in zip(mentions, mentions[1:], strict=False):  # consecutive mentions
        between = _BETWEEN_RE.fullmatch(text, a.end(), b.start())
        if between is None or a.group(7) or b.group(7):  # no relation, or a total count as an end
            continue
        what, other = (Described(*(g or None for g in m.group(4, 3, 2, 6))) for m in (a, b))
        for rel in between.group(1).split(" and "):
            claims.append(Claim("relation", text[a.start():b.end()], what, relation=rel.removeprefix("to the "),
                                other=other))
    return claims


def object_attributes(scene: Scene) -> list[dict[str, str]]:
    """Per object of `scene`, its {attribute: value} in the words captions use (`scene_caption`'s size and
    location words: "small"/"medium"/"large", "in the top left", ...)."""
    return [{"shape": o.shape, "color": o.color, "size": _size_word(o, scene.size),
             "location": _location(o, scene.size)} for o in scene.objects]


def scene_facts(scene: Scene) -> set[tuple[int, str]]:
    """The facts a caption can recall: (object index, attribute) for every object and every ATTRIBUTES entry.

    Relations are not facts of their own: they follow from the objects' locations, and the world's complete
    caption (`scene_caption`) states none, so counting them would keep a complete caption's recall below 1."""
    return {(i, a) for i in range(len(scene.objects)) for a in ATTRIBUTES}


def _fits(what: Described, attrs: dict[str, str]) -> bool:
    return all(attrs[a] == v for a, v in what.stated().items())


def _assign_objects(claims: Sequence[Claim], attrs: list[dict[str, str]],
                    covered: frozenset) -> tuple[int, frozenset]:
    """(true object claims, covered facts) of the best one-to-one assignment of object claims to fitting objects.

    "Best" maximizes the true claims, then the facts covered together with `covered` (those of true count
    claims). Exact: a dynamic program over the claims whose state is (objects used, facts covered); scenes
    hold at most four objects, so the states stay few.
    """
    states: dict[tuple[int, frozenset], int] = {(0, frozenset()): 0}
    for c in claims:
        new = dict(states)  # the claim left unassigned (false)
        for (used, cov), t in states.items():
            for i, a in enumerate(attrs):
                if not used >> i & 1 and _fits(c.what, a):
                    key = (used | 1 << i, cov | {(i, k) for k in c.what.stated()})
                    new[key] = max(new.get(key, -1), t + 1)
        states = new
    t, cov = max(((t, cov | covered) for (_, cov), t in states.items()), key=lambda x: (x[0], len(x[1])))
    return t, cov


def _claim_true(c: Claim, scene: Scene, attrs: list[dict[str, str]]) -> bool:
    """Truth of a count, total or relation claim (object claims are decided jointly by `_assign_objects`)."""
    if c.kind == "count":
        return sum(_fits(c.what, a) for a in attrs) == c.count
    if c.kind == "total":
        return len(attrs) == c.count
    objs = scene.objects
    return any(i != j and _fits(c.what, attrs[i]) and _fits(c.other, attrs[j])
               and c.relation in relations_between(objs[i], objs[j])
               for i in range(len(objs)) for j in range(len(objs)))


def caption_scores(text: str, scene: Scene) -> dict[str, float]:
    """{"precision", "recall", "f1"} of caption `text` against the ground-truth `scene`.

    precision: true claims / stated claims (`caption_claims`); object claims are matched one-to-one to the
    scene's objects ("a red circle and a red circle" needs two red circles), choosing the matching with
    the most true claims. recall: facts of `scene_facts` (each object's shape, color, size, location) stated
    by a true object claim (its matched object) or a true count claim (all the objects it counts) / all
    facts. f1: their harmonic mean. A caption with no claims scores 0, 0, 0; so does an empty scene's recall.
    """
    claims = caption_claims(text)
    if not claims:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    attrs = object_attributes(scene)
    n_true, covered = 0, set()
    for c in claims:
        if c.kind != "object" and _claim_true(c, scene, attrs):
            n_true += 1
            if c.kind == "count":
                covered |= {(i, k) for i, a in enumerate(attrs) if _fits(c.what, a) for k in c.what.stated()}
    objects_true, covered = _assign_objects([c for c in claims if c.kind == "object"], attrs, frozenset(covered))
    precision = (n_true + objects_true) / len(claims)
    facts = scene_facts(scene)
    recall = len(covered & facts) / len(facts) if facts else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
