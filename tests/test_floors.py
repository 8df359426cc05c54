"""`python -m lit_transfusion floors`: every control has every metric, and the floors are ordered as they must be."""

import json

import pytest

from lit_transfusion.commands.floors import CAPTION_CONTROLS, IMAGE_CONTROLS
from lit_transfusion.commands.main import main

IMAGE_METRICS = {"fid", "kid", "kid_std", "fid_n", "fid_real_n", "geneval"}
GENEVAL_KEYS = {"overall", "overall_low", "overall_high", "n"}
CAPTION_METRICS = {f"{k}{s}" for k in ("precision", "recall", "f1") for s in ("", "_low", "_high")}


@pytest.fixture(scope="module")
def floors(tmp_path_factory):
    out = tmp_path_factory.mktemp("floors")
    main(["floors", "--n=[16]", f"--out={out}", "--fid_real=64", "--kid_subsets=10"])  # through the dispatcher
    return json.loads((out / "floors.json").read_text()), (out / "floors.md").read_text()


def test_every_control_has_every_metric(floors):
    result, md = floors
    images, captions = result["images"]["16"], result["captions"]["16"]
    assert set(images) == set(IMAGE_CONTROLS) and set(captions) == set(CAPTION_CONTROLS)
    for name, v in images.items():
        assert IMAGE_METRICS <= set(v), (name, sorted(v))
        assert GENEVAL_KEYS <= set(v["geneval"]), (name, sorted(v["geneval"]))
        # 16 images round up to whole prompts per family: 2 prompts x 6 families x 2 images.
        assert (v["fid_n"], v["fid_real_n"], v["geneval"]["n"]) == (24, 64, 24)
        assert v["geneval"]["overall_low"] <= v["geneval"]["overall"] <= v["geneval"]["overall_high"]
    for name, v in captions.items():
        assert CAPTION_METRICS <= set(v), (name, sorted(v))
    for name in (*IMAGE_CONTROLS, *CAPTION_CONTROLS):
        assert f"| {name} |" in md


def test_floors_are_ordered(floors):
    images, captions = floors[0]["images"]["16"], floors[0]["captions"]["16"]
    # Real renders are closer to the real set than decodes of random latents or codes.
    for random in ("random_latents", "random_codes"):
        assert images["real_heldout"]["fid"] < images[random]["fid"]
        assert images["real_heldout"]["kid"] < images[random]["kid"]
    # GenEval: the prompts' own renders are the ceiling (the scorer is validated on them), random decodes the floor.
    assert images["prompt_renders"]["geneval"]["overall"] == 1.0
    for floor in ("random_latents", "random_codes", "prompt_ignoring"):
        assert images[floor]["geneval"]["overall"] < images["prompt_renders"]["geneval"]["overall_low"]
    # Shuffling the renders among prompts leaves the image set, hence FID, unchanged.
    assert images["prompt_ignoring"]["fid"] == pytest.approx(images["prompt_renders"]["fid"], rel=1e-5)
    assert captions["own_caption"]["f1"] == 1.0
    assert captions["other_caption"]["f1"] < 0.5 and captions["generic_caption"]["f1"] < 0.5
    # A vague caption is often true: precision alone would rank it near the ceiling; recall does not.
    assert captions["vague_caption"]["recall"] < captions["vague_caption"]["precision"] / 2
