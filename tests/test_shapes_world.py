"""Tests for the embedded shapes world (datamodules/shapes/world.py)."""

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from datamodules.shapes import (
    BACKGROUND,
    COLORS,
    FAMILIES,
    RELATIONS,
    SHAPES,
    TEMPLATES,
    Item,
    Prompt,
    ShapesWorld,
    caption,
    describe,
    relations_between,
    render,
    sample_prompt,
    sample_scene,
)
from datamodules.shapes.world import PLURALS, RELATION_PHRASES

N = 3000
NUMBERS = {2: "two", 3: "three", 4: "four"}


def geneval_relations(a, b):
    """Independent copy of GenEval's `relative_position` (POSITION_THRESHOLD = 0.1) on square bboxes."""
    boxes = np.array([a.bbox, b.bbox]).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


@pytest.fixture(scope="module")
def samples():
    world = ShapesWorld(seed=0)
    return [world.sample("train", i) for i in range(N)]


@pytest.fixture(scope="module")
def samples64():
    world = ShapesWorld(seed=3, image_size=64)
    return [world.sample("val", i) for i in range(300)]


def test_vocabulary():
    assert SHAPES == ("circle", "square", "triangle")
    assert FAMILIES == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert RELATIONS == ("left of", "right of", "above", "below")
    assert len(COLORS) == 6
    rgb = np.array(list(COLORS.values()), float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert dist[~np.eye(6, dtype=bool)].min() > 120  # tellable apart after a lossy autoencoder
    assert np.linalg.norm(rgb - np.array(BACKGROUND), axis=-1).min() > 150


def test_determinism():
    a, b = ShapesWorld(seed=7), ShapesWorld(seed=7)
    for i in (0, 1, 17, 999):
        sa, sb = a.sample("train", i), b.sample("train", i)
        assert sa.image.tobytes() == sb.image.tobytes()
        assert sa.caption == sb.caption and sa.scene == sb.scene and sa.prompt == sb.prompt
        assert a.text("val", i) == b.text("val", i)
        assert render(sa.scene).tobytes() == sa.image.tobytes()
    other = ShapesWorld(seed=8)
    diff = [other.sample("train", i).image.tobytes() != a.sample("train", i).image.tobytes() for i in range(20)]
    assert all(diff)
    assert [other.text("train", i) for i in range(10)] != [a.text("train", i) for i in range(10)]


def _check_pixels(s):
    img = s.image.astype(float)
    n = s.scene.size
    assert s.image.dtype == np.uint8 and s.image.shape == (n, n, 3)
    bg = np.array(BACKGROUND, float)
    far = np.ones((n, n), bool)  # pixels at least 1 px away from every bbox
    for o in s.scene.objects:
        col = np.array(COLORS[o.color], float)
        center = img[int(o.cy), int(o.cx)]
        assert np.abs(center - col).max() <= 30, (o, center)
        x0, y0, x1, y1 = o.bbox
        px0, py0, px1, py1 = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))
        far[max(py0 - 1, 0):py1 + 1, max(px0 - 1, 0):px1 + 1] = False
        # Coverage per pixel = projection of (pixel - bg) onto (color - bg); sum = filled area.
        d = col - bg
        cov = (img[py0:py1, px0:px1] - bg) @ d / (d @ d)
        fill = cov.sum() / o.size**2
        guess = min({"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}.items(), key=lambda kv: abs(kv[1] - fill))
        assert guess[0] == o.shape, (o, fill)
    assert np.all(img[far] == bg)


def test_pixels_match_ground_truth(samples, samples64):
    for s in samples[:600] + samples64[:150]:
        _check_pixels(s)


def _check_geometry(scene):
    n = scene.size
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        assert 0 <= x0 and 0 <= y0 and x1 <= n and y1 <= n
        assert 7 / 32 * n - 1e-9 <= o.size <= 13 / 32 * n + 1e-9
    for a, b in itertools.combinations(scene.objects, 2):
        gap = (a.size + b.size) / 2 + 1 - 1e-9
        assert abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap, (a, b)


def test_geometry_no_overlap_inside(samples, samples64):
    for s in samples + samples64:
        _check_geometry(s.scene)
    # The most crowded case (four objects) must also work at both sizes.
    rng = np.random.default_rng(0)
    for size in (32, 64):
        for shape in SHAPES:
            for _ in range(50):
                scene = sample_scene(Prompt("counting", (Item(shape, count=4),)), rng, size)
                assert len(scene.objects) == 4
                _check_geometry(scene)


def _check_clauses(p, scene):
    objs = scene.objects
    assert len(objs) == sum(it.count for it in p.items)  # no extra objects
    assert Counter(o.shape for o in objs) == Counter({it.shape: it.count for it in p.items})
    for it in p.items:
        if it.color is not None:
            assert all(o.color == it.color for o in objs if o.shape == it.shape)
    if p.family in ("two_object", "position", "color_attr"):
        assert p.items[0].shape != p.items[1].shape
    if p.family == "color_attr":
        assert p.items[0].color != p.items[1].color and None not in (p.items[0].color, p.items[1].color)
    if p.family in ("single_object", "two_object", "counting", "position"):
        assert all(it.color is None for it in p.items)
    if p.family == "counting":
        assert 2 <= p.items[0].count <= 4
    if p.family == "position":
        a = next(o for o in objs if o.shape == p.items[0].shape)
        b = next(o for o in objs if o.shape == p.items[1].shape)
        assert geneval_relations(a, b) == {p.relation}  # holds, and unambiguously
        assert relations_between(a, b) == {p.relation}
    else:
        assert p.relation is None


def test_prompt_clauses_hold(samples, samples64):
    for s in samples + samples64:
        _check_clauses(s.prompt, s.scene)


def _template_regex(template):
    obj = rf"(?:(?:{'|'.join(COLORS)}) )?(?:{'|'.join(SHAPES)})"
    rel = "|".join(p for ps in RELATION_PHRASES.values() for p in ps)
    plural = "|".join(PLURALS.values())
    fields = {"a": obj, "b": obj, "n": "(?:two|three|four)", "p": f"(?:{plural})", "r": f"(?:{rel})"}
    parts = re.split(r"\{(\w)\}", template)
    pattern = "".join(re.escape(x) if i % 2 == 0 else fields[x] for i, x in enumerate(parts))
    return re.compile(pattern)


def test_families_templates_and_caption_words(samples):
    assert set(s.prompt.family for s in samples) == set(FAMILIES)
    used = {(f, t): 0 for f in FAMILIES for t in TEMPLATES[f]}
    for s in samples:
        p, c = s.prompt, s.caption
        assert c == c.lower() and c == c.strip() and not c.endswith(".")
        hits = [t for t in TEMPLATES[p.family] if _template_regex(t).fullmatch(c)]
        assert len(hits) == 1, (c, hits)
        used[p.family, hits[0]] += 1
        words = c.split()
        for it in p.items:
            assert (PLURALS[it.shape] if it.count > 1 else it.shape) in words
            if it.color is not None:
                assert it.color in words
            else:
                assert not set(COLORS) & set(words)
        if p.family == "counting":
            assert NUMBERS[p.items[0].count] in words
        if p.family == "position":
            assert p.relation.split()[0] in words
            # items[0] is named first.
            assert c.index(p.items[0].shape) < c.index(p.items[1].shape)
    assert min(used.values()) > 0, [k for k, v in used.items() if v == 0]
    for f in FAMILIES:  # several distinct phrasings, including GenEval's own "a photo of ..." form
        assert len(set(TEMPLATES[f])) >= 3 and any(t.startswith("a photo of ") for t in TEMPLATES[f])


def test_sample_prompt_restricts_families():
    rng = np.random.default_rng(1)
    prompts = [sample_prompt(rng, ["position", "counting"]) for _ in range(200)]
    assert {p.family for p in prompts} == {"position", "counting"}
    assert {p.relation for p in prompts if p.family == "position"} == set(RELATIONS)
    assert {p.items[0].count for p in prompts if p.family == "counting"} == {2, 3, 4}


def _key(scene):
    return tuple((o.shape, o.color, round(o.cx, 1), round(o.cy, 1), round(o.size, 1)) for o in scene.objects)


def test_splits_disjoint(samples):
    world = ShapesWorld(seed=0)
    train = {_key(s.scene) for s in samples}
    assert len(train) == len(samples)
    for split in ("val", "test"):
        keys = {_key(world.sample(split, i).scene) for i in range(1500)}
        assert not keys & train
    assert world.sample("val", 0).image.tobytes() != world.sample("test", 0).image.tobytes()


def test_bad_arguments():
    world = ShapesWorld()
    cases = [
        (lambda: world.sample("dev", 0), "split"),
        (lambda: world.text("training", 0), "split"),
        (lambda: world.sample("train", -1), "index"),
        (lambda: ShapesWorld(image_size=8), "image_size"),
        (lambda: ShapesWorld(seed=-1), "seed"),
        (lambda: ShapesWorld(families=["counting", "spatial"]), "families"),
        (lambda: ShapesWorld(families=[]), "families"),
        (lambda: sample_prompt(np.random.default_rng(0), ["nope"]), "families"),
        (lambda: sample_scene(Prompt("colors", (Item("circle", "red"),)), np.random.default_rng(0), 8), "size"),
        (lambda: sample_scene(Prompt("colors", (Item("hexagon", "red"),)), np.random.default_rng(0)), "shape"),
        (lambda: sample_scene(Prompt("colors", (Item("circle", "pink"),)), np.random.default_rng(0)), "color"),
        (lambda: caption(Prompt("position", (Item("circle"), Item("square")), "near"), np.random.default_rng(0)),
         "relation"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


_REL = r"(above|below|to the left of|to the right of)(?: and (to the left of|to the right of))?"
_C, _S = "|".join(COLORS), "|".join(SHAPES)
_REL_SENTENCE = re.compile(
    rf"(?:the|a|another|there is a|there is another) (?:(small|medium|large) )?({_C}) ({_S}) "
    rf"(?:is )?{_REL} the ({_C}) ({_S})\.")
_REL_NAMES = {"above": "above", "below": "below", "to the left of": "left of", "to the right of": "right of"}


def test_describe_consistent_with_scene():
    world = ShapesWorld(seed=5)
    n_relations = 0
    for i in range(400):
        text = world.text("train", i)
        assert text == text.lower() and text.endswith(".")
        rng = np.random.default_rng(i)
        scene = sample_scene(sample_prompt(rng), rng)
        text = describe(scene, rng)
        assert text == text.lower() and text.endswith(".") and "  " not in text
        n = len(scene.objects)
        if text.startswith("there"):
            assert text.split(".")[0].split()[2] == {1: "one", 2: "two", 3: "three", 4: "four"}[n]
        for o in scene.objects:
            assert f"{o.color} {o.shape}" in text
        assert len(re.findall(rf"\b(?:small|medium|large) (?:{_C}) (?:{_S})\b", text)) == n
        for m in _REL_SENTENCE.finditer(text):
            _, c1, s1, r1, r2, c2, s2 = m.groups()
            refs = [o for o in scene.objects if (o.color, o.shape) == (c2, s2)]
            assert len(refs) == 1  # the referent is unambiguous
            subjects = [o for o in scene.objects if (o.color, o.shape) == (c1, s1)]
            stated = {_REL_NAMES[r] for r in (r1, r2) if r}
            assert any(geneval_relations(o, refs[0]) == stated for o in subjects), (text, scene)
            n_relations += 1
    assert n_relations > 100
