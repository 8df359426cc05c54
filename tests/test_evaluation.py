"""Evaluation: perplexity bookkeeping, and what the ShapesEvaluation callback writes (TensorBoard, PNG, JSON)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from callbacks.perplexity import perplexity
from lit_transfusion.batch import IGNORE, pack_rows
from lit_transfusion.module import TransfusionModule
from tests.conftest import ROOT, SPECIAL, random_documents, run_cli, small_run_args

FAMILY_TAGS = [f"val/geneval/{f}" for f in
               ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")]
INTERVAL_TAGS = [f"{t}{s}" for t in FAMILY_TAGS for s in ("_low", "_high")]
NEW_TAGS = ["val/kid", "val/kid_std", "val/fid_n", "val/fid_real_n", "val/geneval/n", *INTERVAL_TAGS,
            *(f"val/caption_{k}{s}" for k in ("precision", "recall", "f1") for s in ("", "_low", "_high"))]


def test_perplexity_is_exp_of_mean_cross_entropy():
    torch.manual_seed(0)
    module = TransfusionModule(vocab_size=50, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                               max_seq_len=64).eval()
    docs = random_documents(torch.Generator().manual_seed(0), 6)
    batches = [pack_rows([docs[:3]], 64, 2, SPECIAL), pack_rows([docs[3:]], 64, 2, SPECIAL)]
    # By hand: every target position of both batches, images clean (t = 0), one mean over all of them.
    losses = []
    with torch.no_grad():
        for b in batches:
            t = torch.zeros(b.num_images, dtype=torch.long)
            out = module(b, b.latents, t)
            keep = b.targets != IGNORE
            losses.append(F.cross_entropy(module.model.logits(out.hidden[keep]), b.targets[keep], reduction="none"))
    expected = math.exp(torch.cat(losses).mean().item())
    assert perplexity(module, batches) == pytest.approx(expected, rel=1e-5)
    # A model that got worse must have a higher perplexity (the metric reads the model, not a constant).
    with torch.no_grad():
        module.model.lm_head.weight.mul_(5.0)
    assert perplexity(module, batches) != pytest.approx(expected, rel=1e-3)


def test_callback_writes_tensorboard_png_and_json(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ["val/ppl_text", "val/ppl_caption", "val/fid", "val/caption_acc", *FAMILY_TAGS, *NEW_TAGS]:
        assert tag in tags["scalars"], f"{tag} missing from {sorted(tags['scalars'])}"
    assert "val/samples" in tags["images"]
    grid = events.Images("val/samples")[-1]
    # 6 prompts x 4 samples of 32 px, upscaled x4 with 2-px padding, after a 256-px prompt column (lit_transfusion.grid)
    assert (grid.height, grid.width) == (6 * 130 + 2, 256 + 4 * 130 + 2)
    assert any(t.startswith("val/samples_prompts") for t in tags["tensors"])

    assert sorted(p.name for p in (trained_run / "samples").glob("*.png")) == ["val_step_000002.png"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    latest = metrics["latest"]
    assert latest["step"] == 2 and len(metrics["history"]) == 1
    run = metrics["run"]  # what the numbers were measured on
    assert run["steps"] == 2 and run["precision"] and run["wall_seconds"] > 0
    assert run["machine"]["torch"] == torch.__version__ and run["machine"]["cores"] >= 1
    for tag in ["val/ppl_text", "val/fid", "val/caption_acc", "val/cond_gap", "val/loss_text", *FAMILY_TAGS,
                *NEW_TAGS]:
        assert tag in latest, sorted(latest)
    # the JSON holds the same numbers TensorBoard got
    assert latest["val/fid"] == pytest.approx(events.Scalars("val/fid")[-1].value, rel=1e-5)
    ppl = latest["val/ppl_text"]
    assert 1.0 < ppl < 10 * 512  # an untrained model over a 512-token vocabulary: near-uniform, not degenerate
    families = [latest[t] for t in FAMILY_TAGS[:-1]]
    assert latest["val/geneval/overall"] == pytest.approx(sum(families) / 6)
    for tag in FAMILY_TAGS:
        assert latest[f"{tag}_low"] <= latest[tag] <= latest[f"{tag}_high"]
    # The last validation of fit (max_steps) is the final one: all 32 held-out prompts (num_val=32, fewer than
    # final_fid_images asks for) x 2 images; FID/KID say which n they used.
    assert latest["val/fid_n"] == latest["val/geneval/n"] == 64 and latest["val/fid_real_n"] == 32
    # cond_gap with its bootstrap interval over every caption pair (cond_gap_pairs=16 in small_run_args).
    assert latest["val/cond_gap_low"] <= latest["val/cond_gap"] <= latest["val/cond_gap_high"]
    assert latest["val/cond_gap_n"] == 16
    # Chance levels beside the scores; no FID/KID floors at this small n (the floors file has 96, 384, 1000).
    floors = json.loads((ROOT / "results" / "floors" / "floors.json").read_text())
    assert latest["val/geneval/overall_floor"] == pytest.approx(
        floors["images"]["1000"]["prompt_ignoring"]["geneval"]["overall"], rel=1e-6)  # logged as float32
    assert latest["val/caption_f1_floor"] == pytest.approx(floors["captions"]["1000"]["vague_caption"]["f1"], rel=1e-6)
    assert "val/fid_floor_real" not in latest


def test_fid_and_kid_floors_at_the_evaluated_n():
    from callbacks.evaluation import ShapesEvaluation

    floors = json.loads((ROOT / "results" / "floors" / "floors.json").read_text())
    callback = ShapesEvaluation(floors=str(ROOT / "results" / "floors" / "floors.json"))
    got = callback._floor_scalars({"val/fid_n": 384.0, "val/fid_real_n": 512.0}, "val", codes=False)
    assert got["val/fid_floor_real"] == floors["images"]["384"]["real_heldout"]["fid"]
    assert got["val/kid_floor_random"] == floors["images"]["384"]["random_latents"]["kid"]
    codes = callback._floor_scalars({"val/fid_n": 96.0, "val/fid_real_n": 512.0}, "val", codes=True)
    assert codes["val/fid_floor_random"] == floors["images"]["96"]["random_codes"]["fid"]
    # Another real set size: FID/KID floors would mislead, so only the n-independent ones are given.
    other = callback._floor_scalars({"val/fid_n": 384.0, "val/fid_real_n": 64.0}, "val", codes=False)
    assert "val/fid_floor_real" not in other and "val/geneval/overall_floor" in other
    assert ShapesEvaluation(floors="nowhere.json")._floor_scalars({}, "val", codes=False) == {}


def test_test_subcommand_writes_metrics(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_cli("test", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path), "--ckpt_path", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "runs" / "shapes-tiny" / "version_0" / "metrics_test.json").read_text())["latest"]
    for tag in ["test/ppl_text", "test/ppl_caption", "test/fid", "test/kid", "test/fid_n", "test/caption_acc",
                "test/caption_f1", "test/geneval/overall", "test/geneval/overall_low", "test/loss_text",
                "test/cond_gap", "test/cond_gap_low", "test/cond_gap_high"]:
        assert tag in out, sorted(out)


def test_inception_without_weights_fails_clearly():
    from callbacks.evaluation import ShapesEvaluation

    with pytest.raises(ValueError, match="local file"):
        ShapesEvaluation(fid_feature="inception")


def test_geneval_intervals_and_prompts_on_ground_truth():
    from callbacks.evaluation import geneval_prompts, geneval_with_intervals, prompts_per_family_for
    from datamodules.shapes.scoring import geneval_scores
    from datamodules.shapes.world import FAMILIES, ShapesWorld

    world = ShapesWorld(0)
    samples = [world.sample("val", i) for i in range(120)]
    assert prompts_per_family_for(384, 2) == 32 and prompts_per_family_for(1000, 2) == 84
    prompts = geneval_prompts([s.prompt for s in samples], 3)
    assert [p.family for p in prompts] == [f for f in FAMILIES for _ in range(3)]  # balanced, in family order
    by_prompt = {id(s.prompt): s.image for s in samples}
    images = [by_prompt[id(p)] for p in prompts]
    out = geneval_with_intervals(prompts, images)
    assert out["overall"] == 1.0 and out["overall_high"] == 1.0 and 0.8 < out["overall_low"] < 1.0 and out["n"] == 18
    assert {k: v for k, v in out.items() if k in FAMILIES or k == "overall"} == geneval_scores(prompts, images)
    wrong = geneval_with_intervals(prompts[1:] + prompts[:1], images)
    assert wrong["overall_low"] < wrong["overall"] < wrong["overall_high"] < out["overall_low"]


def test_caption_scores_with_intervals():
    from callbacks.evaluation import caption_scores_with_intervals
    from datamodules.shapes.world import ShapesWorld, scene_caption

    world = ShapesWorld(0)
    scenes = [world.sample("val", i).scene for i in range(16)]
    own = [scene_caption(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    perfect = caption_scores_with_intervals(own, scenes)
    assert all(perfect[k] == 1.0 for k in ("precision", "recall", "f1", "f1_low", "f1_high"))
    # "a circle" is often true and says almost nothing: precision stays high, recall is what catches it.
    vague = caption_scores_with_intervals(["a circle"] * len(scenes), scenes)
    assert vague["recall_high"] < 0.5 and vague["recall"] < vague["precision"]
