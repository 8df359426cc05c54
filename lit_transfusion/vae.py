"""The image autoencoder (diffusers ``AutoencoderKL``): build, train in-project, export, load, encode/decode.

Training (``VAEModule``) runs through the normal CLI::

    python -m lit_transfusion vae fit --config configs/shapes/vae.yaml

and ends by writing a diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``) whose
config carries ``shift_factor`` / ``scaling_factor`` so that standardized latents have mean ≈ 0, std ≈ 1.
The Transfusion side only ever uses the frozen ``LatentCodec`` loaded from such a directory.

Conventions: images are float ``[N, 3, H, W]`` in ``[-1, 1]``; latents are ``[N, C, H/f, W/f]`` with
``f = 2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from lightning.pytorch import LightningModule

from lit_transfusion.images import images_to_tensor, tensor_to_images  # noqa: F401 (their former home)
from lit_transfusion.schedule import WarmupCosine, training_timer

_CONFIG = "config.json"
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# ----------------------------------------------------------------------------- metrics
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR (dB) of ``[N, 3, H, W]`` tensors in ``[-1, 1]``, measured on the ``[0, 1]`` range."""
    mse01 = ((x.clamp(-1, 1) - y) / 2).pow(2).flatten(1).mean(1)  # /2 maps a [-1,1] difference to [0,1]
    return (10 * torch.log10(1.0 / mse01.clamp_min(1e-10))).mean()


# ----------------------------------------------------------------------------- model construction
def cnn_config(image_size: int, block_out_channels, layers_per_block: int, latent_channels: int,
               norm_num_groups: int) -> dict:
    """The diffusers settings of the encoder/decoder CNN that the VAE and the VQ tokenizer (``vq.build_vq``) share:
    3 -> 3 channels, one down/up block per entry of ``block_out_channels`` (downsampling ``2 ** (n - 1)``)."""
    n = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
    )


def build_autoencoder(
    image_size: int = 32,
    block_out_channels: tuple[int, ...] | list[int] = (32, 64, 64),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int = 32,
) -> AutoencoderKL:
    """A small ``AutoencoderKL`` (3 -> 3 channels) that downsamples by ``2 ** (len(block_out_channels) - 1)``.

    The default (32, 64, 64) maps 32x32 images to 8x8x4 latents with ≈0.9M parameters.
    """
    return AutoencoderKL(
        **cnn_config(image_size, block_out_channels, layers_per_block, latent_channels, norm_num_groups),
        # Placeholders until training measures the latent statistics (see VAEModule.export).
        scaling_factor=1.0,
        shift_factor=0.0,
    )


# ----------------------------------------------------------------------------- training
class ExportingAutoencoder(LightningModule):
    """What the project's autoencoder trainers (``VAEModule``, ``vq.VQModule``) share: AdamW with a linear warmup and a
    cosine to 10 % over the planned steps or the time budget, and at the end of ``fit`` (rank 0) :meth:`export` to
    ``hparams.export_dir`` with a one-line summary. Subclasses implement ``export(export_dir, loader) -> stats`` and
    ``export_summary(stats) -> str``; their hparams hold ``lr``, ``weight_decay``, ``warmup_steps``, ``export_dir``."""

    def export(self, export_dir: str | Path, loader) -> dict:
        raise NotImplementedError

    def export_summary(self, stats: dict) -> str:
        raise NotImplementedError

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        timer = training_timer(self.trainer) if self._trainer is not None else None
        schedule = WarmupCosine(max(1, self.hparams.warmup_steps), total, floor=0.1, time_budget=timer)
        factor = lambda step: schedule(step)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        dm = self.trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else self.trainer.val_dataloaders
        print(self.export_summary(self.export(self.hparams.export_dir, loader)))


class VAEModule(ExportingAutoencoder):
    """Trains an ``AutoencoderKL`` on images and exports it as a diffusers directory with latent scaling.

    Args:
        image_size: Side of the square training images (pixels).
        block_out_channels: Channels per encoder/decoder block; the spatial downsampling factor is
            ``2 ** (len(block_out_channels) - 1)``.
        layers_per_block: ResNet layers per block.
        latent_channels: Channels of the latent image.
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
        kl_weight: Weight of the KL(posterior || N(0, I)) term; tiny, so the latent is nearly deterministic
            and its scale is fixed afterwards by ``scaling_factor`` rather than by the prior.
        lr: Peak AdamW learning rate (linear warmup, then cosine decay to 10% over the planned steps).
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay.
        export_dir: Where ``on_fit_end`` writes the diffusers directory (``None``: no export).
        stats_batches: Validation batches used to estimate the latent mean/std written into the config.
    """

    def __init__(
        self,
        image_size: int = 32,
        block_out_channels: list[int] = [32, 64, 64],  # noqa: B006 (LightningCLI needs a plain default)
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        kl_weight: float = 1e-6,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
        stats_batches: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = build_autoencoder(image_size, block_out_channels, layers_per_block, latent_channels, norm_num_groups)

    def _losses(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, ...]:
        """x: [B, 3, H, W] -> (loss, recon, kl) scalars and the reconstruction x_hat [B, 3, H, W]."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        x_hat = self.vae.decode(z).sample
        # L1 + MSE: MSE is what PSNR measures, but its gradient vanishes as errors shrink; L1 keeps pushing
        # small residuals (flat colour regions, sharp shape edges) towards zero, which trains faster here.
        recon = F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)
        kl = posterior.kl().mean() / x[0].numel()  # per-pixel scale, so kl_weight is resolution independent
        return recon + self.hparams.kl_weight * kl, recon, kl, x_hat

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, recon, kl, _ = self._losses(batch, sample=True)
        self.log_dict({"train/loss": loss, "train/recon": recon, "train/kl": kl}, prog_bar=False)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, _, _, x_hat = self._losses(batch, sample=False)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/psnr", psnr(x_hat, batch), prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def latent_stats(self, loader, max_batches: int) -> dict:
        """Posterior-mean statistics over up to ``max_batches`` batches: overall ``mean``/``std`` (floats),
        per-channel ``channel_mean``/``channel_std`` (lists of C floats) and the reconstruction ``psnr``."""
        was_training = self.vae.training
        self.vae.eval()
        zs, psnrs = [], []
        for i, x in enumerate(loader):
            if i >= max_batches:
                break
            x = x.to(self.device)
            z = self.vae.encode(x).latent_dist.mode()
            zs.append(z.double().transpose(0, 1).flatten(1))  # [C, B*h*w]
            psnrs.append(psnr(self.vae.decode(z).sample, x).item())
        self.vae.train(was_training)
        z = torch.cat(zs, dim=1)
        return {
            "mean": z.mean().item(), "std": z.std().item(),
            "channel_mean": z.mean(1).tolist(), "channel_std": z.std(1).tolist(),
            "psnr": float(np.mean(psnrs)),
        }

    def export(self, export_dir: str | Path, loader) -> dict:
        """Measure latent statistics on ``loader``, store them in the config and ``save_pretrained``.

        Both diffusers conventions are written: the scalar ``shift_factor``/``scaling_factor`` and the
        per-channel ``latents_mean``/``latents_std``; ``LatentCodec`` prefers the per-channel ones, because
        the channels of a small VAE differ a lot in scale (here ~0.6x to ~2.5x of the overall std) and
        diffusion assumes every channel has unit variance (same signal-to-noise ratio at a given t).
        """
        stats = self.latent_stats(loader, self.hparams.stats_batches)
        self.vae.register_to_config(
            shift_factor=stats["mean"], scaling_factor=1.0 / stats["std"],
            latents_mean=stats["channel_mean"], latents_std=stats["channel_std"],
        )
        self.vae.save_pretrained(str(export_dir))
        return stats

    def export_summary(self, stats: dict) -> str:
        return (f"VAE exported to {self.hparams.export_dir}: val PSNR {stats['psnr']:.2f} dB, latent mean "
                f"{stats['mean']:.4f}, std {stats['std']:.4f}, "
                f"per-channel std {[round(v, 3) for v in stats['channel_std']]}")



# ----------------------------------------------------------------------------- frozen codec for Transfusion
@dataclass(frozen=True)
class ModelDir:
    """A kind of diffusers model directory a frozen codec loads (this VAE, ``vq.py``'s tokenizer): its name in error
    messages, the project command that writes one, and its diffusers class."""

    name: str
    command: str
    diffusers_class: str

    def missing(self, path: Path, what: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.name} {str(path)!r} {what}. Expected a directory written by `python -m lit_transfusion "
            f"{self.command}` (or any diffusers {self.diffusers_class} directory with config.json and "
            f"{_WEIGHTS[0]})."
        )

    def read_config(self, path: str | Path) -> dict:
        """``config.json`` of the directory (a clear FileNotFoundError when it or the file is missing)."""
        path = Path(path)
        if not path.is_dir():
            raise self.missing(path, "does not exist")
        if not (path / _CONFIG).is_file():
            raise self.missing(path, f"has no {_CONFIG}")
        return json.loads((path / _CONFIG).read_text())

    def check_weights(self, path: str | Path) -> None:
        path = Path(path)
        self.read_config(path)
        if not any((path / w).is_file() for w in _WEIGHTS):
            raise self.missing(path, f"has no weights ({_WEIGHTS[0]})")


VAE_DIR = ModelDir("VAE directory", "vae fit --config configs/shapes/vae.yaml", "AutoencoderKL")


def vae_latent_shape(path: str | Path, image_size: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latents of ``image_size`` images, read from ``config.json`` only (cheap)."""
    cfg = VAE_DIR.read_config(path)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    return (int(cfg["latent_channels"]), image_size // f, image_size // f)


class LatentCodec(torch.nn.Module):
    """Frozen ``AutoencoderKL`` that maps images <-> standardized latents (mean ≈ 0, std ≈ 1)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        C = int(cfg.latent_channels)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            shift, std = torch.tensor(cfg.latents_mean), torch.tensor(cfg.latents_std)  # per channel
        else:  # scalar convention; generic diffusers VAEs may have no shift
            shift = torch.full((C,), float(cfg.shift_factor or 0.0))
            std = torch.full((C,), 1.0 / float(cfg.scaling_factor))
        self.register_buffer("shift", shift.float().view(1, C, 1, 1), persistent=False)
        self.register_buffer("scale", (1.0 / std).float().view(1, C, 1, 1), persistent=False)

    @classmethod
    def from_dir(cls, path: str | Path) -> LatentCodec:
        VAE_DIR.check_weights(path)
        return cls(AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False))  # no `accelerate` warning

    def save(self, path: str | Path) -> None:
        """Write the autoencoder as a diffusers directory (safetensors) that :meth:`from_dir` reads."""
        self.vae.save_pretrained(str(path), safe_serialization=True)

    def train(self, mode: bool = True) -> LatentCodec:
        return super().train(False)  # always frozen: GroupNorm has no running stats, but keep eval semantics

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.downsample_factor
        return (self.latent_channels, image_size // f, image_size // f)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``[N, 3, H, W]`` in ``[-1, 1]`` -> standardized posterior means ``[N, C, H/f, W/f]``."""
        device = next(self.vae.parameters()).device
        out = [
            (self.vae.encode(x.to(device).float()).latent_dist.mode() - self.shift) * self.scale
            for x in images.split(batch_size)
        ]
        return torch.cat(out).to(images.device)

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 3, H, W]`` in ``[-1, 1]`` -> the posterior in standardized units: ``(mean, logvar)``, each
        ``[N, C, H/f, W/f]`` (a sample is ``mean + exp(logvar / 2) * noise``, already mean ≈ 0, std ≈ 1)."""
        device = next(self.vae.parameters()).device
        means, logvars = [], []
        for x in images.split(batch_size):
            dist = self.vae.encode(x.to(device).float()).latent_dist
            means.append((dist.mean - self.shift) * self.scale)
            logvars.append(dist.logvar + 2 * torch.log(self.scale))  # Var(a z) = a^2 Var(z)
        return torch.cat(means).to(images.device), torch.cat(logvars).to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Standardized latents ``[N, C, h, w]`` -> images ``[N, 3, h*f, w*f]`` in ``[-1, 1]``."""
        device = next(self.vae.parameters()).device
        out = [
            self.vae.decode(z.to(device).float() / self.scale + self.shift).sample.clamp(-1, 1)
            for z in latents.split(batch_size)
        ]
        return torch.cat(out).to(latents.device)
