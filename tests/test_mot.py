"""Mixture-of-Transformers backbone (modalities=2), QK-norm and the patcher-less model, checked against a dense
model, a brute-force per-position reference, hand computations and hand counts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lit_transfusion.attention import dense_mask
from lit_transfusion.batch import Image, Text, pack_rows
from lit_transfusion.generation import SamplingConfig
from lit_transfusion.model import ModelConfig, TransfusionModel
from lit_transfusion.module import TransfusionModule
from lit_transfusion.transformer import Attention, Transformer, TransformerConfig, apply_rope
from tests.conftest import SPECIAL, randomize_output_heads
from tests.test_generation import make_module, samplers

BOS, EOS = SPECIAL.bos, SPECIAL.eos
pytestmark = pytest.mark.usefixtures("one_thread")


def model(modalities: int = 2, seed: int = 0, **kw) -> TransfusionModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_size("nano", vocab_size=40, latent_shape=(4, 4, 4), max_seq_len=64,
                                modalities=modalities, **kw)
    return randomize_output_heads(TransfusionModel(cfg), seed=seed + 1).eval()


def latent(seed: int) -> torch.Tensor:
    return torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(seed))


def text_batch():
    docs = [[Text([BOS, 5, 6, 7, 8, EOS])], [Text([BOS, 9, 10, 11, EOS])]]
    return pack_rows([docs, [[Text([BOS] + list(range(12, 30)) + [EOS])]]], 24, 2, SPECIAL)


def mixed_batch():
    """Row 0: a text-only document, then caption -> image -> text; row 1: two images in one document."""
    row0 = [[Text([BOS, 5, 6, EOS])], [Text([BOS, 7, 8]), Image(latent(1)), Text([9, EOS])]]
    row1 = [[Text([BOS, 10]), Image(latent(2)), Text([11]), Image(latent(3)), Text([EOS])]]
    return pack_rows([row0, row1], 32, 2, SPECIAL)


def forward(m: TransfusionModel, batch, t=None):
    t = torch.full((batch.num_images,), 300) if t is None else t
    return m(batch.seq, batch.latents, t, dense_mask(batch.seq.doc_ids, batch.seq.image_ids))


def copy_dense_into(mot: TransfusionModel, dense: TransfusionModel, tower: int) -> None:
    """Load a dense model's weights into one tower of an MoT model (embedding, patcher and head as they are)."""
    state = mot.state_dict()
    for key, value in dense.state_dict().items():
        if key.startswith("transformer.blocks."):
            parts = key.split(".")  # transformer, blocks, i, rest...
            key = ".".join([*parts[:3], "towers", str(tower), *parts[3:]])
        elif key == "transformer.norm.weight":
            key = f"transformer.norms.{tower}.weight"
        assert key in state, key
        state[key] = value
    mot.load_state_dict(state)


def perturb(params, seed: int = 7, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def image_weights(m: TransfusionModel) -> list[torch.Tensor]:
    net = m.transformer
    return [p for b in net.blocks for p in b.towers[1].parameters()] + list(net.norms[1].parameters())


# ------------------------------------------------------------------------------------- MoT == dense on text
def test_text_only_batch_through_mot_equals_the_dense_model_it_copies():
    dense, mot = model(modalities=1, seed=0), model(modalities=2, seed=3)
    copy_dense_into(mot, dense, tower=0)
    b = text_batch()
    out_d, out_m = forward(dense, b), forward(mot, b)
    torch.testing.assert_close(out_m.hidden, out_d.hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(mot.logits(out_m.hidden), dense.logits(out_d.hidden), rtol=0, atol=1e-6)
    for (km, vm), (kd, vd) in zip(out_m.kv, out_d.kv, strict=True):
        torch.testing.assert_close(km, kd, rtol=0, atol=1e-6)
        torch.testing.assert_close(vm, vd, rtol=0, atol=1e-6)
    # The image tower holds other weights: the same copy into tower 1 gives a different model on images.
    assert not torch.allclose(forward(mot, mixed_batch()).hidden, forward(dense, mixed_batch()).hidden)


def test_state_dict_names_one_dense_block_per_tower():
    dense, mot = model(modalities=1), model(modalities=2)
    keys = set(mot.state_dict())
    for key in dense.state_dict():
        if key.startswith("transformer.blocks.0."):
            rest = key.removeprefix("transformer.blocks.0.")
            assert {f"transformer.blocks.0.towers.{m}.{rest}" for m in (0, 1)} <= keys
    assert {"transformer.norms.0.weight", "transformer.norms.1.weight"} <= keys
    assert "transformer.norm.weight" not in keys and "transformer.norm.weight" in dense.state_dict()
    assert not any("q_norm" in k for k in keys)  # qk_norm is off by default


# ------------------------------------------------------------------------------- brute-force reference
def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_transformer(net: Transformer, x, positions, mask, modality):
    """Every modality's weights run over EVERY position, then each position keeps its own modality's result;
    attention is written out (scores, mask, softmax) over all positions."""
    cfg = net.cfg
    B, L, D = x.shape
    H, Dh, eps = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.norm_eps
    rope = net.rope[positions]

    def pick(outs):  # one [B, L, ...] per modality -> each position's own modality's
        out = outs[0]
        for m in range(1, len(outs)):
            out = torch.where((modality == m).view(B, L, *[1] * (out.dim() - 2)), outs[m], out)
        return out

    def swiglu(h, ffn):
        gate, up = F.linear(h, ffn.w13.weight).chunk(2, -1)
        return F.linear(F.silu(gate) * up, ffn.w2.weight)

    for block in net.blocks:
        towers = block.towers
        qkv = pick([F.linear(rms(x, t.attn_norm.weight, eps), t.attn.wqkv.weight) for t in towers])  # [B, L, 3D]
        q, k, v = qkv.view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        scores = (q @ k.transpose(-1, -2) / Dh**0.5).masked_fill(~mask, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        x = pick([x + F.linear(y, t.attn.wo.weight) for t in towers])
        x = pick([x + swiglu(rms(x, t.ffn_norm.weight, eps), t.ffn) for t in towers])
    return pick([rms(x, n.weight, eps) for n in net.norms])


@pytest.mark.parametrize("modalities", [2, 3])
def test_transformer_routes_each_position_through_its_own_weights(modalities):
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=64, modalities=modalities))
    perturb([p for n, p in net.named_parameters() if "norm" in n], scale=0.3)  # norms away from 1, per tower
    b = mixed_batch()
    B, L = b.seq.shape
    x = torch.randn(B, L, 32, generator=torch.Generator().manual_seed(1))
    modality = b.seq.image_mask.long()
    if modalities == 3:  # a third modality on some text positions
        modality = torch.where((b.seq.tokens % 3 == 0) & (modality == 0), 2, modality)
    mask = dense_mask(b.seq.doc_ids, b.seq.image_ids)
    out, _ = net(x, b.seq.positions, mask, modality=modality)
    torch.testing.assert_close(out, reference_transformer(net, x, b.seq.positions, mask, modality),
                               rtol=1e-5, atol=1e-5)


def test_model_sends_patch_positions_to_the_image_weights():
    """The model gives the backbone modality 1 exactly at patch positions (``<boi>``/``<eoi>`` are text), and its
    output there is the brute-force reference's."""
    m = model()
    doc = [Text([BOS, 7, 8]), Image(latent(1)), Text([9, EOS])]
    b = pack_rows([[doc]], 12, 2, SPECIAL)
    seen = {}
    handle = m.transformer.register_forward_hook(
        lambda mod, args, out: seen.update(x=args[0], modality=args[4], hidden=out[0]))
    try:
        forward(m, b)
    finally:
        handle.remove()
    # <bos> 7 8 <boi> p0 p1 p2 p3 <eoi> 9 <eos> pad
    assert seen["modality"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]]
    mask = dense_mask(b.seq.doc_ids, b.seq.image_ids)
    ref = reference_transformer(m.transformer, seen["x"], b.seq.positions, mask, seen["modality"])
    torch.testing.assert_close(seen["hidden"], ref, rtol=1e-5, atol=1e-5)


def test_image_weights_change_image_positions_only():
    m = model()
    mixed, text = mixed_batch(), text_batch()
    before_mixed, before_text = forward(m, mixed), forward(m, text)
    perturb(image_weights(m))
    after_mixed, after_text = forward(m, mixed), forward(m, text)
    # A text-only batch never touches the image weights.
    assert torch.equal(after_text.hidden, before_text.hidden)
    # Mixed: every patch position moves (and so the predicted noise). Positions before a row's first patch, and
    # pads, cannot see a patch (causal mask, own document): bitwise the same. Text after an image sees the
    # patches' new keys and values, so it moves too.
    patch, real = mixed.seq.image_mask, mixed.seq.doc_ids >= 0
    after_patch = patch.long().cumsum(1) > 0
    moved = (after_mixed.hidden - before_mixed.hidden).abs().amax(-1)  # [B, L]
    assert moved[patch].min() > 1e-4
    assert not torch.allclose(after_mixed.eps, before_mixed.eps)
    assert float(moved[~after_patch | ~real].abs().max()) == 0
    assert moved[after_patch & ~patch & real].min() > 1e-4


# ----------------------------------------------------------------------------------------------- gradients
def mot_module(**kw) -> TransfusionModule:
    torch.manual_seed(0)
    return TransfusionModule(vocab_size=40, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                             max_seq_len=64, mot=True, **kw)


@pytest.mark.parametrize(("kind", "patcher"), [("text_only", "linear"), ("image_only", "linear"), ("mixed", "linear"),
                                               ("text_only", "unet"), ("mixed", "unet")])
def test_every_parameter_gets_a_gradient(kind, patcher):
    m = randomize_output_heads(mot_module(patcher=patcher))  # else the zero-initialised noise head cuts the image
    # gradient off
    batch = {"text_only": text_batch(), "mixed": mixed_batch(),
             "image_only": pack_rows([[[Image(latent(1))], [Image(latent(2))]]], 12, 2, SPECIAL)}[kind]
    m.losses(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    image_grads = [p.grad for p in image_weights(m.model)]
    if kind == "text_only":  # zero, not absent
        assert all(float(g.abs().max()) == 0 for g in image_grads)
    else:
        assert sum(float(g.abs().sum()) for g in image_grads) > 0


def test_transformer_gives_unused_text_weights_zero_gradients():
    """All positions image (modality 1): the text weights are unused, yet get a (zero) gradient."""
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, modalities=2))
    x = torch.randn(2, 6, 32)
    mask = dense_mask(torch.zeros(2, 6, dtype=torch.long), torch.full((2, 6), -1))
    out, _ = net(x, torch.arange(6).expand(2, 6), mask, modality=torch.ones(2, 6, dtype=torch.long))
    out.square().sum().backward()
    text = [p for b in net.blocks for p in b.towers[0].parameters()] + list(net.norms[0].parameters())
    image = [p for b in net.blocks for p in b.towers[1].parameters()] + list(net.norms[1].parameters())
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0 for p in text)
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in image)


def test_ddp_trains_text_only_batches_after_mixed_ones():
    """Plain DDP (no find_unused_parameters) fails at the step after one that left a parameter without a
    gradient; an MoT model takes mixed, text-only, then mixed batches."""
    m = mot_module()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(m.model)
        for i, batch in enumerate([mixed_batch(), text_batch(), text_batch(), mixed_batch()]):
            out = ddp(batch.seq, batch.latents, torch.full((batch.num_images,), 100 * (i + 1)),
                      dense_mask(batch.seq.doc_ids, batch.seq.image_ids))
            loss = ddp.module.logits(out.hidden).square().mean() + out.eps.square().mean()
            if not batch.num_images:  # as TransfusionModule.losses does for the patcher
                loss = loss + sum(p.sum() for p in m.model.patcher.parameters()) * 0.0
            loss.backward()
            ddp.zero_grad()
    finally:
        dist.destroy_process_group()


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = model(activation_checkpointing=ckpt).train()
        out = forward(m, mixed_batch())
        (out.hidden.square().mean() + out.eps.square().mean()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------------- KV cache
def test_kv_prefix_equals_full_pass_across_modalities():
    m = model()
    b = mixed_batch()
    seq, split = b.seq, 7  # row 0: before its image (at 8..11); row 1: between its images (3..6, 10..13)
    t = torch.full((b.num_images,), 300)
    full = forward(m, b, t)
    head = seq.map(lambda _, x: x[:, :split])
    tail = seq.map(lambda _, x: x[:, split:])
    out_head = m(head, b.latents, t, dense_mask(head.doc_ids, head.image_ids))
    out_tail = m(tail, b.latents, t, dense_mask(seq.doc_ids, seq.image_ids, tail.doc_ids, tail.image_ids),
                 past=out_head.kv)
    torch.testing.assert_close(out_tail.hidden, full.hidden[:, split:], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mot_sampling_module():
    return make_module(mot=True, qk_norm=True)


def test_mot_images_cached_equal_uncached_with_guidance(mot_sampling_module):
    cached, full = samplers(mot_sampling_module)
    cfg = SamplingConfig(scheduler="ddim", steps=5, guidance_scale=3.0, seed=1)
    a, b = cached.generate_images([[7, 8], [9]], cfg), full.generate_images([[7, 8], [9]], cfg)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert a.shape == (2, 4, 4, 4) and a.std() > 0.1


def test_mot_text_after_an_image_and_captions_cached_equal_uncached(mot_sampling_module):
    """Caption -> image (guided) -> <eoi> -> text: the text reads the image's cached keys/values, written by the
    image weights at t = 0."""
    cfg = SamplingConfig(max_new_tokens=6, steps=3, guidance_scale=2.0, temperature=1.0, seed=4)
    results = []
    for s in samplers(mot_sampling_module):
        gen = torch.Generator().manual_seed(cfg.seed)
        state, _ = s.start([[[BOS, 5, 6, SPECIAL.boi]]])
        image = s.denoise([state, s.start([[[BOS, SPECIAL.boi]]])[0]], cfg, gen)
        hidden = s._append_token(state, torch.tensor([SPECIAL.eoi]))
        results.append((image, s.decode_text(state, hidden, cfg, gen)[0]))
    (image_c, text_c), (image_f, text_f) = results
    torch.testing.assert_close(image_c, image_f, rtol=1e-4, atol=1e-4)
    assert text_c == text_f and len(text_c[0]) > 2
    cached, full = samplers(mot_sampling_module)
    lat = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert cached.caption(lat, SamplingConfig(max_new_tokens=6)) == full.caption(lat, SamplingConfig(max_new_tokens=6))


# ------------------------------------------------------------------------------------------------- QK-norm
def test_qk_norm_matches_a_hand_computation():
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, n_heads=4, max_seq_len=16, qk_norm=True)
    attn = Attention(cfg)
    perturb([attn.q_norm.weight, attn.k_norm.weight], scale=0.5)
    B, L, H, Dh = 2, 5, 4, 8
    x = torch.randn(B, L, 32)
    positions = torch.arange(L).expand(B, L)
    rope = Transformer(cfg).rope[positions]
    mask = dense_mask(torch.zeros(B, L, dtype=torch.long), torch.full((B, L), -1))
    out, (k_out, _) = attn(x, rope, mask)

    q, k, v = (x @ attn.wqkv.weight.T).view(B, L, 3, H, Dh).unbind(2)  # [B, L, H, Dh] each
    q = q / (q.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt() * attn.q_norm.weight
    k = k / (k.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt() * attn.k_norm.weight
    q, k, v = apply_rope(q.transpose(1, 2), rope), apply_rope(k.transpose(1, 2), rope), v.transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / Dh**0.5).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, 32) @ attn.wo.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_out, k, rtol=1e-5, atol=1e-6)


def test_qk_norm_bounds_attention_logits_whatever_the_input_scale():
    """With unit gains, |q|=|k|=sqrt(Dh) after the norm (RoPE rotates, keeping norms), so every attention logit
    q·k/sqrt(Dh) lies in [-sqrt(Dh), sqrt(Dh)], however large the inputs; without the norm they grow with them."""
    torch.manual_seed(0)
    Dh = 8
    logits = {}
    for qk_norm in (False, True):
        attn = Attention(TransformerConfig(dim=32, n_heads=4, max_seq_len=16, qk_norm=qk_norm))
        q, k, _ = attn.qkv(1000 * torch.randn(2, 5, 32)).unbind(-3)  # [B, L, H, Dh]
        logits[qk_norm] = torch.einsum("bqhd,bkhd->bhqk", q, k) / Dh**0.5
    assert float(logits[True].abs().max()) <= Dh**0.5 + 1e-4
    assert float(logits[False].abs().max()) > 100


def test_qk_norm_adds_two_gains_per_block_and_keeps_the_kv_cache_exact():
    plain, normed = model(modalities=1), model(modalities=1, qk_norm=True)
    assert normed.num_params() - plain.num_params() == 2 * 2 * 32  # 2 layers x (q, k) x head dim 32
    assert "transformer.blocks.0.attn.q_norm.weight" in normed.state_dict()
    perturb([p for n, p in normed.named_parameters() if "q_norm" in n or "k_norm" in n], scale=0.5)
    b = mixed_batch()
    t = torch.full((b.num_images,), 300)
    full = forward(normed, b, t)
    head, tail = b.seq.map(lambda _, x: x[:, :7]), b.seq.map(lambda _, x: x[:, 7:])  # no image is split
    out_head = normed(head, b.latents, t, dense_mask(head.doc_ids, head.image_ids))
    out_tail = normed(tail, b.latents, t, dense_mask(b.seq.doc_ids, b.seq.image_ids, tail.doc_ids, tail.image_ids),
                      past=out_head.kv)
    torch.testing.assert_close(out_tail.hidden, full.hidden[:, 7:], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- patcher "none"
def test_model_without_a_patcher_runs_text_and_refuses_images():
    cfg = ModelConfig.from_size("nano", vocab_size=40, latent_shape=(1, 5, 5), patcher="none", max_seq_len=64)
    assert cfg.patches_per_image == 0  # a 5x5 code grid: no patch size needed
    m = TransfusionModel(cfg).eval()
    assert m.patcher is None
    b = text_batch()
    out = forward(m, b)
    assert out.hidden.shape == (*b.seq.shape, 64) and out.eps.shape[0] == 0 and torch.isfinite(out.hidden).all()
    with pytest.raises(ValueError, match="no patcher"):
        forward(m, mixed_batch())
    linear = TransfusionModel(ModelConfig.from_size("nano", vocab_size=40, latent_shape=(4, 4, 4)))
    assert m.num_params() == linear.num_params() - sum(p.numel() for p in linear.patcher.parameters())
    with torch.device("meta"):
        meta = TransfusionModel(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert 0.017 < float(meta.embed.weight.std()) < 0.023
    with pytest.raises(ValueError, match="patcher='none'"):
        ModelConfig.from_size("nano", vocab_size=40, latent_shape=(1, 4, 4), patcher="none", modalities=2)


# ----------------------------------------------------------------------------------------- active params
def test_active_params_count_the_backbone_once():
    D, F_hidden, layers = 64, 192, 2  # nano: ffn hidden = 64·ceil(8·64/3/64)
    block = 2 * D + 3 * D * D + D * D + 2 * D * F_hidden + F_hidden * D  # norms, wqkv, wo, w13, w2
    backbone = layers * block + D  # + final norm
    dense, mot = model(modalities=1), model(modalities=2)
    assert sum(p.numel() for p in dense.transformer.parameters()) == backbone
    assert dense.active_params() == dense.num_params()
    assert mot.num_params() == dense.num_params() + backbone
    assert mot.active_params() == dense.num_params()
    mot_qk, dense_qk = model(modalities=2, qk_norm=True), model(modalities=1, qk_norm=True)
    assert mot_qk.active_params() == dense_qk.num_params() == dense.num_params() + layers * 2 * (D // 2)


# ------------------------------------------------------------------------------------------------ settings
def test_settings_reach_the_backbone_and_bad_values_fail_clearly():
    cfg = ModelConfig.from_size("nano", vocab_size=9, latent_shape=(4, 4, 4), modalities=2, qk_norm=True)
    assert (cfg.transformer.modalities, cfg.transformer.qk_norm) == (2, True)
    module = mot_module(qk_norm=True)
    assert (module.config.transformer.modalities, module.config.transformer.qk_norm) == (2, True)
    assert module.model.active_params() < module.model.num_params()
    plain = TransfusionModule(vocab_size=40, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano")
    assert (plain.config.transformer.modalities, plain.config.transformer.qk_norm) == (1, False)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="modalities="):
            TransformerConfig(modalities=bad)
    with pytest.raises(ValueError, match="qk_norm="):
        TransformerConfig(qk_norm="yes")
    with pytest.raises(ValueError, match="modalities=3"):
        ModelConfig.from_size("nano", vocab_size=9, latent_shape=(4, 4, 4), modalities=3)
    net = Transformer(TransformerConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=8, modalities=2))
    mask = dense_mask(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1))
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        net(torch.randn(1, 4, 32), torch.arange(4)[None], mask, modality=torch.tensor([[0, 1, 2, 0]]))
