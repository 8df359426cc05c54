"""Model + dual loss on hand-built batches: routing, per-image averaging, isolation between documents."""

import pytest
import torch
import torch.nn.functional as F

from lit_transfusion.batch import IGNORE, Image, Text, pack_rows
from lit_transfusion.model import SIZES, ModelConfig, TransfusionModel
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL

BOS, EOS = SPECIAL.bos, SPECIAL.eos


def make_module(patcher="linear", **kw):
    torch.manual_seed(0)
    return TransfusionModule(
        vocab_size=32, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano", patcher=patcher,
        max_seq_len=128, **kw,
    )


def image_docs(n=3):
    g = torch.Generator().manual_seed(1)
    return [[Text([BOS, 7 + i, 8]), Image(torch.randn(4, 4, 4, generator=g)), Text([EOS])] for i in range(n)]


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_losses_match_manual_computation(patcher):
    m = make_module(patcher).eval()
    b = pack_rows([image_docs(2), [[Text([BOS, 5, 6, 9, EOS])]]], 32, 2, SPECIAL)
    t = torch.tensor([100, 700])
    g = torch.Generator().manual_seed(3)
    out = m.losses(b, t=t, generator=g)
    # Recompute by hand with the same noise.
    noise = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(3))
    noisy = m.diffusion.add_noise(b.latents, noise, t)
    o = m(b, noisy, t)
    sup = b.targets != IGNORE
    ce = F.cross_entropy(m.model.logits(o.hidden)[sup], b.targets[sup])
    per_image = torch.stack([F.mse_loss(o.eps[i], noise[i]) for i in range(2)])
    torch.testing.assert_close(out["loss_text"], ce)
    torch.testing.assert_close(out["mse_per_image"], per_image)
    torch.testing.assert_close(out["loss_image"], per_image.mean())
    torch.testing.assert_close(out["loss"], ce + 5.0 * per_image.mean())
    torch.testing.assert_close(out["mse_image"], per_image.mean())


def test_min_snr_weighting_reweights_only_the_image_term():
    b = pack_rows([image_docs(2), [[Text([BOS, 5, 6, 9, EOS])]]], 32, 2, SPECIAL)
    t = torch.tensor([30, 800])  # a nearly clean image (SNR >> 1) and a noisy one (SNR < 1)
    plain = make_module().eval().losses(b, t=t, generator=torch.Generator().manual_seed(3))
    m = make_module(snr_gamma=1.0).eval()
    out = m.losses(b, t=t, generator=torch.Generator().manual_seed(3))
    a = m.diffusion.alphas_cumprod[t]
    w = (a / (1 - a)).clamp(max=1.0) / (a / (1 - a))
    assert w[0] < 0.1 and w[1] == 1.0
    torch.testing.assert_close(out["mse_per_image"], plain["mse_per_image"])  # same model, same noise
    torch.testing.assert_close(out["mse_image"], plain["mse_image"])
    torch.testing.assert_close(out["loss_image"], (w * plain["mse_per_image"]).mean())
    torch.testing.assert_close(out["loss"], plain["loss_text"] + 5.0 * out["loss_image"])
    with pytest.raises(ValueError, match="snr_gamma"):
        make_module(snr_gamma=0.0)


def test_importance_timesteps_weigh_full_range_images_by_the_mean_weight():
    """timestep_sampling='importance': the drawn t of a full-range image carries the constant mean weight;
    a noise-limited (image-first) one keeps uniform t and its own Min-SNR weight; an explicit t (validation)
    is left alone."""
    docs = image_docs(2)
    docs[1][1] = Image(docs[1][1].latent, t_max=500)
    b = pack_rows([docs], 32, 2, SPECIAL)
    m = make_module(snr_gamma=1.0).eval()
    g = torch.Generator().manual_seed(5)
    out = m.losses(b, generator=g, timestep_sampling="importance")
    t, w = m.diffusion.importance_timesteps(b.t_max, 1.0, torch.Generator().manual_seed(5))
    assert t[1] < 500
    w_all = m.diffusion.loss_weights(torch.arange(1000), 1.0)
    torch.testing.assert_close(w, torch.stack([w_all.mean(), w_all[t[1]]]))
    torch.testing.assert_close(out["loss_image"], (w * out["mse_per_image"]).mean())
    fixed = torch.tensor([30, 300])
    a = m.losses(b, t=fixed, generator=torch.Generator().manual_seed(3), timestep_sampling="importance")
    u = m.losses(b, t=fixed, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a["loss_image"], u["loss_image"])
    with pytest.raises(ValueError, match="snr_gamma"):
        make_module(timestep_sampling="importance")


def test_image_loss_does_not_depend_on_text_in_batch():
    """Per-image averaging: adding text documents (other rows or the same row) leaves loss_image unchanged."""
    m = make_module().eval()
    docs = image_docs(3)
    t = torch.tensor([50, 400, 900])
    alone = m.losses(pack_rows([docs], 48, 2, SPECIAL), t=t, generator=torch.Generator().manual_seed(0))
    padded_rows = [[[Text([BOS] + [5] * 9 + [EOS])]] + docs, [[Text([BOS] + [6] * 30 + [EOS])]]]
    mixed = m.losses(pack_rows(padded_rows, 64, 2, SPECIAL), t=t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(alone["loss_image"], mixed["loss_image"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone["mse_per_image"], mixed["mse_per_image"], rtol=1e-4, atol=1e-5)


def test_documents_are_isolated_and_causal():
    """Changing a later document, or a later token, changes nothing before it in another doc."""
    m = make_module().eval()
    docs = image_docs(2)
    b1 = pack_rows([docs], 32, 2, SPECIAL)
    other = [[Text([BOS, 20, 21]), Image(torch.zeros(4, 4, 4)), Text([EOS])]]
    b2 = pack_rows([[docs[0]] + other], 32, 2, SPECIAL)
    t = torch.tensor([300, 300])
    h1 = m(b1, b1.latents, t)
    h2 = m(b2, b2.latents, t)
    n0 = 3 + 6 + 1  # first document's positions
    torch.testing.assert_close(h1.hidden[0, :n0], h2.hidden[0, :n0])
    torch.testing.assert_close(h1.eps[0], h2.eps[0])
    assert not torch.allclose(h1.hidden[0, n0:2 * n0], h2.hidden[0, n0:2 * n0])


def test_patches_see_each_other_bidirectionally_and_have_positions():
    m = make_module().eval()
    doc = [Text([BOS, 9]), Image(torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0))), Text([EOS])]
    b = pack_rows([[doc]], 16, 2, SPECIAL)
    t = torch.tensor([500])
    base = m(b, b.latents, t).hidden
    lat = b.latents.clone()
    lat[0, :, 2:, 2:] += 1.0  # change the LAST patch (raster order) only
    moved = m(b, lat, t).hidden
    first_patch = 3  # <bos> 9 <boi> p0 ...
    assert not torch.allclose(base[0, first_patch], moved[0, first_patch]), "earlier patch must see a later one"
    # 2-D position signal: identical patch contents at different grid cells give different hidden states.
    same = torch.ones(1, 4, 4, 4)
    h = m(b, same, t).hidden
    patches = h[0, 3:7]
    assert torch.cdist(patches, patches).fill_diagonal_(1.0).min() > 1e-3


def test_size_registry_matches_paper():
    paper = {"0.16B": (16, 768, 12), "0.37B": (24, 1024, 16), "0.76B": (24, 1536, 24), "1.4B": (24, 2048, 16),
             "7B": (32, 4096, 32)}
    for name, (layers, dim, heads) in paper.items():
        shape = {k: SIZES[name][k] for k in ("n_layers", "dim", "n_heads")}
        assert shape == dict(n_layers=layers, dim=dim, n_heads=heads)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="patch_size=3"):
        ModelConfig(vocab_size=8, latent_shape=(4, 8, 8), patch_size=3)
    with pytest.raises(ValueError, match="image_loss_weight"):
        make_module(image_loss_weight=-1.0)
    with pytest.raises(ValueError, match=r"model\.init_args\.size=.huge"):
        TransfusionModule(vocab_size=8, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="huge")
    with pytest.raises(ValueError, match="patch_size"):
        make_module(patch_size=3)


def test_model_param_count_for_tiny():
    cfg = ModelConfig(vocab_size=512, latent_shape=(4, 8, 8))
    n = TransfusionModel(cfg).num_params()
    assert 3.0e6 < n < 4.0e6  # the ~3.4M tiny model


@pytest.mark.parametrize("size", ["tiny", "7B"])
@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_builds_on_the_meta_device_without_memory(size, patcher):
    import time

    cfg = ModelConfig.from_size(size, vocab_size=32000, latent_shape=(8, 32, 32), patcher=patcher)
    start = time.perf_counter()
    with torch.device("meta"):
        model = TransfusionModel(cfg)
    assert time.perf_counter() - start < 5  # ~0.1 s for 7B; a real 7B init would take minutes
    assert all(p.is_meta for p in model.parameters())
    if size == "7B":
        assert 6.5e9 < model.num_params() < 7.0e9


def test_meta_build_then_init_weights_matches_a_direct_build():
    """to_empty + init_weights gives the same kind of model as building on the CPU: zero noise heads, the RoPE
    table, N(0, 0.02) linear layers -- and a forward that runs."""
    cfg = ModelConfig.from_size("nano", vocab_size=50, latent_shape=(4, 4, 4), patcher="unet")
    with torch.device("meta"):
        model = TransfusionModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    direct = TransfusionModel(cfg)
    assert torch.equal(model.transformer.rope, direct.transformer.rope)
    for m in (model, direct):
        assert m.patcher.conv_out.weight.abs().sum() == 0 and m.patcher.conv_out.bias.abs().sum() == 0
        assert 0.017 < float(m.transformer.blocks[0].attn.wqkv.weight.std()) < 0.023
        assert 0.017 < float(m.embed.weight.std()) < 0.023
    # The diffusers conv blocks keep diffusers' init (not N(0, 0.02)): their time projection is uniform
    # with bound 1/sqrt(fan_in) (torch's Linear default).
    proj = model.patcher.down[0].time_emb_proj.weight
    assert float(proj.abs().max()) <= 1 / proj.shape[1] ** 0.5 + 1e-6 and float(proj.std()) > 0.03


def test_from_size_overrides_and_rejects_unknown_settings():
    cfg = ModelConfig.from_size("tiny", vocab_size=9, latent_shape=(4, 8, 8), dim=128, n_heads=None, patch_size=4)
    assert (cfg.transformer.dim, cfg.transformer.n_heads, cfg.transformer.n_layers) == (128, 4, 4)
    assert cfg.patch_size == 4 and cfg.patches_per_image == 4
    with pytest.raises(ValueError, match="size='huge'"):
        ModelConfig.from_size("huge", vocab_size=9, latent_shape=(4, 8, 8))
    with pytest.raises(ValueError, match="widht"):
        ModelConfig.from_size("tiny", vocab_size=9, latent_shape=(4, 8, 8), widht=3)


def test_dense_backbone_parameter_names_are_unchanged():
    """Checkpoints of earlier runs keep loading: without MoT or QK-norm the backbone's names are exactly these."""
    cfg = ModelConfig.from_size("nano", vocab_size=8, latent_shape=(4, 4, 4))
    keys = [k for k in TransfusionModel(cfg).state_dict() if k.startswith("transformer.")]
    per_block = ["attn_norm.weight", "attn.wqkv.weight", "attn.wo.weight", "ffn_norm.weight", "ffn.w13.weight",
                 "ffn.w2.weight"]
    blocks = [f"transformer.blocks.{i}.{name}" for i in range(2) for name in per_block]
    assert keys == [*blocks, "transformer.norm.weight"]


def test_unet_skip_dropout_zeroes_whole_images_skips_in_training_only():
    """With ``unet_skip_dropout`` a dropped image is decoded exactly as with zero skips, a kept one as with its
    skips; in eval every image keeps its skips."""
    from lit_transfusion.patching import UNetPatcher

    torch.manual_seed(0)
    patcher = UNetPatcher(4, 8, 8, 2, 32, base_channels=32, skip_dropout=0.5)
    torch.nn.init.normal_(patcher.conv_out.weight, std=0.1)  # the model zero-initialises it; any output will do
    latents, t = torch.randn(16, 4, 8, 8), torch.randint(0, 1000, (16,))
    tokens, skips = patcher.encode(latents, t)
    hidden = torch.randn_like(tokens)
    patcher.eval()
    with_skips = patcher.decode(hidden, skips, t)
    without = patcher.decode(hidden, [torch.zeros_like(s) for s in skips], t)
    patcher.train()
    torch.manual_seed(1)
    trained = patcher.decode(hidden, skips, t)
    dropped = [torch.allclose(a, b, atol=1e-5) for a, b in zip(trained, without, strict=True)]
    kept = [torch.allclose(a, b, atol=1e-5) for a, b in zip(trained, with_skips, strict=True)]
    assert all(d != k for d, k in zip(dropped, kept, strict=True)) and 0 < sum(dropped) < 16
    with pytest.raises(ValueError, match="unet_skip_dropout"):
        UNetPatcher(4, 8, 8, 2, 32, skip_dropout=1.0)


def test_unet_readout_adds_the_linear_decoder_of_the_transformer_outputs():
    """``unet_readout``: the prediction is the up path's plus a linear map of each patch's transformer output
    (unpatchified as in the linear patcher); the model zero-initialises it with the other output layers."""
    from lit_transfusion.patching import UNetPatcher, unpatchify

    cfg = ModelConfig.from_size("nano", vocab_size=8, latent_shape=(4, 8, 8), patcher="unet", unet_readout=True)
    patcher = TransfusionModel(cfg).patcher
    assert patcher.readout is not None and not patcher.readout.weight.any() and not patcher.readout.bias.any()
    assert TransfusionModel(ModelConfig.from_size("nano", vocab_size=8, latent_shape=(4, 8, 8),
                                                  patcher="unet")).patcher.readout is None
    torch.manual_seed(0)
    patcher = UNetPatcher(4, 8, 8, 2, 32, base_channels=32, readout=True).eval()
    torch.nn.init.normal_(patcher.conv_out.weight, std=0.1)
    torch.nn.init.normal_(patcher.readout.weight, std=0.1)
    latents, t = torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,))
    tokens, skips = patcher.encode(latents, t)
    hidden = torch.randn_like(tokens)  # [3, 16, 32]
    pred = patcher.decode(hidden, skips, t)
    readout, patcher.readout = patcher.readout, None
    up_path = patcher.decode(hidden, skips, t)
    torch.testing.assert_close(pred, up_path + unpatchify(readout(hidden), 2, 4, 8, 8))
    assert (pred - up_path).abs().mean() > 1e-3
