"""A thin layer over diffusers schedulers: training noise with one timestep per image, and fresh sampling
schedulers (they keep state between steps, so one per call).

``clip_sample=False`` everywhere: diffusers' DDPM/DDIM default clamps x0 to [-1, 1], which destroys
standardized latents (std 1, so ~5 % of values lie outside).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn

SAMPLERS = ("ddpm", "ddim", "dpm++")


class Diffusion(nn.Module):
    """DDPM training process (the paper's: T=1000, cosine schedule, epsilon prediction).

    Args:
        num_train_timesteps: T.
        beta_schedule: a diffusers schedule name; "squaredcos_cap_v2" is the cosine schedule.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"):
        super().__init__()
        self.config = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type="epsilon",
            clip_sample=False,
        )
        self.train_scheduler = DDPMScheduler(**self.config)
        # A buffer so it follows the module to the device; indexed per image below because a packed batch
        # has one t per image (diffusers' add_noise wants a [B] t matching a [B, ...] sample).
        self.register_buffer("alphas_cumprod", self.train_scheduler.alphas_cumprod.clone().float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    def sample_timesteps(self, t_max: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U{0, ..., t_max-1} independently per image. t_max: [N] long -> t: [N] long."""
        u = torch.rand(t_max.shape, generator=generator, device=t_max.device)  # generator on t_max's device
        return (u * t_max.clamp(max=self.num_train_timesteps)).long()

    def loss_weights(self, t: Tensor, snr_gamma: float | None) -> Tensor:
        """[N] per-image weights of the noise MSE: 1 (the paper's plain loss), or Min-SNR-γ's
        min(SNR_t, γ) / SNR_t, which caps the weight of nearly clean images (SNR_t = ā_t / (1 - ā_t))."""
        if snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        a = self.alphas_cumprod[t]
        snr = a / (1 - a)
        return snr.clamp(max=snr_gamma) / snr

    def importance_timesteps(
        self, t_max: Tensor, snr_gamma: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Min-SNR-γ by importance sampling instead of weighting: images whose t may span the whole range
        (``t_max >= T``) draw t with probability ∝ w(t) = min(SNR_t, γ) / SNR_t and all weigh the mean weight
        w̄; the others (noise-limited) draw t uniformly and weigh w(t). Either way E[weight · f(t)] equals
        uniform t with weights w(t) for any per-image loss f, so the expected loss is unchanged, but no
        compute goes to nearly clean images whose weight is close to 0 (for γ = 1 on the cosine schedule
        uniform t wastes ~30 % of the effective sample size).

        t_max: [N] long -> (t [N] long, weights [N] float).
        """
        T = self.num_train_timesteps
        w_all = self.loss_weights(torch.arange(T, device=t_max.device), snr_gamma)  # [T]
        full = t_max >= T
        t = self.sample_timesteps(t_max, generator)
        weights = self.loss_weights(t, snr_gamma)
        n_full = int(full.sum())
        if n_full:
            drawn = torch.multinomial(w_all, n_full, replacement=True, generator=generator)
            t = t.masked_scatter(full, drawn)
            weights = weights.masked_fill(full, w_all.mean())
        return t, weights

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(ā_t)·x0 + sqrt(1-ā_t)·ε for x0, noise [N, C, h, w] and t [N]."""
        a = self.alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def sampler(self, name: str = "ddpm", steps: int = 250):
        """A fresh sampling scheduler with ``steps`` inference steps set. name: one of ``SAMPLERS``."""
        if name == "ddpm":
            s = DDPMScheduler(**self.config)
        elif name == "ddim":
            s = DDIMScheduler(**self.config, set_alpha_to_one=True)
        elif name == "dpm++":
            cfg = {k: v for k, v in self.config.items() if k != "clip_sample"}
            s = DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
        else:
            raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(SAMPLERS)}")
        s.set_timesteps(steps)
        return s
