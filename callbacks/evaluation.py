"""ShapesEvaluation: the evaluation core (``callbacks/core.py``) with the shapes world's scorers plugged in.

Besides the core's ``{stage}/ppl_text``, ``{stage}/ppl_caption``, ``{stage}/fid``, ``{stage}/kid``, captions and
sample grid:

    {stage}/geneval/<family> GenEval-style accuracy per task family; {stage}/geneval/overall = their mean. The
                             GenEval images are also FID's and KID's fake set (against held-out renders).
    {stage}/geneval/<family>_low, _high, overall_low, overall_high
                             Wilson 95 % intervals (overall: of the pooled images, equal to the mean of the families'
                             rates since every family has the same number of images); {stage}/geneval/n the images
    {stage}/caption_precision, caption_recall, caption_f1
                             ``scoring.caption_scores`` of the model's captions of held-out renders (mean over
                             captions; ``_low``/``_high``: percentile bootstrap 95 % intervals over captions)
    {stage}/caption_acc      the older score, kept for continuity with earlier runs: the fraction of the attributes the
                             captions state that are true, i.e. a precision -- blind to what a caption leaves out (a
                             caption saying only "a circle" scores 1.0); judge captions by caption_f1
    {stage}/samples          rows: one fixed prompt per task family
    {stage}/fid_floor_real, kid_floor_real, fid_floor_random, kid_floor_random
                             the floors beside FID and KID (``floors``: results/floors/floors.json, measured at the
                             same n and real set): disjoint held-out renders (real vs real: as close as a sample
                             gets) and random latents (codes, for a code model) decoded; skipped at an n the file lacks
    {stage}/geneval/overall_floor, caption_f1_floor
                             chance levels: renders of other prompts scored against each prompt, and the caption
                             "a circle" for every image (their values do not depend on n)

The final evaluation (see ``callbacks.core``) draws ``final_fid_images`` GenEval images (``ceil(n / (families x
images_per_prompt))`` prompts per family) instead of ``prompts_per_family``; ``{stage}/fid_n`` says how many were used.
Floors of every score at n = 96, 384, 1000: ``python -m lit_transfusion floors`` (``results/floors/``).

Cost (defaults, tiny model, 2 CPU cores): about 10 s per periodic evaluation -- one batched DDIM-25 guided sampling pass
over 6 x 8 x 2 = 96 GenEval images plus the 24-image grid, 32 captions and 2 x 64 perplexity documents.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.core import EvaluationCore
from callbacks.fid import make_fid
from datamodules.shapes.scoring import caption_attributes_correct, caption_scores, score
from datamodules.shapes.transfusion import ShapesDataModule
from datamodules.shapes.world import FAMILIES, Item, Prompt, Scene, caption
from lit_transfusion.generation import SamplingConfig
from lit_transfusion.stats import bootstrap_interval, wilson_interval

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
        final_fid_images: GenEval images (and so FID/KID's fake set) at the final evaluation (0: as periodically);
            fewer if the held-out split runs out of prompts of a family.
        kid_subsets: KID's subsets (see ``EvaluationCore``).
        grid_images: samples per grid prompt.
        fid_real: held-out renders forming FID's real set (compare FIDs only at equal set sizes).
        fid_feature: "shapes" (the shipped feature net) or "inception" (needs ``inception_weights``, a local file).
        inception_weights: path to FID Inception-v3 weights (nothing is downloaded).
        num_captions: held-out renders to caption for ``caption_precision`` / ``_recall`` / ``_f1``.
        ppl_documents: held-out documents of each kind for ``ppl_text`` / ``ppl_caption``.
        sampling: how images and captions are sampled (``SamplingConfig``; default DDIM-25). Its seed fixes the
            prompts and their noise, so evaluations differ only by the model.
        floors: the floors file of ``python -m lit_transfusion floors`` whose values are logged beside the scores
            (``{stage}/fid_floor_real`` ...; relative to the working directory; None or a missing file: none).
    """

    METRICS = ("ppl_", "fid", "kid", "geneval/", "caption_")

    def __init__(
        self,
        every_n_evals: NonNegativeInt = 1,
        prompts_per_family: PositiveInt = 8,
        images_per_prompt: PositiveInt = 2,
        final_fid_images: NonNegativeInt = 384,
        kid_subsets: PositiveInt = 100,
        grid_images: PositiveInt = 4,
        fid_real: PositiveInt = 512,
        fid_feature: str = "shapes",
        inception_weights: str | None = None,
        num_captions: PositiveInt = 32,
        ppl_documents: PositiveInt = 64,
        sampling: SamplingConfig | None = None,
        floors: str | None = "results/floors/floors.json",
    ):
        if fid_feature == "inception" and inception_weights is None:
            make_fid("inception")  # raises the clear "needs a local weights file" message at parse time
        super().__init__(every_n_evals, fid_images=fid_real, final_fid_images=final_fid_images,
                         kid_subsets=kid_subsets, fid_feature=fid_feature,
                         inception_weights=inception_weights, num_captions=num_captions, ppl_documents=ppl_documents,
                         grid_images=grid_images, sampling=sampling)
        self.prompts_per_family, self.images_per_prompt = prompts_per_family, images_per_prompt
        self.floors_path = floors
        self._floors: dict | None = None  # read on first use
        self._warned_floors: set[str] = set()
        self._prompts: list[Prompt] = []  # the GenEval prompts of the last fid_prompts call, one per image

    def check_datamodule(self, dm) -> None:
        if not isinstance(dm, ShapesDataModule):
            raise TypeError(f"ShapesEvaluation needs a ShapesDataModule (datamodules.shapes), got {type(dm).__name__}")

    def fid_prompts(self, dm: ShapesDataModule, split: str, n: int | None = None) -> list[str]:
        """GenEval-style prompts (per family, from the held-out split), ``images_per_prompt`` each: about ``n``
        images (None: ``prompts_per_family`` per family)."""
        per_family = self.prompts_per_family if n is None else prompts_per_family_for(n, self.images_per_prompt,
                                                                                      len(dm.world.families))
        prompts = geneval_prompts(dm.samples[split], per_family, dm.world.families)
        texts = [caption(p, np.random.default_rng([self.sampling.seed, i])) for i, p in enumerate(prompts)]
        self._prompts = [p for p in prompts for _ in range(self.images_per_prompt)]
        return [t for t in texts for _ in range(self.images_per_prompt)]

    def score_images(self, dm: ShapesDataModule, split: str, prompts: list[str], images: torch.Tensor,
                     stage: str) -> dict[str, float]:
        scores = geneval_with_intervals(self._prompts, list(images.permute(0, 2, 3, 1).cpu().numpy()))
        return {f"{stage}/geneval/{k}": v for k, v in scores.items()}

    def score_captions(self, dm: ShapesDataModule, split: str, captions: list[str], stage: str) -> dict[str, float]:
        scenes = dm.scenes[split][: len(captions)]
        correct = [caption_attributes_correct(c, s) for c, s in zip(captions, scenes, strict=True)]
        out = {f"{stage}/caption_{k}": v for k, v in caption_scores_with_intervals(captions, scenes).items()}
        return {**out, f"{stage}/caption_acc": float(np.mean(correct))}

    def grid_prompts(self, dm: ShapesDataModule, split: str) -> list[str]:
        return [caption(p, np.random.default_rng(1)) for p in GRID_PROMPTS]

    def compute(self, pl_module, dm, split: str, log_dir=None, step: int = 0, logger=None, stage: str = "val",
                final: bool = False) -> dict[str, float]:
        out = super().compute(pl_module, dm, split, log_dir=log_dir, step=step, logger=logger, stage=stage,
                              final=final)
        codes = pl_module.representation.codec_type.__name__ == "CodeCodec"
        return {**out, **self._floor_scalars(out, stage, codes)}

    def _floor_scalars(self, out: dict[str, float], stage: str, codes: bool) -> dict[str, float]:
        """The floors (see the module docstring) that apply to the scores in ``out``."""
        floors = self._read_floors()
        if floors is None:
            return {}
        found: dict[str, float] = {}
        largest = str(max(int(n) for n in floors["images"]))  # n-independent scores: the most precise estimate
        found[f"{stage}/geneval/overall_floor"] = floors["images"][largest]["prompt_ignoring"]["geneval"]["overall"]
        found[f"{stage}/caption_f1_floor"] = floors["captions"][largest]["vague_caption"]["f1"]
        n, real_n = out.get(f"{stage}/fid_n"), out.get(f"{stage}/fid_real_n")
        table = floors["images"].get(str(int(n))) if n is not None else None
        same_set = (table is not None and table["real_heldout"].get("fid_real_n") == real_n
                    and floors["settings"].get("feature") == self.fid_feature)
        if n is not None and not same_set:
            self._warn_once(f"no FID/KID floors at n = {int(n)} with {real_n and int(real_n)} real images and the "
                            f"{self.fid_feature!r} feature in {self.floors_path}: python -m lit_transfusion floors "
                            f"--n [{int(n)}] writes them")
            return found
        if table is not None:
            random = "random_codes" if codes else "random_latents"
            for metric in ("fid", "kid"):
                found[f"{stage}/{metric}_floor_real"] = table["real_heldout"][metric]
                found[f"{stage}/{metric}_floor_random"] = table[random][metric]
        return found

    def _read_floors(self) -> dict | None:
        if self._floors is None and self.floors_path:
            path = Path(self.floors_path)
            if not path.is_file():
                self._warn_once(f"floors={self.floors_path!r}: no such file, so no floors are logged beside the "
                                "scores (python -m lit_transfusion floors writes it)")
                self.floors_path = None
                return None
            self._floors = json.loads(path.read_text())
        return self._floors

    def _warn_once(self, message: str) -> None:
        if message not in self._warned_floors:
            self._warned_floors.add(message)
            rank_zero_warn(message)


def prompts_per_family_for(n: int, images_per_prompt: int, families: int = len(FAMILIES)) -> int:
    """Prompts per family for at least ``n`` GenEval images (every family gets as many: balanced families make the
    overall score the pooled rate)."""
    return max(1, math.ceil(n / (families * images_per_prompt)))


def geneval_prompts(prompts: Iterable[Prompt], per_family: int, families: Sequence[str] = FAMILIES) -> list[Prompt]:
    """The first ``per_family`` prompts of each of ``families`` in ``prompts`` (e.g. a split's samples), in family
    order; fewer for a family if ``prompts`` runs out (it is read only until every family is full)."""
    found: dict[str, list[Prompt]] = {f: [] for f in families}
    for p in prompts:
        if p.family in found and len(found[p.family]) < per_family:
            found[p.family].append(p)
            if all(len(v) == per_family for v in found.values()):
                break
    return [p for f in FAMILIES if f in found for p in found[f]]


def geneval_with_intervals(prompts: Sequence[Prompt], images: Sequence[np.ndarray],
                           confidence: float = 0.95) -> dict[str, float]:
    """GenEval-style scores of uint8 [H, W, 3] ``images`` against their ``prompts`` with Wilson intervals.

    Keys: ``<family>``, ``<family>_low``, ``<family>_high`` per family present; ``overall`` = the mean of the family
    rates (as ``scoring.geneval_scores``) with ``overall_low``/``_high`` the Wilson interval of all images pooled
    (the same rate when families are balanced, as ``geneval_prompts`` makes them); ``n`` = the images scored.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    hits: dict[str, list[bool]] = {}
    for p, img in zip(prompts, images, strict=True):
        hits.setdefault(p.family, []).append(score(p, img))
    out: dict[str, float] = {}
    for f in (f for f in FAMILIES if f in hits):
        k, n = sum(hits[f]), len(hits[f])
        out[f] = k / n
        out[f"{f}_low"], out[f"{f}_high"] = wilson_interval(k, n, confidence)
    if hits:
        k, n = sum(sum(h) for h in hits.values()), sum(len(h) for h in hits.values())
        out["overall"] = float(np.mean([out[f] for f in hits]))
        out["overall_low"], out["overall_high"] = wilson_interval(k, n, confidence)
    out["n"] = float(len(images))
    return out


def caption_scores_with_intervals(captions: Sequence[str], scenes: Sequence[Scene],
                                  confidence: float = 0.95) -> dict[str, float]:
    """Mean ``precision``, ``recall``, ``f1`` (``scoring.caption_scores``) of ``captions`` of ``scenes``, each with
    ``_low``/``_high``: the percentile bootstrap interval over captions (fixed seed)."""
    rows = [caption_scores(c, s) for c, s in zip(captions, scenes, strict=True)]
    out: dict[str, float] = {}
    for key in ("precision", "recall", "f1"):
        values = [r[key] for r in rows]
        out[key] = float(np.mean(values))
        out[f"{key}_low"], out[f"{key}_high"] = bootstrap_interval(values, confidence=confidence, resamples=1000)
    return out
