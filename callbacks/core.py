"""EvaluationCore: the evaluation every dataset shares, with hooks for what a dataset adds.

At the end of every ``every_n_evals``-th validation (and in ``test``), on the datamodule's evaluation split
(``MixedModalData.evaluation_split``), through ``module.sampler()`` and ``module.codec`` only:

    {stage}/ppl_text       perplexity of held-out text documents (``dm.text_documents``; skipped when none)
    {stage}/ppl_caption    perplexity of held-out captions in caption -> image documents (``dm.caption_documents``)
    {stage}/fid            FID of images generated from :meth:`fid_prompts` against ``dm.heldout_images`` (the real
                           statistics computed once per split and kept; skipped with fewer than two of either)
    {stage}/kid, kid_std   KID (unbiased, so usable at small n) of the same two sets through the same feature net, and
                           its spread over subsets (``callbacks.fid.ImageDistances``)
    {stage}/fid_n          the number of generated images FID and KID used (both depend on it: compare runs only at
                           equal ``fid_n``); ``{stage}/fid_real_n`` the size of the real set
    {stage}/captions       TensorBoard text: the model's captions of held-out images beside their references
    {stage}/samples        a grid: one row per :meth:`grid_prompts` entry, ``grid_images`` samples each, also
                           written to ``<run dir>/samples/{stage}_step_<N>.png``

A dataset plugs in by overriding the hooks: :meth:`fid_prompts` (which captions make FID's fake set),
:meth:`score_images` (a score of those images, e.g. the shapes world's GenEval), :meth:`score_captions` (a score of
the captions, e.g. the shapes world's caption precision and recall) and :meth:`grid_prompts`. Floors of these
metrics come from ``python -m lit_transfusion floors`` (``results/floors/``).

The final evaluation (``test``, a standalone ``validate``, and the last validation of ``fit``: ``max_steps`` reached or
the trainer stopping) generates ``final_fid_images`` images for FID/KID instead of the periodic number: FID's
finite-sample bias is large at n = 96, and the numbers a run is judged by should not carry it.

The FID/KID network lives on this callback, not on the LightningModule, so it never enters a checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.common import EvaluationCallback, generate_uint8, log_grid, tensorboard
from callbacks.fid import FEATURES, INCEPTION_WEIGHTS_HINT, ImageDistances, to_uint8_nchw
from callbacks.perplexity import perplexity
from lit_transfusion.batch import SpecialIds, greedy_rows, pack_rows
from lit_transfusion.data import MixedModalData
from lit_transfusion.generation import SamplingConfig, TransfusionSampler
from lit_transfusion.images import images_to_tensor

PPL_BATCH = 16  # packed rows per perplexity forward


class EvaluationCore(EvaluationCallback):
    """Perplexity, FID with a cached real set, captions and a sample grid (see the module docstring).

    Args:
        every_n_evals: evaluate at every n-th validation (0: only in ``test``).
        fid_images: held-out images forming FID's real set and, by default, the number generated for it (compare
            FIDs only at equal set sizes; 0: no FID).
        final_fid_images: images generated for FID/KID at the final evaluation (see the module docstring; the real
            set grows to at least this many held-out images too; 0: as at the periodic ones).
        kid_subsets: KID's subsets (each of ``min(n_real, n_fake)`` images; more: a steadier ``kid_std``).
        fid_feature: "shapes" (the shipped feature net) or "inception" (needs ``inception_weights``).
        inception_weights: path to FID Inception-v3 weights (nothing is downloaded).
        num_captions: held-out images to caption (0: none).
        ppl_documents: held-out documents of each kind for ``ppl_text`` / ``ppl_caption`` (0: no perplexity).
        grid_images: samples per grid prompt.
        batch_size: rows per sampling call (None: all at once); bounds generation memory (guidance doubles it).
        sampling: how images and captions are sampled; default: ``SamplingConfig`` with DDIM-25 instead of the
            paper's DDPM-250, 10x cheaper for a metric tracked during training. Its seed fixes the noise, so
            evaluations differ only by the model.
    """

    METRICS: tuple[str, ...] = ("ppl_", "fid", "kid")

    def __init__(
        self,
        every_n_evals: NonNegativeInt = 1,
        fid_images: NonNegativeInt = 64,
        final_fid_images: NonNegativeInt = 384,
        kid_subsets: PositiveInt = 100,
        fid_feature: str = "shapes",
        inception_weights: str | None = None,
        num_captions: NonNegativeInt = 16,
        ppl_documents: NonNegativeInt = 64,
        grid_images: PositiveInt = 4,
        batch_size: PositiveInt | None = None,
        sampling: SamplingConfig | None = None,
    ):
        super().__init__(every_n_evals)
        if fid_feature not in FEATURES:
            raise ValueError(f"fid_feature={fid_feature!r}: expected one of {FEATURES}")
        if inception_weights is not None and not Path(inception_weights).is_file():
            raise FileNotFoundError(f"Inception weights file not found: {inception_weights}. "
                                    f"{INCEPTION_WEIGHTS_HINT}.")
        self.sampling = sampling or SamplingConfig(scheduler="ddim", steps=25)
        self.fid_images, self.fid_feature, self.inception_weights = fid_images, fid_feature, inception_weights
        self.num_captions, self.ppl_documents = num_captions, ppl_documents
        self.grid_images, self.batch_size = grid_images, batch_size
        self._fid_off = fid_images == 0 or (fid_feature == "inception" and inception_weights is None)
        self._warn_fid_off = fid_images > 0 and self._fid_off
        self.final_fid_images, self.kid_subsets = final_fid_images, kid_subsets
        self._fid: ImageDistances | None = None
        self._fid_key: tuple[str, int] | None = None  # (split, real images asked for) of the cached real set

    def check_datamodule(self, dm: MixedModalData) -> None:
        """Every ``MixedModalData`` will do; a dataset's scorer may need more (``ShapesEvaluation``)."""

    # ------------------------------------------------------------------------------------------ hooks
    def fid_prompts(self, dm: MixedModalData, split: str, n: int | None = None) -> list[str]:
        """Captions whose images form FID's fake set: about ``n`` of them (None: the periodic evaluation's number)
        (default: the held-out images' own captions)."""
        return dm.heldout_captions(split, n or self.fid_images)

    def score_images(self, dm: MixedModalData, split: str, prompts: list[str], images: torch.Tensor,
                     stage: str) -> dict[str, float]:
        """Metrics of the fake set: ``images`` uint8 [N, 3, H, W] generated from ``prompts`` (default: none)."""
        return {}

    def score_captions(self, dm: MixedModalData, split: str, captions: list[str], stage: str) -> dict[str, float]:
        """Metrics of the model's captions of the first ``len(captions)`` held-out images (default: none)."""
        return {}

    def grid_prompts(self, dm: MixedModalData, split: str) -> list[str]:
        """The grid's rows."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ core
    @torch.no_grad()
    def compute(self, pl_module, dm: MixedModalData, split: str, log_dir: Path | None = None, step: int = 0,
                logger=None, stage: str = "val", final: bool = False) -> dict[str, float]:
        """All metrics for ``split`` of ``dm`` (set up); logs the grid and captions where given a logger. ``final``:
        the final evaluation (``final_fid_images`` for FID/KID). Returns ``{"{stage}/<metric>": float}``."""
        tok = dm.tokenizer
        sampler = pl_module.sampler(SpecialIds(**dm.special_ids))
        # A configured prompt may be longer than the model can hold next to its image: keep what fits.
        room = sampler.max_len - dm.patches_per_image - 3  # <bos> caption <boi> patches <eoi>
        out = self._perplexities(pl_module, dm, split, stage)

        if self._warn_fid_off:
            rank_zero_warn(f"{type(self).__name__} skips FID: fid_feature='inception' needs inception_weights. "
                           f"{INCEPTION_WEIGHTS_HINT}.")
            self._warn_fid_off = False
        n = self.final_fid_images if final and self.final_fid_images else None
        prompts = self.fid_prompts(dm, split, n)
        if prompts:
            images = self._generate(pl_module, sampler, [tok.encode(t)[:room] for t in prompts])
            out.update(self.score_images(dm, split, prompts, images, stage))
            real = max(self.fid_images, n or 0)
            fid = None if self._fid_off or len(images) < 2 else self._real_fid(dm, split, pl_module.device, real)
            if fid is not None:
                fid.reset()  # fake features only (the real ones are kept)
                chunk = self.batch_size or len(images)
                for i in range(0, len(images), chunk):
                    fid.update(images[i : i + chunk].to(pl_module.device), real=False)
                out.update({f"{stage}/{k}": v for k, v in fid.compute().items()})

        if self.num_captions:
            real = dm.heldout_images(split, self.num_captions)  # uint8 [n, H, W, 3]
            if len(real):
                images = pl_module.codec.encode(images_to_tensor(real).to(pl_module.device))
                captions = [tok.decode(ids) for ids in self._caption(sampler, images, dm.patches_per_image)]
                out.update(self.score_captions(dm, split, captions, stage))
                writer = tensorboard(logger)
                if writer is not None:
                    references = dm.heldout_captions(split, len(captions))
                    writer.add_text(f"{stage}/captions", caption_table(references, captions), step)

        rows = self.grid_prompts(dm, split)
        if rows:
            ids = [tok.encode(p)[:room] for p in rows for _ in range(self.grid_images)]
            log_grid(self._generate(pl_module, sampler, ids), list(rows), self.grid_images, log_dir, step, logger,
                     stage)
        return out

    def _perplexities(self, pl_module, dm: MixedModalData, split: str, stage: str) -> dict[str, float]:
        out: dict[str, float] = {}
        if not self.ppl_documents:
            return out
        special = SpecialIds(**dm.special_ids)
        for name, docs in (("ppl_text", dm.text_documents(split, self.ppl_documents)),
                           ("ppl_caption", dm.caption_documents(split, self.ppl_documents))):
            if not docs:
                continue
            rows = greedy_rows(docs, dm.seq_len, dm.patches_per_image)
            batches = [pack_rows(rows[i : i + PPL_BATCH], dm.seq_len, dm.patch_size, special)
                       for i in range(0, len(rows), PPL_BATCH)]
            out[f"{stage}/{name}"] = perplexity(pl_module, batches)
        return out

    def _generate(self, pl_module, sampler: TransfusionSampler, ids: list[list[int]]) -> torch.Tensor:
        return generate_uint8(sampler, pl_module.codec, ids, self.sampling, self.batch_size)  # uint8 [N, 3, H, W]

    def _real_fid(self, dm: MixedModalData, split: str, device: torch.device, n: int) -> ImageDistances | None:
        """FID and KID (``ImageDistances``) holding the features of ``split``'s first ``n`` held-out images (computed
        once per split and n), or None when the split has fewer than two."""
        if self._fid is None or self._fid_key != (split, n):
            real = dm.heldout_images(split, n)  # uint8 [n, H, W, 3]
            if len(real) < 2:
                return None
            # sync_on_compute=False: only rank 0 gets here (see callbacks.common); a gather would hang.
            self._fid = ImageDistances(self.fid_feature, inception_weights=self.inception_weights,
                                       kid_subsets=self.kid_subsets, sync_on_compute=False).to(device)
            real = to_uint8_nchw(real)  # [n, 3, H, W]
            step = self.batch_size or len(real)
            for i in range(0, len(real), step):
                self._fid.update(real[i : i + step].to(device), real=True)
            self._fid_key = (split, n)
        return self._fid.to(device)

    def _caption(self, sampler: TransfusionSampler, images: torch.Tensor, patches: int) -> list[list[int]]:
        """Caption ids per image of ``images`` (the codec's latents or codes), ``batch_size`` rows per call (chunk
        k seeded ``seed + k``); never more new tokens than the model has positions left after the image."""
        cfg = dataclasses.replace(self.sampling, max_new_tokens=min(self.sampling.max_new_tokens,
                                                                    sampler.max_len - patches - 3))
        step = self.batch_size or max(1, len(images))
        out: list[list[int]] = []
        for k, i in enumerate(range(0, len(images), step)):
            out += sampler.caption(images[i : i + step], dataclasses.replace(cfg, seed=cfg.seed + k))
        return out


def caption_table(references: list[str], captions: list[str]) -> str:
    """A markdown table (TensorBoard's text plugin renders it): one held-out image per row."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ") or "(empty)"

    rows = [f"| {i + 1} | {cell(r)} | {cell(c)} |"
            for i, (r, c) in enumerate(zip(references, captions, strict=True))]
    return "\n".join(["| # | reference | model |", "|---|---|---|", *rows])
