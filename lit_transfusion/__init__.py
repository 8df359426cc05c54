"""lit_transfusion: one transformer trained on text (next-token CE) and images (latent diffusion MSE)."""

import os

# Nothing may download at run time: diffusers and huggingface_hub read this when they are imported, and every
# module of the project imports this package first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
