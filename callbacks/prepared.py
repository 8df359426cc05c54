"""PreparedEvaluation: the evaluation core (``callbacks/core.py``) for prepared data (your own images and text,
``PreparedDataModule``), with its prompt list plugged in.

The core's ``{stage}/ppl_text``, ``{stage}/ppl_caption`` (each skipped when the data has none), ``{stage}/fid`` and
``{stage}/kid`` (images generated from held-out captions against the held-out images themselves; Inception-v3 from a
local weights file, or the shapes feature net; skipped without either; ``{stage}/fid_n`` images, more at the final
evaluation), the captions of held-out images beside their
references (no score: free-form user captions have no scorer) and a sample grid of the configured prompts (or the
first held-out captions). It reads only ``lit_transfusion.data.MixedModalData``, so it runs on any datamodule.
"""

from __future__ import annotations

from jsonargparse.typing import NonNegativeInt, PositiveInt

from callbacks.core import EvaluationCore
from lit_transfusion.data import MixedModalData
from lit_transfusion.generation import SamplingConfig


class PreparedEvaluation(EvaluationCore):
    """Sample grid, perplexity, FID and captions of held-out images for ``PreparedDataModule`` runs.

    Args:
        every_n_evals: evaluate at every n-th validation (0: only in ``test``).
        prompts: the grid's prompts, one row each; None or empty: the first ``grid_rows`` held-out captions.
        grid_rows: rows of the grid when it shows held-out captions.
        grid_images: samples per grid prompt.
        fid_images: held-out captions to generate from, and held-out images forming FID's real set (0: no FID).
        final_fid_images: the same at the final evaluation (``test``, ``validate``, the last validation of ``fit``;
            0: ``fid_images``); fewer when the held-out split has fewer.
        kid_subsets: KID's subsets (see ``EvaluationCore``).
        fid_feature: "inception" (the standard FID network; needs ``inception_weights``, and without them FID is
            skipped with a warning) or "shapes" (the shipped shapes-world feature net, for shapes-like images).
        inception_weights: path to FID Inception-v3 weights (nothing is downloaded).
        num_captions: held-out images to caption (0: none).
        ppl_documents: held-out documents of each kind for ``ppl_text`` / ``ppl_caption`` (0: no perplexity).
        batch_size: rows per sampling call, bounding the memory of generation (guidance doubles it).
        sampling: how images and captions are sampled (``SamplingConfig``; default DDIM-25).
    """

    def __init__(
        self,
        every_n_evals: NonNegativeInt = 1,
        prompts: list[str] | None = None,
        grid_rows: PositiveInt = 6,
        grid_images: PositiveInt = 4,
        fid_images: NonNegativeInt = 64,
        final_fid_images: NonNegativeInt = 384,
        kid_subsets: PositiveInt = 100,
        fid_feature: str = "inception",
        inception_weights: str | None = None,
        num_captions: NonNegativeInt = 16,
        ppl_documents: NonNegativeInt = 64,
        batch_size: PositiveInt = 32,
        sampling: SamplingConfig | None = None,
    ):
        # Most users have no Inception weights file: FID is then skipped (warned once), not an error.
        super().__init__(every_n_evals, fid_images=fid_images, final_fid_images=final_fid_images,
                         kid_subsets=kid_subsets, fid_feature=fid_feature,
                         inception_weights=inception_weights, num_captions=num_captions, ppl_documents=ppl_documents,
                         grid_images=grid_images, batch_size=batch_size, sampling=sampling)
        self.prompts, self.grid_rows = list(prompts or []), grid_rows

    def fid_prompts(self, dm: MixedModalData, split: str, n: int | None = None) -> list[str]:
        # No generation for a FID that will not be computed.
        return [] if self._fid_off else dm.heldout_captions(split, n or self.fid_images)

    def grid_prompts(self, dm: MixedModalData, split: str) -> list[str]:
        return self.prompts or dm.heldout_captions(split, self.grid_rows)
