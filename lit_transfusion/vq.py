"""The discrete image tokenizer (diffusers ``VQModel``) of the Chameleon-style baseline: build, train, export, load.

The baseline models an image as ``<boi> c_1 .. c_{h*w} <eoi>`` with codes ``c_i`` in ``[0, codebook_size)``
(raster order). The CNN is the VAE's (``vae.build_autoencoder``: same block types and channels, factor 4), so
the comparison with the continuous latents differs only in the bottleneck. Training runs through the CLI::

    python -m lit_transfusion vq fit --config configs/shapes/vq.yaml

and ends by writing a diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) plus
``tokenizer_stats.json`` (validation PSNR, codebook usage). The baseline only uses the frozen ``CodeCodec``.

Conventions: images are float ``[N, 3, H, W]`` in ``[-1, 1]``; codes are long ``[N, H/f, W/f]`` with
``f = 2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import VQModel

from lit_transfusion.vae import ExportingAutoencoder, ModelDir, cnn_config, psnr

STATS_FILE = "tokenizer_stats.json"
BETA = 0.25  # commitment weight of the VQ-VAE paper (van den Oord et al. 2017)


# ----------------------------------------------------------------------------- model construction
def _paper_loss(vq: VQModel) -> VQModel:
    """Put β on the commitment term, as in the VQ-VAE paper.

    diffusers' ``VectorQuantizer`` defaults to ``legacy=True``, which computes
    ``mean((sg[z_q] - z)^2) + β mean((z_q - sg[z])^2)``: weight 1 on the commitment term (pulls the encoder
    output z towards its code) and β on the codebook term (pulls the code towards z), the reverse of the paper's
    ``mean((sg[z] - z_q)^2) + β mean((sg[z_q] - z)^2)``. Both read the same number in the forward pass (each term
    is the same squared distance), only the gradients differ: legacy pulls the encoder onto its codes with 4x
    the paper's weight and the codes onto the encoder outputs with a quarter of it. ``VQModel`` does not expose
    ``legacy`` in its config, so it is set on the module here, after every construction or load.
    """
    vq.quantize.legacy = False
    vq.quantize.beta = BETA
    return vq


def build_vq(
    image_size: int = 32,
    block_out_channels: tuple[int, ...] | list[int] = (32, 64, 64),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    num_vq_embeddings: int = 512,
    vq_embed_dim: int | None = None,
    norm_num_groups: int = 32,
) -> VQModel:
    """A small ``VQModel`` (3 -> 3 channels) with the VAE's CNN; codes on a grid ``2 ** (len(block_out_channels) - 1)``
    times smaller than the image (default: 32x32 -> 8x8 codes, each one of ``num_vq_embeddings``).

    ``vq_embed_dim`` (default ``latent_channels``) is the codebook vectors' width: a 1x1 conv maps the encoder's
    ``latent_channels`` to it. Narrow codebook vectors (4 numbers) keep nearest-neighbour lookup meaningful and
    more of the codebook in use than wide ones.
    """
    vq = VQModel(
        **cnn_config(image_size, block_out_channels, layers_per_block, latent_channels, norm_num_groups),
        num_vq_embeddings=num_vq_embeddings,
        vq_embed_dim=vq_embed_dim,
        scaling_factor=1.0,  # unused: the baseline consumes codes, never scaled latents
    )
    return _paper_loss(vq)


def quantize(vq: VQModel, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-quantization latents ``h [N, D, h, w]`` -> ``(z_q [N, D, h, w], quantizer loss (scalar), codes [N, h, w])``.

    ``z_q`` carries the straight-through gradient to ``h``; codes are the nearest codebook entries (L2).
    """
    z_q, loss, (_, _, idx) = vq.quantize(h)
    return z_q, loss, idx.view(h.shape[0], h.shape[2], h.shape[3])


# ----------------------------------------------------------------------------- training
class VQModule(ExportingAutoencoder):
    """Trains a ``VQModel`` on images and exports it as a diffusers directory with ``tokenizer_stats.json``.

    Loss: ``L1 + MSE`` reconstruction (as ``VAEModule``) ``+ quantizer_weight *`` the quantizer's
    ``β mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)`` (β = 0.25 on the commitment term, see ``build_vq``).

    Dead-code restart: diffusers' quantizer learns the codebook by gradient only (no EMA updates), and a code that
    no encoder output picks gets no gradient, so it stays dead for good; with the codebook initialised near 0
    (uniform in ``±1/K``) nearly every code starts dead. After the first optimizer step (a data-dependent
    initialisation) and then every ``restart_every`` steps, each code chosen by no training position since the
    last check is moved onto an encoder output of the current batch, drawn with probability proportional to its
    squared distance to its nearest code (k-means++ seeding: new codes go where the codebook fits worst, not onto
    the flat backgrounds that one code already serves). The count is logged as ``train/codes_restarted`` (at the
    latest check) and ``train/codes_restarted_total`` (the first-step initialisation included, so it starts near
    ``num_vq_embeddings``).

    Args:
        image_size: Side of the square training images (pixels).
        block_out_channels: Channels per encoder/decoder block (the VAE's); the code grid is
            ``2 ** (len(block_out_channels) - 1)`` times smaller than the image.
        layers_per_block: ResNet layers per block.
        latent_channels: Channels of the encoder output.
        num_vq_embeddings: Codebook size (the number of image tokens the baseline's vocabulary gains).
        vq_embed_dim: Width of the codebook vectors (``None``: ``latent_channels``).
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
        quantizer_weight: Weight of the quantizer loss beside the reconstruction loss.
        restart_every: Optimizer steps between dead-code restarts (0: never restart).
        lr: Peak AdamW learning rate (linear warmup, then cosine decay to 10% over the planned steps).
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay.
        export_dir: Where ``on_fit_end`` writes the diffusers directory (``None``: no export).
        stats_batches: Validation batches measured for ``tokenizer_stats.json`` at export.
    """

    def __init__(
        self,
        image_size: int = 32,
        block_out_channels: list[int] = [32, 64, 64],  # noqa: B006 (LightningCLI needs a plain default)
        layers_per_block: int = 1,
        latent_channels: int = 4,
        num_vq_embeddings: int = 512,
        vq_embed_dim: int | None = None,
        norm_num_groups: int = 32,
        quantizer_weight: float = 1.0,
        restart_every: int = 50,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
        stats_batches: int = 16,
    ) -> None:
        super().__init__()
        if restart_every < 0:
            raise ValueError(f"restart_every must be >= 0 (0: never restart), got {restart_every}")
        self.save_hyperparameters()
        self.vq = build_vq(image_size, block_out_channels, layers_per_block, latent_channels, num_vq_embeddings,
                           vq_embed_dim, norm_num_groups)
        # Code uses since the last restart check, and codes restarted so far (both kept in checkpoints).
        self.register_buffer("code_hits", torch.zeros(num_vq_embeddings, dtype=torch.long))
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.long))
        self._val_counts: torch.Tensor | None = None  # [K] code counts over the current validation epoch
        self._batch_latents: torch.Tensor | None = None  # [B*h*w, D] encoder outputs of the current batch
        self._restarted_at = -1  # global step of the last restart check

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [B, 3, H, W] -> recon and quantizer losses (scalars), codes [B, h, w], encoder outputs
        h [B, D, h, w] and the reconstruction x_hat [B, 3, H, W]."""
        h = self.vq.encode(x).latents
        z_q, quantizer_loss, codes = quantize(self.vq, h)
        x_hat = self.vq.decode(z_q, force_not_quantize=True).sample
        recon = F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)  # L1 + MSE: see VAEModule._losses
        return recon, quantizer_loss, codes, h, x_hat

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        recon, quantizer_loss, codes, h, _ = self._forward(batch)
        loss = recon + self.hparams.quantizer_weight * quantizer_loss
        self.code_hits += torch.bincount(codes.flatten(), minlength=self.code_hits.numel())
        self._batch_latents = h.detach().permute(0, 2, 3, 1).flatten(0, 2)  # [B*h*w, D]
        self.log_dict({"train/loss": loss, "train/recon": recon, "train/quantizer_loss": quantizer_loss})
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every, step = self.hparams.restart_every, self.global_step
        # Once per optimizer step: with gradient accumulation several batches end on the same global_step.
        due = every and (step % every == 0 or step == 1) and step != self._restarted_at
        if due and self._batch_latents is not None:
            self._restarted_at = step
            restarted = self.restart_dead_codes(self._batch_latents)
            self.log("train/codes_restarted", float(restarted))
            self.log("train/codes_restarted_total", self.restarts_total.float())
        self._batch_latents = None

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor) -> int:
        """Move every code with no hit since the last call onto one of ``latents`` ``[M, D]`` (encoder outputs),
        drawn with probability ∝ squared distance to the nearest code; reset the hit counts. Returns how many
        codes moved. Across processes the hits are summed and rank 0's choice is broadcast, so every replica
        keeps the same codebook."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        hits = self.code_hits if strategy is None else strategy.reduce(self.code_hits.clone(), reduce_op="sum")
        dead = (hits == 0).nonzero().flatten()
        self.code_hits.zero_()
        if dead.numel() == 0:
            return 0
        codebook = self.vq.quantize.embedding.weight
        weight = torch.cdist(latents.float(), codebook.float()).min(dim=1).values.pow(2)
        if weight.sum() <= 0:  # every output sits on a code: any choice is as good
            weight = torch.ones_like(weight)
        # Without replacement while there are enough candidates, so two restarted codes rarely coincide.
        replace = int((weight > 0).sum()) < dead.numel()
        pick = torch.multinomial(weight, dead.numel(), replacement=replace)
        new = latents[pick].to(codebook.dtype)
        if strategy is not None:
            new = strategy.broadcast(new, src=0)
        codebook[dead] = new
        self.restarts_total += dead.numel()
        return int(dead.numel())

    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(self.hparams.num_vq_embeddings, dtype=torch.long, device=self.device)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        recon, quantizer_loss, codes, _, x_hat = self._forward(batch)
        self._val_counts += torch.bincount(codes.flatten(), minlength=self._val_counts.numel())
        self.log_dict({
            "val/loss": recon + self.hparams.quantizer_weight * quantizer_loss,
            "val/recon": recon,
            "val/quantizer_loss": quantizer_loss,
        }, sync_dist=True)
        self.log("val/psnr", psnr(x_hat, batch), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        counts = self._val_counts
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        usage, perplexity = code_usage(counts)
        self.log_dict({"val/codebook_usage": usage, "val/code_perplexity": perplexity}, prog_bar=True)

    @torch.no_grad()
    def code_stats(self, loader, max_batches: int) -> dict:
        """Over up to ``max_batches`` batches: reconstruction ``psnr`` (dB, mean over batches),
        ``codebook_usage`` (fraction of codes used), ``code_perplexity`` and the number of ``images``."""
        was_training = self.vq.training
        self.vq.eval()
        counts = torch.zeros(self.hparams.num_vq_embeddings, dtype=torch.long)
        psnrs, images = [], 0
        for i, x in enumerate(loader):
            if i >= max_batches:
                break
            x = x.to(self.device)
            _, _, codes, _, x_hat = self._forward(x)
            counts += torch.bincount(codes.flatten().cpu(), minlength=counts.numel())
            psnrs.append(psnr(x_hat, x).item())
            images += x.shape[0]
        self.vq.train(was_training)
        usage, perplexity = code_usage(counts)
        return {"psnr": sum(psnrs) / max(1, len(psnrs)), "codebook_usage": usage, "code_perplexity": perplexity,
                "images": images}

    def export(self, export_dir: str | Path, loader) -> dict:
        """``save_pretrained`` into ``export_dir`` and write ``tokenizer_stats.json`` measured on ``loader``."""
        stats = self.code_stats(loader, self.hparams.stats_batches)
        stats.update(
            codebook_size=self.hparams.num_vq_embeddings,
            code_shape=[self.hparams.image_size // 2 ** (len(self.hparams.block_out_channels) - 1)] * 2,
            codes_restarted_total=int(self.restarts_total),
            steps=int(self.global_step),
        )
        self.vq.save_pretrained(str(export_dir))
        (Path(export_dir) / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        return stats

    def export_summary(self, stats: dict) -> str:
        return (f"VQ tokenizer exported to {self.hparams.export_dir}: val PSNR {stats['psnr']:.2f} dB, codebook usage "
                f"{stats['codebook_usage']:.3f} of {stats['codebook_size']}, code perplexity "
                f"{stats['code_perplexity']:.1f} ({stats['images']} images), {stats['codes_restarted_total']} "
                "codes restarted")


def code_usage(counts: torch.Tensor) -> tuple[float, float]:
    """Code counts ``[K]`` -> (fraction of the K codes used at least once, perplexity = exp(entropy) of the
    code frequencies: K for uniform use, 1 for a single code)."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    return float((counts > 0).double().mean()), float(math.exp(entropy))


# ----------------------------------------------------------------------------- frozen codec for the baseline
VQ_DIR = ModelDir("VQ tokenizer directory", "vq fit --config configs/shapes/vq.yaml", "VQModel")


def _read_config(path: str | Path) -> dict:
    cfg = VQ_DIR.read_config(path)
    if cfg.get("_class_name") != "VQModel":
        raise ValueError(
            f"{str(Path(path) / 'config.json')!r} describes a {cfg.get('_class_name')!r}, expected a 'VQModel' "
            "(a continuous VAE directory is loaded with lit_transfusion.vae.LatentCodec instead)."
        )
    return cfg


def vq_code_shape(path: str | Path, image_size: int) -> tuple[int, int]:
    """``(h, w)`` of the code grid of ``image_size`` images, read from ``config.json`` only (cheap)."""
    f = 2 ** (len(_read_config(path)["block_out_channels"]) - 1)
    return (image_size // f, image_size // f)


def vq_codebook_size(path: str | Path) -> int:
    """Number of codebook entries (the image vocabulary's size), read from ``config.json`` only (cheap)."""
    return int(_read_config(path)["num_vq_embeddings"])


class CodeCodec(torch.nn.Module):
    """Frozen ``VQModel`` that maps images ``[N, 3, H, W]`` in ``[-1, 1]`` <-> codes ``[N, H/f, W/f]`` (long)."""

    def __init__(self, vq: VQModel) -> None:
        super().__init__()
        self.vq = _paper_loss(vq).eval().requires_grad_(False)

    @classmethod
    def from_dir(cls, path: str | Path) -> CodeCodec:
        _read_config(path)
        VQ_DIR.check_weights(path)
        return cls(VQModel.from_pretrained(str(path), low_cpu_mem_usage=False))  # no `accelerate` warning

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as a diffusers directory (safetensors) that :meth:`from_dir` reads."""
        self.vq.save_pretrained(str(path), safe_serialization=True)

    def train(self, mode: bool = True) -> CodeCodec:
        return super().train(False)  # always frozen, whatever a parent module does

    @property
    def codebook_size(self) -> int:
        return int(self.vq.config.num_vq_embeddings)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vq.config.block_out_channels) - 1)

    def code_shape(self, image_size: int) -> tuple[int, int]:
        f = self.downsample_factor
        return (image_size // f, image_size // f)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``[N, 3, H, W]`` in ``[-1, 1]`` -> codes ``[N, H/f, W/f]`` (long; the nearest codebook entry)."""
        device = self.vq.quantize.embedding.weight.device
        out = [quantize(self.vq, self.vq.encode(x.to(device).float()).latents)[2] for x in images.split(batch_size)]
        return torch.cat(out).to(images.device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Codes ``[N, h, w]`` or ``[N, 1, h, w]`` (integers in ``[0, codebook_size)``) -> images
        ``[N, 3, h*f, w*f]`` in ``[-1, 1]`` (clamped)."""
        if codes.dim() == 4 and codes.shape[1] == 1:
            codes = codes[:, 0]
        if codes.dim() != 3 or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integer [N, h, w] or [N, 1, h, w], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}) (the codebook size), got "
                f"[{codes.min().item()}, {codes.max().item()}]"
            )
        weight = self.vq.quantize.embedding.weight
        out = []
        for c in codes.split(batch_size):
            z_q = weight[c.to(weight.device).long()].permute(0, 3, 1, 2)  # [n, h, w, D] -> [n, D, h, w]
            out.append(self.vq.decode(z_q, force_not_quantize=True).sample.clamp(-1, 1))
        return torch.cat(out).to(codes.device)
