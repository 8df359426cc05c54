"""VQ tokenizer: codes round-trip through the frozen codec, the quantizer loss follows the VQ-VAE paper, dead codes
are restarted, the shipped tokenizer reconstructs and uses its codebook, and ``vq fit`` exports a loadable dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import VQModel

from lit_transfusion.commands.main import main
from lit_transfusion.vae import images_to_tensor, psnr
from lit_transfusion.vq import (
    BETA,
    STATS_FILE,
    CodeCodec,
    VQModule,
    build_vq,
    code_usage,
    quantize,
    vq_code_shape,
    vq_codebook_size,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "datamodules" / "shapes" / "pretrained_vq"
SMALL = dict(block_out_channels=[16, 32, 32], norm_num_groups=8)  # the shipped CNN at half width: fast on CPU


def _renders(split: str, count: int) -> torch.Tensor:
    """``count`` shapes-world renders of ``split`` as float [count, 3, 32, 32] in [-1, 1]."""
    from datamodules.shapes.world import ShapesWorld

    world = ShapesWorld(seed=0, image_size=32)
    return images_to_tensor(np.stack([world.sample(split, i).image for i in range(count)]))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """An untrained small VQModel with 64 codes, written by ``save_pretrained``."""
    torch.manual_seed(0)
    vq = build_vq(num_vq_embeddings=64, **SMALL)
    # Spread the codebook over the encoder's output range, so random images use many codes (diffusers'
    # initialisation, uniform in ±1/64, would send nearly every position to one code).
    with torch.no_grad():
        h = vq.encode(torch.rand(8, 3, 32, 32) * 2 - 1).latents.permute(0, 2, 3, 1).flatten(0, 2)
        vq.quantize.embedding.weight.copy_(h[torch.randperm(h.shape[0])[:64]])
    path = tmp_path_factory.mktemp("vq") / "small"
    vq.save_pretrained(str(path))
    return path


def test_codes_round_trip_through_the_codec(small_dir):
    codec = CodeCodec.from_dir(small_dir)
    vq = VQModel.from_pretrained(str(small_dir), low_cpu_mem_usage=False).eval()
    assert codec.codebook_size == vq_codebook_size(small_dir) == 64
    assert codec.downsample_factor == 4 and codec.code_shape(32) == vq_code_shape(small_dir, 32) == (8, 8)

    x = torch.rand(6, 3, 32, 32) * 2 - 1
    codes = codec.encode(x, batch_size=4)
    assert codes.shape == (6, 8, 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64 and codes.unique().numel() > 8
    images = codec.decode(codes, batch_size=4)
    with torch.no_grad():
        reference = vq(x).sample.clamp(-1, 1)  # the model's own encode -> quantize -> decode
    # Not bit-exact: the forward pass adds the straight-through z + (z_q - z) where decode uses z_q itself.
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(codec.decode(codes[:, None]), images)  # [N, 1, h, w] is accepted too

    # Every codebook vector looks itself up, and decoding a code grid then encoding it again is deterministic.
    table = codec.vq.quantize.embedding.weight.T.reshape(1, -1, 8, 8)  # [1, D, 8, 8]: the 64 codes in raster order
    torch.testing.assert_close(quantize(codec.vq, table)[2], torch.arange(64).view(1, 8, 8))
    grid = torch.arange(64).view(1, 8, 8).repeat(2, 1, 1)
    torch.testing.assert_close(codec.encode(codec.decode(grid)), codec.encode(codec.decode(grid)))


def test_codec_is_frozen_and_rejects_bad_codes(small_dir):
    codec = CodeCodec.from_dir(small_dir)
    codec.train()
    assert not codec.training and not any(p.requires_grad for p in codec.parameters())
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        codec.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="integer"):
        codec.decode(torch.zeros(1, 8, 8))


def test_missing_or_wrong_directory_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_vq"
    for load in (CodeCodec.from_dir, lambda p: vq_code_shape(p, 32), vq_codebook_size):
        with pytest.raises(FileNotFoundError, match="no_such_vq") as info:
            load(missing)
        assert "vq fit --config configs/shapes/vq.yaml" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CodeCodec.from_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match="AutoencoderKL"):
        vq_codebook_size(ROOT / "datamodules" / "shapes" / "pretrained_vae")


def test_quantizer_puts_beta_on_the_commitment_term(small_dir):
    """Two codes, two positions: value (1 + β)·MSE; the encoder's gradient carries β, the codebook's does not."""
    for vq in (build_vq(num_vq_embeddings=2, latent_channels=2, **SMALL),
               CodeCodec.from_dir(small_dir).vq):  # a loaded model gets the paper's weighting too
        assert vq.quantize.legacy is False and vq.quantize.beta == BETA == 0.25
    quantizer = build_vq(num_vq_embeddings=2, latent_channels=2, **SMALL).quantize
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z_near = torch.tensor([[0.2, 0.1], [0.9, 1.3]])  # nearest codes 0 and 1
    mse = ((0.2**2 + 0.1**2) + (0.1**2 + 0.3**2)) / 4  # mean over 2 positions x 2 channels = 0.0375

    def run(legacy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantizer.legacy = legacy
        quantizer.embedding.weight.data.copy_(e)
        quantizer.embedding.weight.grad = None
        z = z_near.T.reshape(1, 2, 1, 2).clone().requires_grad_(True)  # [N=1, D=2, h=1, w=2]
        _, loss, (_, _, idx) = quantizer(z)
        assert idx.flatten().tolist() == [0, 1]
        loss.backward()
        return loss.detach(), z.grad.reshape(2, 2).T, quantizer.embedding.weight.grad.clone()

    loss, z_grad, e_grad = run(legacy=False)
    assert loss.item() == pytest.approx((1 + 0.25) * mse, rel=1e-6)
    diff = z_near - e  # z - z_q per position [2, D]
    torch.testing.assert_close(z_grad, 0.25 * 2 * diff / 4)  # commitment: β · d/dz mean((z - sg[z_q])^2)
    torch.testing.assert_close(e_grad, -2 * diff / 4)  # codebook: weight 1, d/de mean((e - sg[z])^2)
    # diffusers' default (legacy=True) reads the same value but swaps the weights of the two gradients.
    legacy_loss, legacy_z_grad, legacy_e_grad = run(legacy=True)
    assert legacy_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(legacy_z_grad, 2 * diff / 4)
    torch.testing.assert_close(legacy_e_grad, -0.25 * 2 * diff / 4)


def test_dead_code_restart_moves_an_unreachable_code_onto_an_encoder_output():
    torch.manual_seed(0)
    module = VQModule(num_vq_embeddings=8, restart_every=1, **SMALL)
    codebook = module.vq.quantize.embedding.weight
    with torch.no_grad():
        h = module.vq.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latents  # [2, 4, 8, 8]
        latents = h.permute(0, 2, 3, 1).flatten(0, 2)  # [128, 4]
        codebook.copy_(latents[:8])
        codebook[7] = 100.0  # far from every encoder output: no position will ever pick it
    codes = quantize(module.vq, h)[2]
    assert 7 not in codes
    module.code_hits += torch.bincount(codes.flatten(), minlength=8)
    dead = set(range(8)) - set(codes.unique().tolist())
    before = codebook.detach().clone()

    assert module.restart_dead_codes(latents) == len(dead) == int(module.restarts_total)
    after = codebook.detach()
    for k in range(8):
        if k in dead:  # now exactly one of the current encoder outputs
            assert (after[k] == latents).all(dim=1).any(), k
        else:
            torch.testing.assert_close(after[k], before[k])
    assert (module.code_hits == 0).all()
    # Only outputs the codebook fits badly are candidates: with every output but one sitting on a code, the dead
    # code must land on that one.
    with torch.no_grad():
        codebook[7] = 100.0
        lone = torch.tensor([[5.0, -5.0, 5.0, -5.0]])
    module.code_hits[:7] = 1
    assert module.restart_dead_codes(torch.cat([codebook[:7].detach(), lone])) == 1
    torch.testing.assert_close(codebook[7].detach(), lone[0])


def test_code_usage_counts_and_perplexity():
    assert code_usage(torch.tensor([5, 5, 0, 0])) == pytest.approx((0.5, 2.0))
    assert code_usage(torch.tensor([1, 1, 1, 1])) == pytest.approx((1.0, 4.0))
    assert code_usage(torch.tensor([3, 0, 0, 0])) == pytest.approx((0.25, 1.0))


def test_shipped_tokenizer_reconstructs_and_uses_its_codebook():
    stats = json.loads((SHIPPED / STATS_FILE).read_text())
    codec = CodeCodec.from_dir(SHIPPED)
    assert stats["codebook_size"] == codec.codebook_size and stats["code_shape"] == [8, 8]
    x = _renders("val", 256)
    codes = codec.encode(x)
    assert codes.shape == (256, 8, 8)
    # Measured on the 512 val images at export (stats["psnr"]); 3 dB of slack, far above an untrained model.
    assert psnr(codec.decode(codes[:64]), x[:64]).item() >= stats["psnr"] - 3.0
    usage, _ = code_usage(torch.bincount(codes.flatten(), minlength=codec.codebook_size))
    assert usage >= 0.5 * stats["codebook_usage"]
    # Decoding then encoding again gives back many of the same codes (measured 57%; chance is < 1%): several
    # codes draw nearly the same flat background, so exact idempotence is not expected.
    again = codec.encode(codec.decode(codes[:64]))
    assert (again == codes[:64]).float().mean() >= 0.4
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 4.5 * 2**20


def test_vq_fit_through_the_cli_exports_a_loadable_directory(tmp_path):
    export = tmp_path / "vq"
    main([
        "vq", "fit", "--config", str(ROOT / "configs" / "shapes" / "vq.yaml"),
        "--model.init_args.block_out_channels=[16, 32, 32]", "--model.init_args.norm_num_groups=8",
        "--model.init_args.num_vq_embeddings=32", "--model.init_args.restart_every=1",
        f"--model.init_args.export_dir={export}", "--model.init_args.stats_batches=1",
        "--data.init_args.num_train=32", "--data.init_args.num_val=8", "--data.init_args.batch_size=8",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    stats = json.loads((export / STATS_FILE).read_text())
    assert stats["steps"] == 2 and stats["images"] == 8 and stats["codebook_size"] == 32
    assert 0 < stats["codebook_usage"] <= 1 and 1 <= stats["code_perplexity"] <= 32
    assert stats["codes_restarted_total"] > 0  # diffusers' near-zero initial codebook leaves codes dead at first
    codec = CodeCodec.from_dir(export)
    x = _renders("test", 4)
    assert codec.encode(x).shape == (4, 8, 8) and codec.decode(codec.encode(x)).shape == x.shape
