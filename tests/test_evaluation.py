"""Evaluation: perplexity bookkeeping, and what the ShapesEvaluation callback writes (TensorBoard, PNG, JSON)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from callbacks.perplexity import perplexity
from lit_transfusion.batch import IGNORE, pack_rows
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL, random_documents, run_cli, small_run_args

FAMILY_TAGS = [f"val/geneval/{f}" for f in
               ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")]


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
    for tag in ["val/ppl_text", "val/ppl_caption", "val/fid", "val/caption_acc", *FAMILY_TAGS]:
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
    for tag in ["val/ppl_text", "val/fid", "val/caption_acc", "val/cond_gap", "val/loss_text", *FAMILY_TAGS]:
        assert tag in latest
    # the JSON holds the same numbers TensorBoard got
    assert latest["val/fid"] == pytest.approx(events.Scalars("val/fid")[-1].value, rel=1e-5)
    ppl = latest["val/ppl_text"]
    assert 1.0 < ppl < 10 * 512  # an untrained model over a 512-token vocabulary: near-uniform, not degenerate
    families = [latest[t] for t in FAMILY_TAGS[:-1]]
    assert latest["val/geneval/overall"] == pytest.approx(sum(families) / 6)


def test_test_subcommand_writes_metrics(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_cli("test", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path), "--ckpt_path", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "runs" / "shapes-tiny" / "version_0" / "metrics_test.json").read_text())["latest"]
    for tag in ["test/ppl_text", "test/ppl_caption", "test/fid", "test/caption_acc", "test/geneval/overall",
                "test/loss_text", "test/cond_gap"]:
        assert tag in out, sorted(out)


def test_inception_without_weights_fails_clearly():
    from callbacks.evaluation import ShapesEvaluation

    with pytest.raises(ValueError, match="local file"):
        ShapesEvaluation(fid_feature="inception")
