"""PreparedEvaluation: perplexity, FID, captions and a sample grid for runs on prepared data (``PreparedDataModule``,
your own images and text), logged to TensorBoard and to JSON.

At the end of every ``every_n_evals``-th validation (and in ``test``) it computes, for the held-out split:

    {stage}/ppl_text      perplexity of held-out text-only documents (skipped when the data has none)
    {stage}/ppl_caption   perplexity of held-out captions, in their caption -> image documents (skipped when none)
    {stage}/fid           FID of images generated from held-out captions against the held-out images themselves
                          (Inception-v3 from a local weights file, or the shapes feature net; skipped without either)
    {stage}/captions      TensorBoard text: the model's captions of held-out images beside their reference captions
                          (no score: free-form user captions have no scorer)
    {stage}/samples       a grid: one prompt per row (configured, or the first held-out captions), ``grid_images``
                          samples each, also written to ``<run dir>/samples/{stage}_step_<N>.png``

Every ``{stage}/*`` scalar (with the model's own losses) goes to ``<run dir>/metrics.json`` (validation: latest +
history; test: ``metrics_test.json``). Ranks and sharding as in ``callbacks.common.EvaluationCallback``. The VAE
and the FID network live on this callback, not on the LightningModule, so they never enter a checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.common import EvaluationCallback, generate_uint8, log_grid, tensorboard
from callbacks.fid import FEATURES, INCEPTION_WEIGHTS_HINT, make_fid, to_uint8_nchw
from callbacks.perplexity import perplexity
from lit_transfusion.batch import Image, SpecialIds, Text, greedy_rows, pack_rows
from lit_transfusion.generation import SamplingConfig, TransfusionSampler
from lit_transfusion.vae import LatentCodec

# What PreparedEvaluation reads off the datamodule (datamodules.files.streaming.PreparedDataModule).
REQUIRED = ("tokenizer", "special_ids", "vae_path", "patches_per_image", "hparams", "caption_documents",
            "text_documents", "heldout_images", "heldout_captions")
PPL_BATCH = 16  # packed rows per perplexity forward


class PreparedEvaluation(EvaluationCallback):
    """Sample grid, perplexity, FID and captions of held-out images for ``PreparedDataModule`` runs.

    Args:
        every_n_evals: evaluate at every n-th validation (0: only in ``test``).
        prompts: the grid's prompts, one row each; None or empty: the first ``grid_rows`` held-out captions.
        grid_rows: rows of the grid when it shows held-out captions.
        grid_images: samples per grid prompt.
        fid_images: held-out captions to generate from, and held-out images forming FID's real set (0: no FID).
            Compare FIDs only at equal set sizes.
        fid_feature: "inception" (the standard FID network; needs ``inception_weights``, and without them FID is
            skipped with a warning) or "shapes" (the shipped shapes-world feature net, for shapes-like images).
        inception_weights: path to FID Inception-v3 weights (nothing is downloaded).
        num_captions: held-out images to caption (0: none).
        ppl_documents: held-out documents of each kind for ``ppl_text`` / ``ppl_caption`` (0: no perplexity).
        batch_size: rows per sampling call, bounding the memory of generation (guidance doubles it).
        sampling: how images and captions are sampled (``SamplingConfig``); default: its defaults with DDIM-25
            instead of the paper's DDPM-250, 10x cheaper for a metric tracked during training. Its seed fixes
            the noise, so evaluations differ only by the model.
    """

    METRICS = ("ppl_", "fid")

    def __init__(
        self,
        every_n_evals: NonNegativeInt = 1,
        prompts: list[str] | None = None,
        grid_rows: PositiveInt = 6,
        grid_images: PositiveInt = 4,
        fid_images: NonNegativeInt = 64,
        fid_feature: str = "inception",
        inception_weights: str | None = None,
        num_captions: NonNegativeInt = 16,
        ppl_documents: NonNegativeInt = 64,
        batch_size: PositiveInt = 32,
        sampling: SamplingConfig | None = None,
    ):
        super().__init__(every_n_evals)
        if fid_feature not in FEATURES:
            raise ValueError(f"fid_feature={fid_feature!r}: expected one of {FEATURES}")
        if inception_weights is not None and not Path(inception_weights).is_file():
            raise FileNotFoundError(f"Inception weights file not found: {inception_weights}. "
                                    f"{INCEPTION_WEIGHTS_HINT}.")
        self.sampling = sampling or SamplingConfig(scheduler="ddim", steps=25)
        self.prompts = list(prompts or [])
        self.grid_rows, self.grid_images, self.fid_images = grid_rows, grid_images, fid_images
        self.fid_feature, self.inception_weights = fid_feature, inception_weights
        self.num_captions, self.ppl_documents, self.batch_size = num_captions, ppl_documents, batch_size
        # Most users have no Inception weights file: FID is then skipped (warned once), not an error.
        self._fid_off = fid_images == 0 or (fid_feature == "inception" and inception_weights is None)
        self._warn_fid_off = fid_images > 0 and self._fid_off
        self._codec: LatentCodec | None = None
        self._fid = None
        self._fid_split: str | None = None

    def split(self, stage: str) -> str:
        return "val"  # prepared data holds no test split: PreparedDataModule tests on "val" too

    def check_datamodule(self, dm) -> None:
        missing = [a for a in REQUIRED if not hasattr(dm, a)]
        if missing:
            raise TypeError(f"PreparedEvaluation needs a PreparedDataModule (datamodules.files.streaming); "
                            f"{type(dm).__name__} has no {', '.join(missing)}")

    @torch.no_grad()
    def compute(self, pl_module, dm, split: str, log_dir: Path | None = None, step: int = 0, logger=None,
                stage: str = "val") -> dict[str, float]:
        """All metrics for ``split`` of a ``PreparedDataModule`` (``dm``, set up); logs the grid and captions to
        ``log_dir`` / ``logger`` where given. Returns ``{"{stage}/<metric>": float}``."""
        self.check_datamodule(dm)
        device = pl_module.device
        special = SpecialIds(**dm.special_ids)
        tok = dm.tokenizer
        sampler = TransfusionSampler(pl_module.model, pl_module.diffusion, special)
        if self._codec is None:
            self._codec = LatentCodec.from_dir(dm.vae_path)
        codec = self._codec.to(device)
        # A configured prompt may be longer than the model can hold next to its image: keep what fits.
        room = sampler.max_len - dm.patches_per_image - 3  # <bos> caption <boi> patches <eoi>
        out: dict[str, float] = {}

        # Perplexity: held-out text-only documents, and captions in caption -> image documents.
        n_cap_docs = max(self.ppl_documents, self.num_captions)
        caption_docs = dm.caption_documents(split, n_cap_docs) if n_cap_docs else []
        text_docs = dm.text_documents(split, self.ppl_documents) if self.ppl_documents else []
        for name, docs in (("ppl_text", text_docs), ("ppl_caption", caption_docs[: self.ppl_documents])):
            if not docs:
                continue
            rows = greedy_rows(docs, dm.hparams.seq_len, dm.patches_per_image)
            batches = [pack_rows(rows[i : i + PPL_BATCH], dm.hparams.seq_len, dm.hparams.patch_size, special)
                       for i in range(0, len(rows), PPL_BATCH)]
            out[f"{stage}/{name}"] = perplexity(pl_module, batches)

        # FID: images generated from held-out captions against the held-out images (real statistics kept).
        if self._warn_fid_off:
            rank_zero_warn(f"PreparedEvaluation skips FID: fid_feature='inception' needs inception_weights. "
                           f"{INCEPTION_WEIGHTS_HINT}.")
            self._warn_fid_off = False
        fid = None if self._fid_off else self._real_fid(dm, split, device)
        if fid is not None:
            texts = dm.heldout_captions(split, self.fid_images)
            if len(texts) >= 2:  # a covariance needs two samples
                images = generate_uint8(sampler, codec, [tok.encode(t)[:room] for t in texts], self.sampling,
                                        self.batch_size)
                fid.reset()  # fake features only (reset_real_features=False)
                fid.update(images.to(device), real=False)
                out[f"{stage}/fid"] = float(fid.compute())

        # Captions of held-out images fed clean, logged beside their reference captions.
        pairs = [_latent_and_ids(d) for d in caption_docs[: self.num_captions]]
        pairs = [p for p in pairs if p is not None]
        if pairs:
            latents = torch.stack([lat for lat, _ in pairs]).float().to(device)  # [n, C, h, w]
            captions = [tok.decode(ids) for ids in self._caption(sampler, latents, dm.patches_per_image)]
            references = [tok.decode(ids) for _, ids in pairs]
            writer = tensorboard(logger)
            if writer is not None:
                writer.add_text(f"{stage}/captions", _caption_table(references, captions), step)

        # Grid: one prompt per row, grid_images samples each.
        prompts = self.prompts or dm.heldout_captions(split, self.grid_rows)
        if prompts:
            ids = [tok.encode(p)[:room] for p in prompts for _ in range(self.grid_images)]
            images = generate_uint8(sampler, codec, ids, self.sampling, self.batch_size)
            log_grid(images, list(prompts), self.grid_images, log_dir, step, logger, stage)
        return out

    def _real_fid(self, dm, split: str, device: torch.device):
        """The FID metric holding the real statistics of ``split``'s held-out images (computed once per split), or
        None when the split has fewer than two."""
        if self._fid is None or self._fid_split != split:
            real = dm.heldout_images(split, self.fid_images)  # uint8 [n, H, W, 3]
            if len(real) < 2:
                return None
            # sync_on_compute=False: only rank 0 gets here (see callbacks.common); a gather would hang.
            self._fid = make_fid(self.fid_feature, inception_weights=self.inception_weights,
                                 sync_on_compute=False).to(device)
            real = to_uint8_nchw(real)  # [n, 3, H, W]
            for i in range(0, len(real), self.batch_size):
                self._fid.update(real[i : i + self.batch_size].to(device), real=True)
            self._fid_split = split
        return self._fid.to(device)

    def _caption(self, sampler: TransfusionSampler, latents: torch.Tensor, patches: int) -> list[list[int]]:
        """Caption ids per image of ``latents`` [n, C, h, w], ``batch_size`` rows per call (chunk k seeded
        ``seed + k``); never more new tokens than the model has positions left after the image."""
        cfg = dataclasses.replace(self.sampling, max_new_tokens=min(self.sampling.max_new_tokens,
                                                                    sampler.max_len - patches - 3))
        out: list[list[int]] = []
        for k, i in enumerate(range(0, len(latents), self.batch_size)):
            out += sampler.caption(latents[i : i + self.batch_size], dataclasses.replace(cfg, seed=cfg.seed + k))
        return out


def _latent_and_ids(doc: list) -> tuple[torch.Tensor, list[int]] | None:
    """A caption document's first image latent [C, h, w] and the ids of its text (specials included; the
    tokenizer's decode drops them), or None for a document without an image."""
    latents = [seg.latent for seg in doc if isinstance(seg, Image)]
    if not latents:
        return None
    return torch.as_tensor(latents[0]), [i for seg in doc if isinstance(seg, Text) for i in seg.ids]


def _caption_table(references: list[str], captions: list[str]) -> str:
    """A markdown table (TensorBoard's text plugin renders it): one held-out image per row."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ") or "(empty)"

    rows = [f"| {i + 1} | {cell(r)} | {cell(c)} |"
            for i, (r, c) in enumerate(zip(references, captions, strict=True))]
    return "\n".join(["| # | reference | model |", "|---|---|---|", *rows])
