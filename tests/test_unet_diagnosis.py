"""benchmarks/unet_diagnosis.py measures what it says: on fresh nano models (output heads randomized) and hand-built
caption pairs, each measurement is checked against an independent computation or an invariant."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from lit_transfusion.batch import Image, Text, pack_pairs, shifted_caption_pairs
from lit_transfusion.cond_gap import cond_gap
from lit_transfusion.module import TransfusionModule
from lit_transfusion.patching import unpatchify
from tests.conftest import ROOT, SPECIAL, randomize_output_heads

LATENT = (4, 8, 8)
TIMESTEPS = (100, 500, 900)


def script():
    spec = importlib.util.spec_from_file_location("unet_diagnosis", ROOT / "benchmarks" / "unet_diagnosis.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


diag = script()


def model(patcher: str) -> TransfusionModule:
    torch.manual_seed(0)
    m = TransfusionModule(vocab_size=40, special_ids=vars(SPECIAL), latent_shape=LATENT, size="nano",
                          patch_size=2, patcher=patcher, max_seq_len=64)
    return randomize_output_heads(m, std=0.05).eval()


def documents(n: int = 6) -> list:
    """Caption -> image documents with captions of different lengths."""
    g = torch.Generator().manual_seed(1)
    docs = []
    for i in range(n):
        caption = torch.randint(5, 40, (2 + i % 3,), generator=g).tolist()
        docs.append([Text([SPECIAL.bos, *caption]), Image(torch.randn(LATENT, generator=g)), Text([SPECIAL.eos])])
    return docs


@pytest.fixture(scope="module")
def batches():
    import numpy as np

    pairs = shifted_caption_pairs(documents(), np.random.default_rng(0))
    return [pack_pairs(pairs[:4], 2, SPECIAL), pack_pairs(pairs[4:], 2, SPECIAL)]  # two batches: seeds 0 and 1000


@pytest.fixture(scope="module")
def models():
    return {p: model(p) for p in ("linear", "unet")}


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_cond_gap_by_t_is_the_projects_cond_gap(models, batches, patcher, one_thread):
    m = models[patcher]
    m.representation.cond_gap_timesteps = TIMESTEPS
    with torch.no_grad():
        expected = torch.cat([m.representation.cond_gap(m, pairs, b) for b, pairs in enumerate(batches)])  # [n, 3, 2]
    for level, step in enumerate(TIMESTEPS):
        result, terms = diag.measure_t(m, batches, step, level)
        torch.testing.assert_close(terms, expected[:, level], rtol=1e-5, atol=1e-7)
        assert result["cond_gap"] == pytest.approx(cond_gap(expected[:, level:level + 1]), rel=1e-5, abs=1e-7)
        assert result["mse"]["true"] == pytest.approx(float(expected[:, level, 0].double().mean()), rel=1e-5)
        assert result["cond_gap"] != 0  # the fresh model's prediction does depend on the caption


def test_linear_zero_ablation_is_the_prediction_of_a_zero_input(models, batches, one_thread):
    m = models["linear"]
    p = diag.passes(m, batches[0], 500, seed=0)
    proj = m.model.patcher.proj_out
    N, P = p.eps.shape[0], m.model.cfg.patches_per_image
    bias_only = unpatchify(proj.bias.expand(N, P, -1), 2, *LATENT)  # proj_out(0): the bias in every patch
    torch.testing.assert_close(p.eps_zero, bias_only, rtol=0, atol=0)
    # the patcher's decode of the hidden it was given reproduces the model's own prediction
    torch.testing.assert_close(m.model.patcher.decode(p.tap.hidden, None, torch.full((N,), 500)), p.eps)


def test_unet_zero_ablation_does_not_depend_on_the_caption(models, batches, one_thread):
    """The skips see only the noisy image: with the transformer path zeroed both captions predict the same."""
    m = models["unet"]
    p = diag.passes(m, batches[0], 500, seed=0)
    shuffled_first = type(batches[0])(batches[0].shuffled, batches[0].true)
    q = diag.passes(m, shuffled_first, 500, seed=0)
    torch.testing.assert_close(p.eps_zero, q.eps_zero, rtol=0, atol=0)
    assert not torch.allclose(p.eps, q.eps)
    assert 0 < diag.measure_t(m, batches, 500, 0)[0]["zero_ablation"]["change"] < 10


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_swap_is_the_shuffled_prediction_and_nothing_with_the_true_caption(models, batches, patcher, one_thread):
    m = models[patcher]
    p = diag.passes(m, batches[0], 250, seed=0)
    torch.testing.assert_close(p.eps_swap, p.eps_shuffled, rtol=1e-5, atol=1e-6)
    same = type(batches[0])(batches[0].true, batches[0].true)
    q = diag.passes(m, same, 250, seed=0)
    torch.testing.assert_close(q.eps_swap, q.eps, rtol=0, atol=0)
    r = diag.measure_t(m, [same], 250, 0)[0]
    assert r["swap_ablation"]["change"] == 0 and r["cond_gap"] == 0 and r["caption_change"]["hidden"] == 0
    assert all(c == 0 for c in r["caption_change"]["up_path"])


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_gradients_are_finite_positive_and_leave_no_trace(models, batches, patcher, one_thread):
    m = models[patcher]
    r = diag.measure_t(m, batches, 500, 0)[0]
    g = r["grad"]
    values = [g["hidden"], *g["params"].values()] + [x for u in g["up"] for x in (u["path"], u["skip"])] + g["skips"]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert all(p.grad is None for p in m.parameters())  # the measurement leaves the model as it found it
    n_up = 2 if patcher == "unet" else 0  # nano, patch 2: one level, two up ResBlocks
    assert len(g["up"]) == len(r["rms"]["up"]) == len(g["skips"]) == n_up
    for k, up in enumerate(g["up"]):  # up block k takes the k-th last skip: two taps of one gradient agree
        assert up["skip"] == pytest.approx(g["skips"][n_up - 1 - k], rel=1e-6)
    # ||dL/d hidden|| is the gradient of the mean MSE over all pairs: recompute it by hand in one batch
    n_total = sum(b.true.num_images for b in batches)
    total = 0.0
    for b, pairs in enumerate(batches):
        noisy, target, t = diag.noised(m, pairs, 500, seed=1000 * b)
        captured = {}
        original = m.model.patcher.decode

        def decode(hidden, state, t, original=original, captured=captured):
            captured["h"] = hidden.detach().requires_grad_()
            return original(captured["h"], state, t)

        m.model.patcher.decode = decode
        try:
            eps = m(pairs.true, noisy, t).eps
        finally:
            del m.model.patcher.decode
        (grad,) = torch.autograd.grad(diag.mse_per_image(eps, target).sum() / n_total, captured["h"])
        total += float(grad.double().pow(2).sum())
    assert g["hidden"] == pytest.approx(math.sqrt(total), rel=1e-4)


def test_cut_transformer_path_shows_as_zero(batches, one_thread):
    """A U-Net whose from_model is zero: the transformer carries nothing and receives no image gradient."""
    m = model("unet")
    with torch.no_grad():
        m.model.patcher.from_model.weight.zero_()
        m.model.patcher.from_model.bias.zero_()
    r = diag.measure_t(m, batches, 500, 0)[0]
    assert r["zero_ablation"]["change"] == 0 and r["cond_gap"] == 0 and r["rms"]["up"][0]["path"] == 0
    assert r["grad"]["params"]["transformer"] == 0 and r["grad"]["hidden"] == 0
    assert r["grad"]["params"]["patcher.from_model"] > 0 and r["grad"]["up"][0]["path"] > 0
    ratios = diag.weight_ratios(m.model.patcher)
    assert len(ratios) == 2 and all(v > 0 for w in ratios for v in w.values())


def test_diagnose_reports_every_timestep(models, batches, one_thread):
    result = diag.diagnose(models["unet"], batches, TIMESTEPS)
    assert [r["t"] for r in result["by_t"]] == list(TIMESTEPS) and result["pairs"] == 6
    assert result["patcher"] == "unet" and result["params"]["transformer"] > 0
    diag.print_tables([{"name": "unet:test", **result}])


def test_summary_table_reads_the_committed_diagnoses(tmp_path):
    """The RESULTS.md table of diagnoses: one row per model with its overrides, val/cond_gap = the mean of the
    gaps at t = 250, 500, 750, the t = 500 shares and gradient as the JSON has them."""
    import json

    spec = importlib.util.spec_from_file_location("unet_diagnosis_summary",
                                                  ROOT / "benchmarks" / "unet_diagnosis_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    results = ROOT / "results" / "unet_diagnosis"
    files = [str(results / "before.json"), str(results / "skip_dropout.json")]
    text = summary.main(files, out=str(tmp_path / "summary.md"))
    assert (tmp_path / "summary.md").read_text() == text
    before = json.loads((results / "before.json").read_text())
    unet = next(m for m in before["models"] if m["patcher"] == "unet")
    gaps = {r["t"]: r["cond_gap"] for r in unet["by_t"]}
    row = next(r for r in summary.rows(before, "before") if r["model"] == "unet")
    assert row["val_cond_gap"] == pytest.approx((gaps[250] + gaps[500] + gaps[750]) / 3)
    at500 = next(r for r in unet["by_t"] if r["t"] == 500)
    assert row["transformer_share"] == at500["zero_ablation"]["change"]
    assert f"| before | unet | 700 | {row['val_cond_gap']:.3f} |" in text
    assert "| skip_dropout | unet (unet_skip_dropout=0.5) | 700 |" in text
