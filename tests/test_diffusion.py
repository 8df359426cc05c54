from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lit_transfusion.diffusion import OBJECTIVES, SAMPLERS, Diffusion


def test_add_noise_matches_diffusers_per_image():
    d = Diffusion()
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(7, 4, 8, 8, generator=g), torch.randn(7, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 250, 500, 750, 999])
    got = d.add_noise(x0, noise, t)
    for i in range(7):  # diffusers one image at a time: each with its own t
        want = ref.add_noise(x0[i : i + 1], noise[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-5)
    # and batched with the same t for all, diffusers' own batched call
    t_all = torch.full((7,), 400)
    torch.testing.assert_close(d.add_noise(x0, noise, t_all), ref.add_noise(x0, noise, t_all), rtol=1e-5, atol=1e-5)


def test_timesteps_respect_per_image_cap():
    d = Diffusion()
    t_max = torch.tensor([1000, 500] * 2000)
    t = d.sample_timesteps(t_max, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t[0::2].max() <= 999 and t[1::2].max() <= 499
    assert t[0::2].max() > 900 and t[1::2].max() > 450  # covers the range


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_are_fresh_and_never_clip(name, objective):
    d = Diffusion(objective=objective)
    a, b = d.sampler(name, 20), d.sampler(name, 20)
    assert a is not b and len(a.timesteps) == 20
    assert not getattr(a.config, "clip_sample", False)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        Diffusion().sampler("euler")


def test_min_snr_weights_match_diffusers_snr():
    d = Diffusion()
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([0, 10, 100, 250, 400, 500, 750, 999])
    snr = compute_snr(ref, t)
    for gamma in (0.5, 1.0, 5.0):
        torch.testing.assert_close(d.loss_weights(t, gamma), snr.clamp(max=gamma) / snr)
    w = d.loss_weights(t, 1.0)
    assert w[0] < 1e-3 and w[-1] == 1.0 and (w.diff() >= 0).all()  # clean images turned down, noisy ones kept
    assert torch.equal(d.loss_weights(t, None), torch.ones(8))  # the paper's plain MSE


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction"])
def test_importance_timesteps_keep_the_expected_min_snr_loss(objective):
    """Drawing t ∝ w(t) with a constant weight is an unbiased estimate of uniform t weighted by w(t), for
    the full-range images and for noise-limited ones (which stay uniform, weighted by w(t)); w is the
    objective's Min-SNR weight (ε-form, or v-form for v-prediction)."""
    d, gamma = Diffusion(objective=objective), 1.0
    f = torch.linspace(2.0, 0.1, 1000) ** 2  # any per-image loss as a function of t
    w = d.loss_weights(torch.arange(1000), gamma)
    for cap in (1000, 500):
        t_max = torch.full((200_000,), cap)
        t, weights = d.importance_timesteps(t_max, gamma, torch.Generator().manual_seed(0))
        assert t.min() >= 0 and t.max() < cap
        want = (w[:cap] * f[:cap]).mean()  # E over uniform t < cap of w(t)·f(t), exactly
        got = (weights * f[t]).mean()
        assert abs(got / want - 1) < 0.01, (cap, got, want)
    t, weights = d.importance_timesteps(torch.full((200_000,), 1000), gamma, torch.Generator().manual_seed(1))
    assert torch.allclose(weights, w.mean().expand_as(weights))  # one constant weight
    hist = torch.bincount(t // 100, minlength=10).float() / len(t)  # follows w: few nearly clean images
    torch.testing.assert_close(hist, w.view(10, 100).sum(1) / w.sum(), atol=0.005, rtol=0)
    assert hist[0] < 0.01  # nearly clean images turned down
    if objective == "epsilon":
        assert hist[-1] > 0.15  # ε-form: the noisiest images keep weight 1
    else:
        assert hist[-1] < 0.01  # v-form: weight SNR/(SNR+1) -> 0 there (the v-MSE of pure noise is the x0-MSE)
