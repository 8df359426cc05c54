"""MixedModalData: what training, evaluation and ``sample`` need from a datamodule, as one typed Protocol.

Both datamodules implement it (``datamodules.shapes.ShapesDataModule``, ``datamodules.files.PreparedDataModule``);
the method layer (this package) depends on this Protocol, never on ``datamodules/``. Nothing probes a datamodule
for optional parts: what is here is there.

Who reads what:

- the CLI links ``vocab_size``, ``special_ids`` and ``latent_shape`` into the model;
- ``MixedModalModule.setup`` takes ``image_codec`` (loaded on first use of ``module.codec``);
- ``sample`` rebuilds the run's datamodule for ``tokenizer``, ``image_codec`` and ``image_size``;
- the evaluation core (``callbacks/core.py``) reads the rest: documents for perplexity, held-out images and
  captions for FID, captioning and the sample grid.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from lit_transfusion.batch import Document
from lit_transfusion.tokenizer import TextTokenizer


class MixedModalData(Protocol):
    """A datamodule of packed text + image documents (see the module docstring)."""

    @property
    def tokenizer(self) -> TextTokenizer: ...

    @property
    def vocab_size(self) -> int:
        """Text ids (+ image codes for a discrete-token representation)."""

    @property
    def special_ids(self) -> dict[str, int]:
        """<pad> <bos> <eos> <boi> <eoi> (+ ``first_code``)."""

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of an image latent, or (1, h, w) of a code grid."""

    @property
    def image_size(self) -> int:
        """Side of the (square) images in pixels."""

    @property
    def seq_len(self) -> int:
        """Positions per packed row."""

    @property
    def patch_size(self) -> int:
        """Latent patch side the documents are packed with."""

    @property
    def patches_per_image(self) -> int:
        """Positions of one image between ``<boi>`` and ``<eoi>``."""

    def image_codec(self) -> torch.nn.Module:
        """The frozen codec between pixels and this data's images (``LatentCodec`` or ``CodeCodec``); loads it."""

    def evaluation_split(self, stage: str) -> str:
        """The split evaluated at ``stage`` ("val" or "test")."""

    def cond_gap_pairs(self, split: str) -> list[tuple[Document, Document]]:
        """(true caption, shifted caption) caption -> image documents (``batch.shifted_caption_pairs``)."""

    def caption_documents(self, split: str, n: int) -> list[Document]:
        """Up to ``n`` held-out caption -> image documents, images clean."""

    def text_documents(self, split: str, n: int) -> list[Document]:
        """Up to ``n`` held-out text (or interleaved) documents, images clean."""

    def heldout_images(self, split: str, n: int) -> np.ndarray:
        """uint8 [n', H, W, 3], n' <= n: the pixels of the images of ``caption_documents(split, n)``."""

    def heldout_captions(self, split: str, n: int) -> list[str]:
        """The caption text of each image of ``heldout_images(split, n)``."""


class PackingFromHparams:
    """Datamodule mixin: ``seq_len`` and ``patch_size`` of :class:`MixedModalData` read from the datamodule's own
    settings (``self.hparams``, saved by ``save_hyperparameters``)."""

    @property
    def seq_len(self) -> int:
        return self.hparams.seq_len

    @property
    def patch_size(self) -> int:
        return self.hparams.patch_size
