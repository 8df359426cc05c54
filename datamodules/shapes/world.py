"""The "shapes world": a tiny procedurally rendered, GenEval-style text-to-image world.

Scenes hold 1–4 non-overlapping circles/squares/triangles in 6 colors on a dark background.
Prompts come from the six GenEval task families and carry a structured spec (`Prompt`) so a
scorer can check every clause against the ground-truth `Scene`. Everything is pure numpy and
a deterministic function of the random generator passed in.

Coordinates: pixels, x to the right, y down; pixel (row i, col j) covers [j, j+1) x [i, i+1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Saturated, well-separated colors so they survive a lossy autoencoder (min pairwise L2 > 140).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 180, 40),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 50, 210),
    "cyan": (30, 220, 230),
}
BACKGROUND: tuple[int, int, int] = (16, 16, 16)
FAMILIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

MIN_SIZE_FRAC, MAX_SIZE_FRAC = 7 / 32, 13 / 32  # object bbox side / image side (7–13 px at 32)
SUPERSAMPLE = 4  # anti-aliasing: k×k samples per pixel, then area-average
POSITION_THRESHOLD = 0.1  # GenEval's margin, as a fraction of the summed object sizes
_CANDIDATES = 32  # placement candidates drawn per object per try (vectorized rejection sampling)
# Unit vector of "items[0] relative to items[1]" for each relation (y points down).
_DIRECTIONS = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}

# Caption templates. {a}/{b}: object phrase ("red circle" / "circle"); {n}: number word;
# {p}: plural shape; {r}: relation phrase. "a" becomes "an" before vowels afterwards.
_ONE = ("a {a}", "a photo of a {a}", "an image of a {a}", "one {a}")
_TWO = ("a {a} and a {b}", "a photo of a {a} and a {b}", "an image of a {a} and a {b}", "a {a} together with a {b}")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": _ONE,
    "two_object": _TWO,
    "counting": ("{n} {p}", "a photo of {n} {p}", "an image of {n} {p}", "exactly {n} {p}"),
    "colors": _ONE,
    "position": (
        "a {a} {r} a {b}", "a photo of a {a} {r} a {b}", "an image of a {a} {r} a {b}", "a {a} placed {r} a {b}"
    ),
    "color_attr": _TWO,
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}


@dataclass(frozen=True)
class Item:
    """One clause subject of a prompt: `count` objects of `shape`; `color` None = unstated."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Prompt:
    """Structured prompt. For `position`, the clause is `items[0] <relation> items[1]`."""

    family: str
    items: tuple[Item, ...]
    relation: str | None = None


@dataclass(frozen=True)
class Obj:
    """A rendered object: center (cx, cy) and bounding-box side `size`, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the axis-aligned bounding box."""
        r = self.size / 2
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)


@dataclass(frozen=True)
class Scene:
    """Objects listed in prompt item order (item i expanded to `count` objects)."""

    objects: tuple[Obj, ...]
    size: int


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields elementwise is ambiguous
class Sample:
    index: int
    prompt: Prompt
    caption: str
    scene: Scene
    image: np.ndarray  # uint8 [H, W, 3]


# ----------------------------------------------------------------------------- validation

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_size(size, name: str = "size") -> int:
    if not _is_int(size) or size < 16:
        raise ValueError(f"{name} must be an int >= 16, got {size!r}")
    return int(size)


def _check_families(families: Sequence[str]) -> tuple[str, ...]:
    if isinstance(families, str):  # a bare string would be iterated character by character
        families = (families,)
    families = tuple(families)
    if not families:
        raise ValueError("families must be a non-empty sequence of family names")
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"families: unknown family {f!r}; expected a subset of {FAMILIES}")
    return families


def _check_prompt(prompt: Prompt) -> None:
    if prompt.family not in FAMILIES:
        raise ValueError(f"prompt.family must be one of {FAMILIES}, got {prompt.family!r}")
    n_items = 2 if prompt.family in ("two_object", "position", "color_attr") else 1
    if len(prompt.items) != n_items:
        raise ValueError(f"prompt.items: family {prompt.family!r} needs {n_items} item(s), got {len(prompt.items)}")
    for it in prompt.items:
        if it.shape not in SHAPES:
            raise ValueError(f"prompt.items: unknown shape {it.shape!r}; expected one of {SHAPES}")
        if it.color is not None and it.color not in COLORS:
            raise ValueError(f"prompt.items: unknown color {it.color!r}; expected one of {tuple(COLORS)}")
        if not _is_int(it.count) or not 1 <= it.count <= 4:
            raise ValueError(f"prompt.items: count must be an int in 1..4, got {it.count!r}")
    if sum(it.count for it in prompt.items) > 4:
        raise ValueError("prompt.items: at most 4 objects in total")
    if (prompt.family == "position") != (prompt.relation is not None):
        raise ValueError("prompt.relation must be set exactly for the 'position' family")
    if prompt.relation is not None and prompt.relation not in RELATIONS:
        raise ValueError(f"prompt.relation must be one of {RELATIONS}, got {prompt.relation!r}")


# ----------------------------------------------------------------------------- prompts

def sample_prompt(rng: np.random.Generator, families: Sequence[str] = FAMILIES) -> Prompt:
    """Draw a family uniformly from `families`, then its clauses."""
    families = _check_families(families)
    family = families[rng.integers(len(families))]
    s1, s2 = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    names = list(COLORS)
    c1, c2 = (names[i] for i in rng.choice(len(names), 2, replace=False))
    if family == "single_object":
        return Prompt(family, (Item(s1),))
    if family == "two_object":
        return Prompt(family, (Item(s1), Item(s2)))
    if family == "counting":
        return Prompt(family, (Item(s1, count=int(rng.integers(2, 5))),))
    if family == "colors":
        return Prompt(family, (Item(s1, c1),))
    if family == "position":
        return Prompt(family, (Item(s1), Item(s2)), RELATIONS[rng.integers(len(RELATIONS))])
    return Prompt(family, (Item(s1, c1), Item(s2, c2)))  # color_attr


def caption(prompt: Prompt, rng: np.random.Generator) -> str:
    """A lower-case caption for `prompt`, with a random template from TEMPLATES[family]."""
    _check_prompt(prompt)
    templates = TEMPLATES[prompt.family]
    template = templates[rng.integers(len(templates))]
    phrase = [f"{it.color} {it.shape}" if it.color else it.shape for it in prompt.items]
    it0 = prompt.items[0]
    fields = {"a": phrase[0], "b": phrase[-1], "n": NUMBER_WORDS[it0.count], "p": PLURALS[it0.shape], "r": ""}
    if prompt.relation is not None:
        options = RELATION_PHRASES[prompt.relation]
        fields["r"] = options[rng.integers(len(options))]
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(**fields))


# ----------------------------------------------------------------------------- scenes

def relations_between(a: Obj, b: Obj) -> set[str]:
    """GenEval's rule: relations of `a` relative to `b` ("left of" = a is left of b).

    Center offsets are shrunk by POSITION_THRESHOLD x (summed sizes) per axis, normalized by the
    raw offset length; a direction holds if its normalized component exceeds 0.5.
    """
    dx, dy = a.cx - b.cx, a.cy - b.cy
    norm = math.hypot(dx, dy)
    margin = POSITION_THRESHOLD * (a.size + b.size)
    rx = math.copysign(max(abs(dx) - margin, 0.0), dx)
    ry = math.copysign(max(abs(dy) - margin, 0.0), dy)
    if norm == 0 or (abs(rx) < 1e-3 and abs(ry) < 1e-3):
        return set()
    rx, ry = rx / norm, ry / norm
    out = set()
    if rx < -0.5:
        out.add("left of")
    if rx > 0.5:
        out.add("right of")
    if ry < -0.5:
        out.add("above")
    if ry > 0.5:
        out.add("below")
    return out


def _place(shapes: list[str], rng: np.random.Generator, size: int, relation: str | None) -> list[tuple]:
    """Rejection-sample (cx, cy, s) for each shape: inside the image, bboxes >= 1 px apart.

    With `relation`, object 0 must be clearly <relation> object 1: separated along that axis
    and the perpendicular offset at most half the along-axis one, which makes the stated
    relation the only one GenEval's rule reports.
    """
    lo, hi = MIN_SIZE_FRAC * size, MAX_SIZE_FRAC * size
    for attempt in range(200):
        top = hi - (hi - lo) * min(1.0, attempt / 20)  # crowded scenes: shrink objects slowly
        placed: list[tuple[float, float, float]] = []
        for i in range(len(shapes)):
            s = rng.uniform(lo, top, _CANDIDATES)
            cx = rng.uniform(s / 2, size - s / 2)
            cy = rng.uniform(s / 2, size - s / 2)
            ok = np.ones(_CANDIDATES, bool)
            for px, py, ps in placed:
                gap = (s + ps) / 2 + 1
                ok &= (np.abs(cx - px) >= gap) | (np.abs(cy - py) >= gap)
            if relation is not None and i == 1:
                (ax, ay, a_s), (vx, vy) = placed[0], _DIRECTIONS[relation]
                along = (ax - cx) * vx + (ay - cy) * vy
                perp = np.abs((ax - cx) * vy - (ay - cy) * vx)
                ok &= (along >= (a_s + s) / 2 + 1) & (perp <= 0.5 * along)
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break
            j = hits[0]
            placed.append((float(cx[j]), float(cy[j]), float(s[j])))
        else:
            return placed
    raise RuntimeError(f"could not place {len(shapes)} objects in a {size}x{size} image")


def sample_scene(prompt: Prompt, rng: np.random.Generator, size: int = 32) -> Scene:
    """A scene containing exactly what `prompt` states; unstated colors are uniform random."""
    _check_prompt(prompt)
    size = _check_size(size)
    names = list(COLORS)
    shapes, colors = [], []
    for it in prompt.items:
        for _ in range(it.count):
            shapes.append(it.shape)
            colors.append(it.color if it.color is not None else names[rng.integers(len(names))])
    geo = _place(shapes, rng, size, prompt.relation)
    return Scene(tuple(Obj(sh, c, cx, cy, s) for sh, c, (cx, cy, s) in zip(shapes, colors, geo, strict=True)), size)


def _random_scene(rng: np.random.Generator, size: int) -> Scene:
    """1–4 objects of independent random shapes and colors (for text-only documents)."""
    n = int(rng.integers(1, 5))
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
    names = list(COLORS)
    colors = [names[i] for i in rng.integers(len(names), size=n)]
    geo = _place(shapes, rng, size, None)
    return Scene(tuple(Obj(sh, c, cx, cy, s) for sh, c, (cx, cy, s) in zip(shapes, colors, geo, strict=True)), size)


def render(scene: Scene) -> np.ndarray:
    """Rasterize `scene` -> uint8 [size, size, 3], anti-aliased by SUPERSAMPLE^2 point samples per pixel."""
    n, k = scene.size, SUPERSAMPLE
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUND
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        px0, py0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
        px1, py1 = min(int(math.ceil(x1)), n), min(int(math.ceil(y1)), n)
        # Only the bbox's pixels are rasterized: sample points at sub-pixel centers.
        xs = ((np.arange(px0 * k, px1 * k) + 0.5) / k)[None, :]
        ys = ((np.arange(py0 * k, py1 * k) + 0.5) / k)[:, None]
        r = o.size / 2
        if o.shape == "circle":
            mask = (xs - o.cx) ** 2 + (ys - o.cy) ** 2 <= r * r
        elif o.shape == "square":
            mask = (np.abs(xs - o.cx) <= r) & (np.abs(ys - o.cy) <= r)
        else:  # upward triangle: apex at top-center, base = bottom edge of the bbox
            mask = (ys <= o.cy + r) & (np.abs(xs - o.cx) <= (ys - (o.cy - r)) / 2)
        h, w = py1 - py0, px1 - px0
        cov = mask.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)[..., None]
        region = img[py0:py1, px0:px1]
        region += cov * (np.asarray(COLORS[o.color], np.float32) - region)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- descriptions

_LOCATIONS = (("in the top left", "at the top", "in the top right"),
              ("on the left", "in the center", "on the right"),
              ("in the bottom left", "at the bottom", "in the bottom right"))
_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def _size_word(o: Obj, size: int) -> str:
    t = (o.size / size - MIN_SIZE_FRAC) / (MAX_SIZE_FRAC - MIN_SIZE_FRAC)
    return "small" if t < 1 / 3 else "medium" if t < 2 / 3 else "large"


def _location(o: Obj, size: int) -> str:
    col, row = (min(int(v / size * 3), 2) for v in (o.cx, o.cy))
    return _LOCATIONS[row][col]


def _summary(objects: Sequence[Obj]) -> str:
    """'two circles and a triangle': counts per shape, in order of first appearance."""
    counts: dict[str, int] = {}
    for o in objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1
    parts = [f"a {s}" if c == 1 else f"{NUMBER_WORDS[c]} {PLURALS[s]}" for s, c in counts.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation_text(rels: set[str]) -> str:
    vertical = [_REL_TEXT[r] for r in ("above", "below") if r in rels]
    horizontal = [_REL_TEXT[r] for r in ("left of", "right of") if r in rels]
    return " and ".join(vertical + horizontal)


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A one-line caption stating every object's size, color, shape and coarse location, in random order:
    'a small red circle in the top left and a large blue square on the right'."""
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    parts = [f"a {_size_word(o, scene.size)} {o.color} {o.shape} {_location(o, scene.size)}" for o in objs]
    return " and ".join(parts)


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A multi-sentence, lower-case description: count, then each object's size, color, shape
    and coarse location, with relations (GenEval's rule) to earlier objects when unambiguous."""
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    n = len(objs)
    if n == 0:
        return "the image is empty."
    noun = ("object", "objects") if rng.random() < 0.5 else ("shape", "shapes")
    opening = [f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun[n > 1]}.",
               f"the image shows {NUMBER_WORDS[n]} {noun[n > 1]}: {_summary(objs)}.",
               f"this picture contains {_summary(objs)}."]
    sentences = [opening[rng.integers(len(opening))]]
    words = {id(o): f"{_size_word(o, scene.size)} {o.color} {o.shape}" for o in objs}
    # A referent "the red circle" is only used if no other object shares color and shape.
    unique = {id(o) for o in objs if sum((p.color, p.shape) == (o.color, o.shape) for p in objs) == 1}
    for i, o in enumerate(objs):
        refs = [p for p in objs[:i] if id(p) in unique]
        rels = relations_between(o, refs[-1]) if refs else set()
        if rels and rng.random() < 0.5:
            where = f"{_relation_text(rels)} the {refs[-1].color} {refs[-1].shape}"
        else:
            where = _location(o, scene.size)
        repeat = any(p.shape == o.shape for p in objs[:i])
        article = "another" if repeat and rng.random() < 0.5 else "a"
        forms = (f"{article} {words[id(o)]} is {where}.", f"there is {article} {words[id(o)]} {where}.")
        sentences.append(forms[rng.integers(len(forms))])
    if n >= 2 and rng.random() < 0.5:
        a, b = objs[0], objs[1]
        if id(a) in unique and id(b) in unique and (rels := relations_between(a, b)):
            sentences.append(f"the {a.color} {a.shape} is {_relation_text(rels)} the {b.color} {b.shape}.")
    if rng.random() < 0.3:
        sentences.append("the background is dark.")
    return " ".join(sentences)


# ----------------------------------------------------------------------------- world

class ShapesWorld:
    """Deterministic, indexable world: sample i of split s is a pure function of (seed, split, i).

    Splits use disjoint RNG streams: default_rng([seed, split_code, index, stream]) with
    stream 0 for image samples and 1 for text-only documents.
    """

    def __init__(self, seed: int = 0, image_size: int = 32, families: Sequence[str] = FAMILIES):
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self.image_size = _check_size(image_size, "image_size")
        self.families = _check_families(families)

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if not _is_int(index) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        return np.random.default_rng([self.seed, SPLITS[split], int(index), stream])

    def sample(self, split: str, index: int) -> Sample:
        """Prompt, caption, ground-truth scene and rendered image (uint8 [S, S, 3])."""
        rng = self._rng(split, index, 0)
        prompt = sample_prompt(rng, self.families)
        scene = sample_scene(prompt, rng, self.image_size)
        text = caption(prompt, rng)
        return Sample(int(index), prompt, text, scene, render(scene))

    def text(self, split: str, index: int) -> str:
        """A text-only document: describe() of a scene from a random prompt or 1–4 random objects."""
        rng = self._rng(split, index, 1)
        if rng.random() < 0.5:
            scene = sample_scene(sample_prompt(rng, self.families), rng, self.image_size)
        else:
            scene = _random_scene(rng, self.image_size)
        return describe(scene, rng)
