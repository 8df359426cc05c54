"""lit_transfusion: one transformer trained on text (next-token CE) and images (latent diffusion MSE)."""

__version__ = "0.1.0"
