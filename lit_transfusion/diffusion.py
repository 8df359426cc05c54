"""A thin layer over diffusers schedulers: training noise with one timestep per image, the regression target
of each objective, and fresh sampling schedulers (they keep state between steps, so one per call).

Objectives (what the image head predicts); t ~ U{0..t_max-1} per image in every case:

- ``epsilon`` (the paper): x_t = sqrt(ā_t)·x0 + sqrt(1-ā_t)·ε on the DDPM cosine schedule (T = 1000); target ε.
- ``v_prediction``: the same x_t; target v = sqrt(ā_t)·ε - sqrt(1-ā_t)·x0 (diffusers' ``get_velocity``).
- ``flow`` (rectified flow): x_s = (1-s)·x0 + s·ε with s = t/T; target the velocity ε - x0. The model's
  timestep input is t = s·T in training and the flow sampler's σ·T in sampling: one scale, so the patchers'
  (continuous, sinusoidal) t-embedding sees the same numbers in both.

``clip_sample=False`` everywhere: diffusers' DDPM/DDIM default clamps x0 to [-1, 1], which destroys
standardized latents (std 1, so ~5 % of values lie outside).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

SAMPLERS = ("ddpm", "ddim", "dpm++")
OBJECTIVES = ("epsilon", "v_prediction", "flow")


class FlowMatchEuler(FlowMatchEulerDiscreteScheduler):
    """diffusers' rectified-flow Euler sampler with the two members the DDPM-family samplers share, so one
    loop drives them all: the initial sample is plain N(0, 1) noise (σ_max = 1) and the model input is the
    sample itself (no input scaling)."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample: Tensor, timestep: Tensor | None = None) -> Tensor:
        return sample


class Diffusion(nn.Module):
    """The training process (the paper's: T=1000, cosine schedule, epsilon prediction) and its samplers.

    Args:
        num_train_timesteps: T.
        beta_schedule: a diffusers schedule name; "squaredcos_cap_v2" is the cosine schedule (ε and v).
        objective: "epsilon", "v_prediction" or "flow" (see the module docstring).
    """

    def __init__(
        self, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2", objective: str = "epsilon"
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: expected one of {', '.join(map(repr, OBJECTIVES))}")
        self.objective = objective
        self.config = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type="epsilon" if objective == "flow" else objective,
            clip_sample=False,
        )
        self.train_scheduler = DDPMScheduler(**self.config)
        # A buffer so it follows the module to the device; indexed per image below because a packed batch
        # has one t per image (diffusers' add_noise wants a [B] t matching a [B, ...] sample). Not persistent:
        # it is a function of the config, and checkpoints hold no copy of it.
        self.register_buffer("alphas_cumprod", self.train_scheduler.alphas_cumprod.clone().float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    def sample_timesteps(self, t_max: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U{0, ..., t_max-1} independently per image. t_max: [N] long -> t: [N] long."""
        u = torch.rand(t_max.shape, generator=generator, device=t_max.device)  # generator on t_max's device
        return (u * t_max.clamp(max=self.num_train_timesteps)).long()

    def loss_weights(self, t: Tensor, snr_gamma: float | None) -> Tensor:
        """[N] per-image weights of the objective's MSE: 1 (the paper's plain loss), or Min-SNR-γ, which caps
        the weight of nearly clean images (SNR_t = ā_t / (1 - ā_t)): min(SNR_t, γ) / SNR_t on the ε-MSE, and
        its v-form min(SNR_t, γ) / (SNR_t + 1) on the v-MSE (the same weight per unit of ε-MSE, since
        ‖v - v̂‖² = (SNR_t + 1)/SNR_t · ‖ε - ε̂‖²). Not defined for ``flow`` (no ā_t schedule)."""
        if snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        if self.objective == "flow":
            raise ValueError("snr_gamma: Min-SNR-γ weighting is defined for the epsilon / v_prediction schedule, "
                             "not for objective='flow'")
        a = self.alphas_cumprod[t]
        snr = a / (1 - a)
        return snr.clamp(max=snr_gamma) / (snr if self.objective == "epsilon" else snr + 1)

    def importance_timesteps(
        self, t_max: Tensor, snr_gamma: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Min-SNR-γ by importance sampling instead of weighting: images whose t may span the whole range
        (``t_max >= T``) draw t with probability ∝ w(t) (:meth:`loss_weights`) and all weigh the mean weight
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

    def _per_image(self, values: Tensor, like: Tensor) -> Tensor:
        """[N] -> [N, 1, 1, 1] (as many singleton dims as ``like`` has beyond the first) in ``like``'s dtype."""
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The model's input for x0, noise [N, C, h, w] and t [N]: sqrt(ā_t)·x0 + sqrt(1-ā_t)·ε (ε, v),
        or (1-s)·x0 + s·ε with s = t/T (flow)."""
        if self.objective == "flow":
            s = self._per_image(t.float() / self.num_train_timesteps, x0)
            return (1 - s) * x0 + s * noise
        a = self._per_image(self.alphas_cumprod[t], x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model should output for the input ``add_noise(x0, noise, t)``: ε, v = sqrt(ā_t)·ε -
        sqrt(1-ā_t)·x0, or the velocity ε - x0 (flow). x0, noise [N, C, h, w], t [N] -> [N, C, h, w]."""
        if self.objective == "epsilon":
            return noise
        if self.objective == "flow":
            return noise - x0
        a = self._per_image(self.alphas_cumprod[t], x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def sampler(self, name: str = "ddpm", steps: int = 250):
        """A fresh sampling scheduler with ``steps`` inference steps set. name: one of ``SAMPLERS`` (ε and v:
        built with the objective's ``prediction_type``); for ``flow`` always :class:`FlowMatchEuler` (shift
        1), whatever the name. Its timesteps are in t units: integers for ε and v, σ·T floats for flow."""
        if name not in SAMPLERS:
            raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(SAMPLERS)}")
        if self.objective == "flow":
            s = FlowMatchEuler(num_train_timesteps=self.num_train_timesteps, shift=1.0)
        elif name == "ddpm":
            s = DDPMScheduler(**self.config)
        elif name == "ddim":
            s = DDIMScheduler(**self.config, set_alpha_to_one=True)
        else:
            cfg = {k: v for k, v in self.config.items() if k != "clip_sample"}
            s = DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
        s.set_timesteps(steps)
        return s

    def sample(
        self,
        predict: Callable[[Tensor, Tensor], Tensor],
        shape: tuple[int, ...],
        name: str = "ddpm",
        steps: int = 250,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The denoising loop: from seeded noise of ``shape`` [B, C, h, w] to clean latents [B, C, h, w].

        ``predict(x, t)`` gets the scaled sample [B, C, h, w] and the step's timestep (a 0-d tensor in t
        units, the scale training feeds the model: long for ε and v, σ·T float for flow) and returns the
        model's output for it (ε, v or velocity, guidance already applied).
        """
        sched = self.sampler(name, steps)
        x = torch.randn(shape, generator=generator, device=device) * sched.init_noise_sigma
        for step_t in sched.timesteps:
            out = predict(sched.scale_model_input(x, step_t), step_t)
            x = sched.step(out, step_t, x, generator=generator).prev_sample
        return x
