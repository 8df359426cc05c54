"""ShapesEvaluation: the paper's metric families for the shapes world, logged to TensorBoard and to JSON.

At the end of every ``every_n_evals``-th validation (and in ``test``) it computes, for the held-out split:

    {stage}/ppl_text         perplexity of held-out text-only documents (torchmetrics Perplexity)
    {stage}/ppl_caption      perplexity of held-out captions, in their caption -> image documents
    {stage}/fid              FID of generated images against held-out renders (shapes feature net, or Inception)
    {stage}/geneval/<family> GenEval-style accuracy per task family; {stage}/geneval/overall = their mean
    {stage}/caption_acc      fraction of the attributes in the model's captions of held-out renders that are true
    {stage}/samples          a grid: one fixed prompt per task family (rows), ``grid_images`` samples each

The grid also goes to ``<run dir>/samples/{stage}_step_<N>.png`` and every ``{stage}/*`` scalar (with the model's own
losses and ``cond_gap``) to ``<run dir>/metrics.json`` (validation: latest + history; test: ``metrics_test.json``).

Ranks (``callbacks.common.EvaluationCallback``): generation runs on global rank 0 only and is logged with
``rank_zero_only=True``; under FSDP every rank evaluates the same seeded samples and rank 0 logs. The feature
network and VAE live on this callback, not on the LightningModule, so they never enter a checkpoint.

Cost (defaults, tiny model, 2 CPU cores): about 10 s per evaluation — one batched DDIM-25 guided sampling pass
over 6 x 8 x 2 = 96 GenEval images plus the 24-image grid, 32 captions and 2 x 64 perplexity documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from callbacks.common import EvaluationCallback, generate_uint8, log_grid, tensorboard
from callbacks.fid import FEATURES, make_fid
from callbacks.perplexity import perplexity
from datamodules.shapes.scoring import caption_attributes_correct, geneval_scores
from datamodules.shapes.world import FAMILIES, Item, Prompt, caption, render
from lit_transfusion.batch import SpecialIds, Text, greedy_rows, pack_rows
from lit_transfusion.generation import SamplingConfig, TransfusionSampler
from lit_transfusion.vae import LatentCodec
from lit_transfusion.vq import CodeCodec

# One fixed prompt per task family for the grid (rows in this order).
GRID_PROMPTS: tuple[Prompt, ...] = (
    Prompt("single_object", (Item("circle"),)),
    Prompt("two_object", (Item("square"), Item("triangle"))),
    Prompt("counting", (Item("circle", count=3),)),
    Prompt("colors", (Item("square", "blue"),)),
    Prompt("position", (Item("triangle"), Item("circle")), "left of"),
    Prompt("color_attr", (Item("circle", "red"), Item("square", "yellow"))),
)


class ShapesEvaluation(EvaluationCallback):
    """Sample grid, perplexity, FID, GenEval-style score and captioning accuracy for ``ShapesDataModule`` runs.

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
        sampling: how images and captions are sampled (``SamplingConfig``); default: its defaults with DDIM-25
            instead of the paper's DDPM-250, 10x cheaper for a metric tracked during training. Its seed fixes
            the prompts and their noise, so evaluations differ only by the model.
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
        super().__init__(every_n_evals)
        self.sampling = sampling or SamplingConfig(scheduler="ddim", steps=25)
        if fid_feature not in FEATURES:
            raise ValueError(f"fid_feature={fid_feature!r}: expected one of {FEATURES}")
        if fid_feature == "inception" and inception_weights is None:
            make_fid("inception")  # raises the clear "needs a local weights file" message at parse time
        self.prompts_per_family = prompts_per_family
        self.images_per_prompt, self.grid_images, self.fid_real = images_per_prompt, grid_images, fid_real
        self.num_captions, self.ppl_documents = num_captions, ppl_documents
        self.fid_feature, self.inception_weights = fid_feature, inception_weights
        self._codec: LatentCodec | CodeCodec | None = None
        self._fid = None
        self._fid_split: str | None = None

    def check_datamodule(self, dm) -> None:
        needed = ("world", "scenes", "samples", "latents", "caption_ids", "text_document", "image_codec",
                  "image_segment")
        if not all(hasattr(dm, a) for a in needed):
            raise TypeError(f"ShapesEvaluation needs a ShapesDataModule (datamodules.shapes), got {type(dm).__name__}")

    @torch.no_grad()
    def compute(self, pl_module, dm, split: str, log_dir: Path | None = None, step: int = 0, logger=None,
                stage: str = "val") -> dict[str, float]:
        """All metrics for ``split`` of a ``ShapesDataModule`` (``dm``, set up); logs the grid if given a logger."""
        device = pl_module.device
        special = SpecialIds(**dm.special_ids)
        tok = dm.tokenizer
        sampler = pl_module.sampler(special)  # diffusion for Transfusion, code decoding for the token baseline
        if self._codec is None:
            self._codec = dm.image_codec()  # the VAE, or the VQ tokenizer of image_tokens: codes
        codec = self._codec.to(device)
        out: dict[str, float] = {}

        # Perplexity: held-out text-only documents, and captions in caption -> image documents.
        n_docs = self.ppl_documents
        rng = np.random.default_rng([self.sampling.seed, 5])
        text_docs = [dm.text_document(split, i) for i in range(n_docs)]
        n_img = min(n_docs, len(dm.samples[split]))
        caption_docs = [[Text([special.bos] + dm.caption_ids(split, i, rng)), dm.image_segment(dm.latents[split][i]),
                         Text([special.eos])] for i in range(n_img)]
        for name, docs in (("ppl_text", text_docs), ("ppl_caption", caption_docs)):
            rows = greedy_rows(docs, dm.hparams.seq_len, dm.patches_per_image)
            batches = [pack_rows(rows[i : i + 16], dm.hparams.seq_len, dm.hparams.patch_size, special)
                       for i in range(0, len(rows), 16)]
            out[f"{stage}/{name}"] = perplexity(pl_module, batches)

        # GenEval-style prompts (per family, from the held-out split); their images are also FID's fake set.
        prompts = _prompts_per_family(dm, split, self.prompts_per_family)
        texts = [caption(p, np.random.default_rng([self.sampling.seed, i])) for i, p in enumerate(prompts)]
        prompts = [p for p in prompts for _ in range(self.images_per_prompt)]
        texts = [t for t in texts for _ in range(self.images_per_prompt)]
        images = self._generate(sampler, codec, [tok.encode(t) for t in texts])  # uint8 [N, 3, H, W]
        scores = geneval_scores(prompts, list(images.permute(0, 2, 3, 1).cpu().numpy()))
        out.update({f"{stage}/geneval/{k}": v for k, v in scores.items()})

        # FID: generated images against held-out renders (real statistics computed once, kept across evaluations).
        if self._fid is None or self._fid_split != split:
            # sync_on_compute=False: only rank 0 gets here (see the module docstring); a gather would hang.
            self._fid = make_fid(self.fid_feature, inception_weights=self.inception_weights,
                                 sync_on_compute=False).to(device)
            n_real = min(self.fid_real, len(dm.scenes[split]))
            real = np.stack([render(s) for s in dm.scenes[split][:n_real]])  # uint8 [n, H, W, 3]
            self._fid.update(torch.from_numpy(real).permute(0, 3, 1, 2).to(device), real=True)
            self._fid_split = split
        fid = self._fid.to(device)
        fid.reset()  # fake features only (reset_real_features=False)
        fid.update(images.to(device), real=False)
        out[f"{stage}/fid"] = float(fid.compute())

        # Captioning: held-out renders fed clean; score the attributes the captions state.
        n_cap = min(self.num_captions, len(dm.samples[split]))
        ids = sampler.caption(dm.latents[split][:n_cap].to(device), self.sampling)
        captions = [tok.decode(i) for i in ids]
        scenes = dm.scenes[split][:n_cap]
        out[f"{stage}/caption_acc"] = float(np.mean([caption_attributes_correct(c, s)
                                                      for c, s in zip(captions, scenes, strict=True)]))

        # Grid: one fixed prompt per family, one row each.
        grid_texts = [caption(p, np.random.default_rng(1)) for p in GRID_PROMPTS]
        grid_ids = [tok.encode(t) for t in grid_texts for _ in range(self.grid_images)]
        grid_images = self._generate(sampler, codec, grid_ids)
        self._log_grid(grid_images, grid_texts, captions[:4], log_dir, step, logger, stage)
        return out

    def _generate(self, sampler: TransfusionSampler, codec, ids: list[list[int]]) -> torch.Tensor:
        return generate_uint8(sampler, codec, ids, self.sampling)  # uint8 [N, 3, H, W]

    def _log_grid(self, images, prompts, captions, log_dir, step, logger, stage) -> None:
        log_grid(images, prompts, self.grid_images, log_dir, step, logger, stage)
        writer = tensorboard(logger)
        if writer is not None:
            writer.add_text(f"{stage}/captions", "\n\n".join(captions), step)


def _prompts_per_family(dm, split: str, n: int) -> list[Prompt]:
    """The first ``n`` prompts of each family in ``split`` (in family order); fewer if the split runs out."""
    found: dict[str, list[Prompt]] = {f: [] for f in dm.world.families}
    for p in dm.samples[split]:
        if len(found[p.family]) < n:
            found[p.family].append(p)
    return [p for f in FAMILIES if f in found for p in found[f]]
