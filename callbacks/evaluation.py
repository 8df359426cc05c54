"""ShapesEvaluation: the evaluation core (``callbacks/core.py``) with the shapes world's scorers plugged in.

Besides the core's ``{stage}/ppl_text``, ``{stage}/ppl_caption``, ``{stage}/fid``, captions and sample grid:

    {stage}/geneval/<family> GenEval-style accuracy per task family; {stage}/geneval/overall = their mean. The
                             GenEval images are also FID's fake set (against held-out renders).
    {stage}/caption_acc      fraction of the attributes in the model's captions of held-out renders that are true
    {stage}/samples          rows: one fixed prompt per task family

Cost (defaults, tiny model, 2 CPU cores): about 10 s per evaluation -- one batched DDIM-25 guided sampling pass
over 6 x 8 x 2 = 96 GenEval images plus the 24-image grid, 32 captions and 2 x 64 perplexity documents.
"""

from __future__ import annotations

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from callbacks.core import EvaluationCore
from callbacks.fid import make_fid
from datamodules.shapes.scoring import caption_attributes_correct, geneval_scores
from datamodules.shapes.transfusion import ShapesDataModule
from datamodules.shapes.world import FAMILIES, Item, Prompt, caption
from lit_transfusion.generation import SamplingConfig

# One fixed prompt per task family for the grid (rows in this order).
GRID_PROMPTS: tuple[Prompt, ...] = (
    Prompt("single_object", (Item("circle"),)),
    Prompt("two_object", (Item("square"), Item("triangle"))),
    Prompt("counting", (Item("circle", count=3),)),
    Prompt("colors", (Item("square", "blue"),)),
    Prompt("position", (Item("triangle"), Item("circle")), "left of"),
    Prompt("color_attr", (Item("circle", "red"), Item("square", "yellow"))),
)


class ShapesEvaluation(EvaluationCore):
    """The core's metrics plus GenEval-style scores and captioning accuracy for ``ShapesDataModule`` runs.

    Args:
        every_n_evals: evaluate at every n-th validation (0: only in ``test``).
        prompts_per_family: GenEval prompts per task family (drawn from the held-out split).
        images_per_prompt: samples per GenEval prompt (GenEval: 4). These images are also FID's fake set.
        grid_images: samples per grid prompt.
        fid_real: held-out renders forming FID's real set (compare FIDs only at equal set sizes).
        fid_feature: "shapes" (the shipped feature net) or "inception" (needs ``inception_weights``, a local file).
        inception_weights: path to FID Inception-v3 weights (nothing is downloaded).
        num_captions: held-out renders to caption for ``caption_acc``.
        ppl_documents: held-out documents of each kind for ``ppl_text`` / ``ppl_caption``.
        sampling: how images and captions are sampled (``SamplingConfig``; default DDIM-25). Its seed fixes the
            prompts and their noise, so evaluations differ only by the model.
    """

    METRICS = ("ppl_", "fid", "geneval/", "caption_acc")

    def __init__(
        self,
        every_n_evals: NonNegativeInt = 1,
        prompts_per_family: PositiveInt = 8,
        images_per_prompt: PositiveInt = 2,
        grid_images: PositiveInt = 4,
        fid_real: PositiveInt = 512,
        fid_feature: str = "shapes",
        inception_weights: str | None = None,
        num_captions: PositiveInt = 32,
        ppl_documents: PositiveInt = 64,
        sampling: SamplingConfig | None = None,
    ):
        if fid_feature == "inception" and inception_weights is None:
            make_fid("inception")  # raises the clear "needs a local weights file" message at parse time
        super().__init__(every_n_evals, fid_images=fid_real, fid_feature=fid_feature,
                         inception_weights=inception_weights, num_captions=num_captions, ppl_documents=ppl_documents,
                         grid_images=grid_images, sampling=sampling)
        self.prompts_per_family, self.images_per_prompt = prompts_per_family, images_per_prompt
        self._prompts: list[Prompt] = []  # the GenEval prompts of the last fid_prompts call, one per image

    def check_datamodule(self, dm) -> None:
        if not isinstance(dm, ShapesDataModule):
            raise TypeError(f"ShapesEvaluation needs a ShapesDataModule (datamodules.shapes), got {type(dm).__name__}")

    def fid_prompts(self, dm: ShapesDataModule, split: str) -> list[str]:
        """GenEval-style prompts (per family, from the held-out split), ``images_per_prompt`` each."""
        prompts = _prompts_per_family(dm, split, self.prompts_per_family)
        texts = [caption(p, np.random.default_rng([self.sampling.seed, i])) for i, p in enumerate(prompts)]
        self._prompts = [p for p in prompts for _ in range(self.images_per_prompt)]
        return [t for t in texts for _ in range(self.images_per_prompt)]

    def score_images(self, dm: ShapesDataModule, split: str, prompts: list[str], images: torch.Tensor,
                     stage: str) -> dict[str, float]:
        scores = geneval_scores(self._prompts, list(images.permute(0, 2, 3, 1).cpu().numpy()))
        return {f"{stage}/geneval/{k}": v for k, v in scores.items()}

    def score_captions(self, dm: ShapesDataModule, split: str, captions: list[str], stage: str) -> dict[str, float]:
        scenes = dm.scenes[split][: len(captions)]
        correct = [caption_attributes_correct(c, s) for c, s in zip(captions, scenes, strict=True)]
        return {f"{stage}/caption_acc": float(np.mean(correct))}

    def grid_prompts(self, dm: ShapesDataModule, split: str) -> list[str]:
        return [caption(p, np.random.default_rng(1)) for p in GRID_PROMPTS]


def _prompts_per_family(dm: ShapesDataModule, split: str, n: int) -> list[Prompt]:
    """The first ``n`` prompts of each family in ``split`` (in family order); fewer if the split runs out."""
    found: dict[str, list[Prompt]] = {f: [] for f in dm.world.families}
    for p in dm.samples[split]:
        if len(found[p.family]) < n:
            found[p.family].append(p)
    return [p for f in FAMILIES if f in found for p in found[f]]
