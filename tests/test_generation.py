"""Generation is exactly right: KV-cached == recomputed, guidance 1 == conditional, the t=0 image written
into the cache == a full forward over the final sequence, and too-long prompts fail clearly."""

from __future__ import annotations

import pytest
import torch

from lit_transfusion.attention import dense_mask
from lit_transfusion.generation import SamplingConfig
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL


def make_module(**settings) -> TransfusionModule:
    torch.manual_seed(0)
    m = TransfusionModule(vocab_size=40, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                          max_seq_len=96, **settings)
    # Perturb the zero-initialized output heads so predicted noise is not trivially zero.
    with torch.no_grad():
        for p in m.model.patcher.proj_out.parameters():
            p.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def module():
    return make_module()


@pytest.fixture(scope="module")
def flow_module():
    return make_module(objective="flow", image_attention="causal")


def samplers(module):
    return (module.sampler(SPECIAL, use_cache=True),
            module.sampler(SPECIAL, use_cache=False))


def test_text_cached_equals_uncached_for_ragged_batch(module):
    cached, full = samplers(module)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    prompts = [[[SPECIAL.bos, 5, 6, 7, 8, 9]], [[SPECIAL.bos, 10]]]
    out = []
    for s in (cached, full):
        gen = torch.Generator().manual_seed(cfg.seed)
        state, hidden = s.start(prompts)
        out.append(s.decode_text(state, hidden, cfg, gen)[0])
    assert out[0] == out[1]
    assert len(out[0][0]) > 3


def test_left_padding_does_not_change_a_row(module):
    s = samplers(module)[0]
    cfg = SamplingConfig(max_new_tokens=8)
    alone = s.decode_text(*s.start([[[SPECIAL.bos, 10]]]), cfg, torch.Generator())[0][0]
    prompts = [[[SPECIAL.bos, 5, 6, 7, 8, 9]], [[SPECIAL.bos, 10]]]
    batched = s.decode_text(*s.start(prompts), cfg, torch.Generator())[0][1]
    assert alone == batched


@pytest.mark.parametrize(("objective", "scheduler"), [("epsilon", "ddpm"), ("epsilon", "ddim"), ("epsilon", "dpm++"),
                                                      ("v_prediction", "dpm++"), ("flow", "ddpm")])
def test_images_cached_equal_uncached_with_guidance(module, flow_module, objective, scheduler):
    m = {"epsilon": module, "flow": flow_module}.get(objective) or make_module(objective=objective)
    cached, full = samplers(m)
    cfg = SamplingConfig(scheduler=scheduler, steps=6, guidance_scale=3.0, seed=1)
    a = cached.generate_images([[7, 8], [9]], cfg)
    b = full.generate_images([[7, 8], [9]], cfg)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert a.shape == (2, 4, 4, 4) and a.std() > 0.1


def test_same_seed_same_output_and_seed_matters(module):
    s = samplers(module)[0]
    cfg = SamplingConfig(steps=4, scheduler="ddpm", seed=5)
    torch.testing.assert_close(s.generate_images([[7]], cfg), s.generate_images([[7]], cfg))
    assert not torch.allclose(s.generate_images([[7]], cfg), s.generate_images([[7]], SamplingConfig(steps=4, seed=6)))


def test_guidance_scale_one_is_the_conditional_prediction(module):
    """With s = 1 the guided ε equals ε_cond, so the result equals an unguided conditional run."""
    s = samplers(module)[0]
    sp = SPECIAL
    cfg = SamplingConfig(scheduler="ddim", steps=5, guidance_scale=1.0, seed=2)
    guided_path = s.denoise([s.start([[[sp.bos, 7, sp.boi]]])[0], s.start([[[sp.bos, sp.boi]]])[0]],
                            SamplingConfig(**{**vars(cfg), "guidance_scale": 1.0 + 1e-12}),
                            torch.Generator().manual_seed(2))
    cond_only = s.denoise([s.start([[[sp.bos, 7, sp.boi]]])[0]], cfg, torch.Generator().manual_seed(2))
    torch.testing.assert_close(guided_path, cond_only, rtol=1e-4, atol=1e-4)


def test_guidance_interval_switches_guidance_per_step(module):
    """Guidance only at steps with lo <= t < hi: an interval holding no step equals the conditional run, one
    holding every step equals full guidance, and one holding some steps is neither."""
    s = samplers(module)[0]
    base = dict(scheduler="ddim", steps=5, guidance_scale=3.0, seed=2)  # DDIM-5 timesteps: 800 600 400 200 0
    run = lambda **kw: s.generate_images([[7, 8]], SamplingConfig(**{**base, **kw}))  # noqa: E731
    cond_only = run(guidance_scale=1.0)
    full = run()
    torch.testing.assert_close(run(guidance_interval=(900, 1000)), cond_only, rtol=0, atol=2e-3)  # batch of 2 vs 1
    torch.testing.assert_close(run(guidance_interval=(0, 801)), full, rtol=0, atol=1e-6)
    part = run(guidance_interval=(0, 700))
    assert (part - full).abs().max() > 0.05 and (part - cond_only).abs().max() > 0.05
    with pytest.raises(ValueError, match="guidance_interval"):
        SamplingConfig(guidance_interval=(500, 500))


def test_flow_guidance_interval_uses_sigma_times_T(flow_module):
    """Flow's steps are at t = σ·T (4 steps: 1000, 667, 334, 1). The default interval (0, 1000) guides every
    step, the first (σ = 1, the pure-noise end of training's 0..T-1 scale) included; (0, 500) guides the last
    two only, which is neither full guidance nor none."""
    s = samplers(flow_module)[0]
    base = dict(steps=4, guidance_scale=3.0, seed=2)
    run = lambda **kw: s.generate_images([[7, 8]], SamplingConfig(**{**base, **kw}))  # noqa: E731
    full = run()
    torch.testing.assert_close(run(guidance_interval=(0, 5000)), full, rtol=0, atol=1e-6)
    cond_only = run(guidance_scale=1.0)
    part = run(guidance_interval=(0, 500))
    assert (part - full).abs().max() > 0.05 and (part - cond_only).abs().max() > 0.05
    torch.testing.assert_close(run(guidance_interval=(999, 5000)), run(guidance_interval=(668, 1000)), rtol=0,
                               atol=1e-6)  # only the first step guided, either way


def test_clean_image_written_to_cache_matches_full_forward(module):
    s = samplers(module)[0]
    sp = SPECIAL
    state, _ = s.start([[[sp.bos, 7, sp.boi]]])
    x = s.denoise([state], SamplingConfig(steps=3, guidance_scale=1.0), torch.Generator().manual_seed(0))
    s._append_token(state, torch.tensor([sp.eoi]))
    # full forward over the final sequence: prompt, clean image at t = 0, <eoi>
    mask = dense_mask(state.seq.doc_ids, state.seq.image_ids)
    out = module.model(state.seq, state.latents, torch.zeros(1, dtype=torch.long), mask)
    for (k_cache, v_cache), (k_full, v_full) in zip(state.kv, out.kv, strict=True):
        torch.testing.assert_close(k_cache, k_full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_cache, v_full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.latents[-1], x[0])


def test_mixed_generation_cached_equals_uncached(module):
    cached, full = samplers(module)
    cfg = SamplingConfig(max_new_tokens=6, steps=3, guidance_scale=2.0, temperature=1.0, seed=4)
    # Force an image: prompt ends right before the model would choose; we open one explicitly by biasing <boi>.
    with torch.no_grad():
        module.model.lm_head.weight[SPECIAL.boi] += 0.5
    try:
        a, b = cached.generate([5, 6], cfg, max_images=1), full.generate([5, 6], cfg, max_images=1)
    finally:
        with torch.no_grad():
            module.model.lm_head.weight[SPECIAL.boi] -= 0.5
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
        else:
            assert x == y


def test_captioning_cached_equals_uncached(module):
    cached, full = samplers(module)
    lat = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(max_new_tokens=8)
    assert cached.caption(lat, cfg) == full.caption(lat, cfg)


def test_prompt_past_context_fails_clearly(module):
    s = samplers(module)[0]
    with pytest.raises(ValueError, match="max_seq_len=96"):
        s.start([[[SPECIAL.bos] + [5] * 120]])
    state, hidden = s.start([[[SPECIAL.bos] + [5] * 90]])
    with pytest.raises(ValueError, match="max_seq_len"):
        s.decode_text(state, hidden, SamplingConfig(max_new_tokens=20), torch.Generator())
    with pytest.raises(ValueError, match="max_seq_len"):  # 94 prompt positions fit, 4 more patches do not
        s.generate_images([[5] * 92], SamplingConfig(steps=2))


def test_bad_sampling_config():
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        SamplingConfig(scheduler="euler")
