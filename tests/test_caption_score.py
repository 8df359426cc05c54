"""Tests for caption precision / recall / F1 (datamodules/shapes/scoring.py: caption_claims, caption_scores)."""

import numpy as np
import pytest

from datamodules.shapes.scoring import Claim, Described, caption_claims, caption_scores, object_attributes
from datamodules.shapes.transfusion import with_scene_colors
from datamodules.shapes.world import Obj, Scene, ShapesWorld, _random_scene, caption, describe, scene_caption

# Two objects: a small red circle in the top left, a large blue square in the bottom right (32 px image).
SCENE = Scene((Obj("circle", "red", 5.0, 5.0, 7.0), Obj("square", "blue", 25.0, 25.0, 13.0)), 32)
FULL = "a small red circle in the top left and a large blue square in the bottom right"


def test_scene_words():
    assert object_attributes(SCENE) == [
        {"shape": "circle", "color": "red", "size": "small", "location": "in the top left"},
        {"shape": "square", "color": "blue", "size": "large", "location": "in the bottom right"},
    ]


def test_empty_caption_scores_zero():
    for text in ("", "the background is dark.", "a photo of"):
        assert caption_claims(text) == []
        assert caption_scores(text, SCENE) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_one_true_claim_has_full_precision_low_recall():
    s = caption_scores("a red circle", SCENE)
    assert s["precision"] == 1.0
    assert s["recall"] == pytest.approx(2 / 8)  # its shape and color, of 2 objects x 4 attributes
    assert s["f1"] == pytest.approx(0.4)


def test_full_correct_caption_scores_one():
    assert caption_claims(FULL) == [
        Claim("object", "a small red circle in the top left", Described("circle", "red", "small", "in the top left")),
        Claim("object", "a large blue square in the bottom right",
              Described("square", "blue", "large", "in the bottom right")),
    ]
    assert caption_scores(FULL, SCENE) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # The world's own renderer of that caption, in either order.
    for seed in range(4):
        assert caption_scores(scene_caption(SCENE, np.random.default_rng(seed)), SCENE)["f1"] == 1.0


def test_one_wrong_attribute_lowers_precision():
    s = caption_scores(FULL.replace("large blue", "small blue"), SCENE)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5
    s = caption_scores(FULL.replace("top left", "top right"), SCENE)
    assert s["precision"] == 0.5


def test_repeated_object_needs_two_objects():
    """Object claims match objects one-to-one: "a red circle and a red circle" states two red circles."""
    assert caption_scores("a red circle and a red circle", SCENE)["precision"] == 0.5
    two = Scene((*SCENE.objects, Obj("circle", "red", 25.0, 5.0, 7.0)), 32)
    assert caption_scores("a red circle and a red circle", two)["precision"] == 1.0


def test_counts_totals_relations():
    assert caption_scores("two objects", SCENE)["precision"] == 1.0
    assert caption_scores("three objects", SCENE)["precision"] == 0.0
    assert caption_scores("exactly one circle", SCENE)["precision"] == 1.0
    assert caption_scores("two circles", SCENE)["precision"] == 0.0
    s = caption_scores("a circle above and to the left of a square", SCENE)
    assert [c.kind for c in caption_claims("a circle above and to the left of a square")] == [
        "object", "object", "relation", "relation"]
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(2 / 8)
    assert caption_scores("the square is above the circle", SCENE)["precision"] == 0.0  # definite: relation only


def test_caption_of_another_scene_scores_low():
    world = ShapesWorld(seed=0)
    scenes = [world.sample("val", i).scene for i in range(200)]
    rng = np.random.default_rng(0)
    f1 = [caption_scores(scene_caption(scenes[i - 1], rng), scenes[i])["f1"] for i in range(len(scenes))]
    assert caption_scores(FULL, scenes[0])["f1"] < 0.5
    assert np.mean(f1) < 0.05, np.mean(f1)


def test_world_captions_are_precise_and_scene_captions_complete():
    """Every caption the world writes states only true claims; the scene caption states every fact."""
    world = ShapesWorld(seed=0)
    for i in range(300):
        s, rng = world.sample("train", i), np.random.default_rng(i)
        texts = [s.caption, caption(with_scene_colors(s.prompt, s.scene), rng), describe(s.scene, rng)]
        for text in texts:
            assert caption_scores(text, s.scene)["precision"] == 1.0, (text, s.scene)
        assert caption_scores(scene_caption(s.scene, rng), s.scene) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
        other = _random_scene(rng, 32)  # text-only documents describe scenes of 1-4 random objects
        assert caption_scores(describe(other, rng), other)["precision"] == 1.0
        assert caption_scores(scene_caption(other, rng), other)["recall"] == 1.0


def test_generic_caption_floor():
    """A fixed generic caption (what a model that ignores the image could say) scores near nothing."""
    scenes = [ShapesWorld(seed=0).sample("test", i).scene for i in range(200)]
    means = {k: np.mean([caption_scores("a red circle", s)[k] for s in scenes]) for k in ("precision", "recall", "f1")}
    assert means["precision"] < 0.2 and means["recall"] < 0.06 and means["f1"] < 0.08, means
