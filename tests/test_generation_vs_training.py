"""Generation computes what training trained: every logit and every noise prediction the sampler uses equals
a plain training-style forward (``pack_rows`` documents, ``TransfusionModule.forward``) over the equivalent
document -- same positions, same ``<boi> patches <eoi>`` layout, the image at the same noised latent and t.

tests/test_generation.py checks the sampler against itself (KV cache == recompute); these tests check it
against training, so a layout or position error shared by both sampler paths is caught too. The model is a
random nano model with random noise-output heads (a fresh one predicts zero noise, which hides image bugs),
for each objective (ε, v, flow: the sampler feeds the model t on the scale training does) and for causal
attention among an image's patches (the cached denoising forward must apply the training mask rule).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from lit_transfusion.batch import Image, Text, pack_rows
from lit_transfusion.generation import SamplingConfig, TransfusionSampler, _stack
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL, randomize_output_heads

pytestmark = pytest.mark.usefixtures("one_thread")

BOS, EOS, BOI, EOI = SPECIAL.bos, SPECIAL.eos, SPECIAL.boi, SPECIAL.eoi
P = 4  # patches per (4, 4, 4) latent with 2 x 2 patches
CAPTIONS = [[7, 8, 9], [10]]  # ragged on purpose: the sampler left-pads the shorter row
TOL = dict(rtol=1e-4, atol=1e-5)
VARIANTS = {  # name -> TransfusionModule settings
    "epsilon": dict(objective="epsilon"),
    "v_prediction": dict(objective="v_prediction"),
    "flow": dict(objective="flow"),
    "causal_image": dict(image_attention="causal"),
    "flow_causal_image": dict(objective="flow", image_attention="causal"),
}


@pytest.fixture(params=list(VARIANTS))
def module(request) -> TransfusionModule:
    torch.manual_seed(0)
    m = TransfusionModule(vocab_size=40, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                          max_seq_len=96, **VARIANTS[request.param])
    return randomize_output_heads(m, seed=1, std=0.05).eval()


def sampler(module, use_cache=True) -> TransfusionSampler:
    return module.sampler(SPECIAL, use_cache=use_cache)


@contextmanager
def recording(obj, name: str):
    """Record every call of ``obj.name`` as (args, kwargs, result); the method is restored on exit. A tensor
    result is recorded as a copy (the sampler masks banned tokens in the logits in place)."""
    calls = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out.clone() if isinstance(out, torch.Tensor) else out))
        return out

    setattr(obj, name, wrapper)
    try:
        yield calls
    finally:
        delattr(obj, name)


# ------------------------------------------------------------------------------ training-style reference
def cond_doc(prefix, latent):
    """A caption->image training document (the datamodule's layout): <bos> caption <boi> patches <eoi> <eos>."""
    return [Text(list(prefix)), Image(latent), Text([EOS])]


def null_doc(latent):
    """The datamodule's caption-dropped document (classifier-free guidance): <bos> <boi> patches <eoi> <eos>."""
    return [Text([BOS], loss=False), Image(latent), Text([EOS])]


def training_eps(module, prefixes, x, t: float) -> torch.Tensor:
    """Image predictions (ε, v or velocity) of a training forward: the conditional documents then the
    null-caption ones, all packed into ONE row (as training packs), every image at latent ``x[k]`` and timestep
    ``t`` (an int for ε/v, flow's σ·T float). -> [2B, C, h, w]"""
    docs = [cond_doc(p, x[k]) for k, p in enumerate(prefixes)] + [null_doc(x[k]) for k in range(len(prefixes))]
    b = pack_rows([docs], 64, 2, SPECIAL)
    with torch.no_grad():
        return module(b, b.latents, torch.full((b.num_images,), t)).eps


def reference_images(module, prefixes, cfg: SamplingConfig) -> torch.Tensor:
    """Classifier-free-guided sampling written from scratch on top of ``training_eps``: the same seeded
    generator, the same fresh scheduler (the objective's), eps = eps_u + s (eps_c - eps_u) at every step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    sched = module.diffusion.sampler(cfg.scheduler, cfg.steps)
    B = len(prefixes)
    x = torch.randn((B, 4, 4, 4), generator=gen) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = training_eps(module, prefixes, sched.scale_model_input(x, t), t.item())
        eps_c, eps_u = eps[:B], eps[B:]
        x = sched.step(eps_u + cfg.guidance_scale * (eps_c - eps_u), t, x, generator=gen).prev_sample
    return x


def training_logits(module, docs, latents_t=None):
    """Per document (one row each): the logits a training forward computes where a target exists, and the
    targets. Images at t = 0 (clean context) unless ``latents_t`` = (latents, t) is given."""
    L = max(sum(len(s.ids) if isinstance(s, Text) else P + 2 for s in d) for d in docs)
    b = pack_rows([[d] for d in docs], L, 2, SPECIAL)
    lat, t = latents_t or (b.latents, torch.zeros(b.num_images, dtype=torch.long))
    with torch.no_grad():
        out = module(b, lat, t)
    rows = []
    for r in range(len(docs)):
        logits, targets = module.model.target_logits(out.hidden[r:r + 1], b.targets[r:r + 1])
        rows.append((logits, targets))
    return rows, b, out


def real(seq, row: int) -> dict:
    """A sampler row's real (non-pad) positions as lists, image ids replaced by "is a patch"."""
    keep = seq.doc_ids[row] >= 0
    return dict(tokens=seq.tokens[row, keep].tolist(), positions=seq.positions[row, keep].tolist(),
                doc_ids=seq.doc_ids[row, keep].tolist(), patch_ids=seq.patch_ids[row, keep].tolist(),
                is_patch=(seq.image_ids[row, keep] >= 0).tolist())


# ------------------------------------------------------------------------------------------- images
def test_denoising_layout_is_the_training_layout(module):
    """The sequence the sampler denoises on (prompt + patch positions) is, row by row, the training layout of
    the same document without its trailing <eoi>: cond rows <bos> caption <boi> patches, uncond rows exactly
    the null caption <bos> <boi> at positions 0, 1 with patches at 2 .. P+1."""
    s = sampler(module)
    cond, _ = s.start([[Text([BOS, *c, BOI])] for c in CAPTIONS])
    uncond, _ = s.start([[Text([BOS, BOI])] for _ in CAPTIONS])
    run = _stack([cond, uncond])
    full = run.seq.cat(s._image_positions(run))
    lat = torch.zeros(4, 4, 4)
    docs = [cond_doc([BOS, *c], lat) for c in CAPTIONS] + [null_doc(lat) for _ in CAPTIONS]
    for row, doc in enumerate(docs):
        n = len(doc[0].ids) + 1 + P  # up to the last patch
        b = pack_rows([[doc]], n + 2, 2, SPECIAL)  # + <eoi> <eos>
        want = real(b.seq, 0)
        want = {k: v[:n] for k, v in want.items()}
        assert real(full, row) == want, f"row {row}"
    for row in (2, 3):
        assert real(full, row)["tokens"][:2] == [BOS, BOI]
        assert real(full, row)["positions"] == list(range(2 + P))
    # the patch positions of row r show image r (cond rows' images first, then uncond rows')
    assert full.image_ids[:, -P:].tolist() == [[r] * P for r in range(4)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_denoising_step_predicts_the_training_noise(module, use_cache):
    """At every step the sampler's cond and uncond noise predictions equal a training forward of the
    caption->image and null-caption documents at the same latent and t; the first step's latent is the seeded
    N(0, 1) draw."""
    s = sampler(module, use_cache)
    cfg = SamplingConfig(scheduler="ddpm", steps=3, guidance_scale=3.0, seed=1)
    B = len(CAPTIONS)
    with recording(module.model, "forward") as calls:
        s.generate_images(CAPTIONS, cfg)
    steps = [(args, out) for args, _, out in calls if args[1].shape[0] == 2 * B]  # cond + uncond images
    timesteps = module.diffusion.sampler("ddpm", 3).timesteps.tolist()
    assert len(steps) == len(timesteps)
    first = torch.randn((B, 4, 4, 4), generator=torch.Generator().manual_seed(cfg.seed))
    torch.testing.assert_close(steps[0][0][1][:B], first)
    prefixes = [[BOS, *c] for c in CAPTIONS]
    for (args, out), t in zip(steps, timesteps, strict=True):
        latents, tt = args[1], args[2]
        assert tt.tolist() == [t] * 2 * B
        torch.testing.assert_close(latents[B:], latents[:B])  # one latent, two conditionings
        want = training_eps(module, prefixes, latents[:B], t)
        torch.testing.assert_close(out.eps[:B], want[:B], **TOL, msg=f"cond eps at t={t}")
        torch.testing.assert_close(out.eps[B:], want[B:], **TOL, msg=f"uncond (null caption) eps at t={t}")
    assert out.eps.abs().mean() > 1e-2


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_generated_images_equal_guided_sampling_over_training_forwards(module, use_cache, scheduler):
    """generate_images == guided sampling written on top of training-style forwards (same seed)."""
    cfg = SamplingConfig(scheduler=scheduler, steps=4, guidance_scale=3.0, seed=2)
    got = sampler(module, use_cache).generate_images(CAPTIONS, cfg)
    want = reference_images(module, [[BOS, *c] for c in CAPTIONS], cfg)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # guidance matters here: the unguided result is far away (so the null branch is really tested)
    unguided = reference_images(module, [[BOS, *c] for c in CAPTIONS],
                                SamplingConfig(**{**vars(cfg), "guidance_scale": 1.0}))
    assert (unguided - want).abs().max() > 1e-2


def test_kv_cache_after_an_image_equals_training_forward_of_the_clean_image(module):
    """After denoising and <eoi>, the cached keys/values of every position, the sequence fields, and the logits
    at <eoi> equal a training forward over <bos> caption <boi> [clean image, t = 0] <eoi> <eos>."""
    s = sampler(module, use_cache=True)
    B = len(CAPTIONS)
    cond, _ = s.start([[Text([BOS, *c, BOI])] for c in CAPTIONS])
    uncond, _ = s.start([[Text([BOS, BOI])] for _ in CAPTIONS])
    x = s.denoise([cond, uncond], SamplingConfig(steps=3, guidance_scale=2.0), torch.Generator().manual_seed(0))
    hidden = s._append_token(cond, torch.full((B,), EOI))
    docs = [cond_doc([BOS, *c], x[k]) for k, c in enumerate(CAPTIONS)]
    rows, b, out = training_logits(module, docs)
    for k, c in enumerate(CAPTIONS):
        n = len(c) + 2 + P + 1  # <bos> caption <boi> patches <eoi>
        want = {key: v[:n] for key, v in real(b.seq, k).items()}
        assert real(cond.seq, k) == want
        for layer, ((kc, vc), (kf, vf)) in enumerate(zip(cond.kv, out.kv, strict=True)):
            torch.testing.assert_close(kc[k, :, -n:], kf[k, :, :n], **TOL, msg=f"keys, layer {layer}, row {k}")
            torch.testing.assert_close(vc[k, :, -n:], vf[k, :, :n], **TOL, msg=f"values, layer {layer}, row {k}")
        logits, targets = rows[k]
        assert targets[-1] == EOS  # the <eoi> position is trained: it predicts what follows the image
        torch.testing.assert_close(module.model.logits(hidden[k]), logits[-1], **TOL)


# --------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("use_cache", [True, False])
def test_text_logits_equal_training_logits(module, use_cache):
    """Greedy continuation of ragged prompts: each logit vector the sampler picks from equals the training
    forward's logits at the same position of <bos> prompt continuation."""
    s = sampler(module, use_cache)
    prompts = [[5, 6, 7, 8], [9]]
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.0)
    state, hidden = s.start([[[BOS, *p]] for p in prompts])
    with recording(module.model, "logits") as calls:
        ids, _ = s.decode_text(state, hidden, cfg, torch.Generator())
    used = torch.stack([out for _, _, out in calls])  # [steps, B, V]
    rows, _, _ = training_logits(module, [[Text([BOS, *p, *i])] for p, i in zip(prompts, ids, strict=True)])
    for k, (p, i) in enumerate(zip(prompts, ids, strict=True)):
        logits, targets = rows[k]
        assert targets[len(p):].tolist() == i
        torch.testing.assert_close(used[:len(i), k], logits[len(p):], **TOL, msg=f"row {k}")


@pytest.mark.parametrize("use_cache", [True, False])
def test_captioning_logits_equal_training_logits(module, use_cache):
    """Captioning: the first caption token is picked from the training logits at <eoi> of
    <bos> <boi> [clean image, t = 0] <eoi> caption, and every later one from the training logits there."""
    s = sampler(module, use_cache)
    lat = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.0)
    with recording(module.model, "logits") as calls:
        captions = s.caption(lat, cfg)
    used = torch.stack([out for _, _, out in calls])  # [steps, B, V]
    ids = [c + [EOS] if len(c) < cfg.max_new_tokens else c for c in captions]
    docs = [[Text([BOS]), Image(lat[k], t_max=500), Text(ids[k])] for k in range(2)]  # the image-first layout
    rows, b, out = training_logits(module, docs)
    eoi_pos = 1 + 1 + P
    assert b.seq.tokens[0, eoi_pos] == EOI
    for k in range(2):
        logits, targets = rows[k]
        assert targets.tolist() == [BOI, *ids[k]]  # training also trains <bos> -> <boi>; the sampler starts at <eoi>
        torch.testing.assert_close(used[0, k], module.model.logits(out.hidden[k, eoi_pos]), **TOL,
                                   msg="first caption token's logits")
        torch.testing.assert_close(used[:len(ids[k]), k], logits[1:], **TOL, msg=f"row {k}")


@pytest.mark.parametrize("use_cache", [True, False])
def test_mixed_generation_equals_training_forward(module, use_cache):
    """generate() with scripted token choices (text, <boi>, image, text, <eos>): the logits it picks from equal
    the training logits of <bos> prompt text <boi> [its image, t = 0] <eoi> text <eos>, and its image equals
    guided sampling over training forwards with the prefix <bos> prompt text and the null caption."""
    s = sampler(module, use_cache)
    prompt, before, after = [5, 6], [9, 10], [11, 12]
    script = iter([*before, BOI, *after, EOS])
    s._pick = lambda logits, cfg, gen, allow_eos=True: torch.tensor([next(script)])
    cfg = SamplingConfig(max_new_tokens=6, steps=3, guidance_scale=3.0, seed=4)
    with recording(module.model, "logits") as calls:
        output = s.generate(prompt, cfg, max_images=1)
    assert [o if isinstance(o, list) else "image" for o in output] == [before, "image", after]
    image = output[1]
    torch.testing.assert_close(image, reference_images(module, [[BOS, *prompt, *before]], cfg)[0], rtol=1e-4, atol=1e-4)
    used = torch.cat([out for _, _, out in calls])  # [n, V]
    doc = [Text([BOS, *prompt, *before]), Image(image), Text([*after, EOS])]
    (logits, targets), = training_logits(module, [doc])[0]
    assert targets[len(prompt):].tolist() == [*before, BOI, *after, EOS]
    torch.testing.assert_close(used, logits[len(prompt):], **TOL)
