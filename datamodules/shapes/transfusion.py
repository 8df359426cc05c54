"""ShapesDataModule: the embedded shapes world as packed Transfusion batches.

Documents (one per sample, several packed per row):
- caption -> image   ``<bos> caption <boi> image <eoi> <eos>``                     (the rest of image docs)
- image -> caption   ``<bos> <boi> image <eoi> caption <eos>``, t capped at ``noise_limit`` (paper: 20 %, 500)
- null caption       ``<bos> <boi> image <eoi> <eos>``, no LM loss on the empty caption (CFG; paper-ish 10 %)
- text only          ``<bos> scene description <eos>`` (fraction ``text_ratio`` of documents, or the fraction that
                     makes text a share ``text_share`` of the training positions)

Images are rendered once, encoded once with the frozen VAE, and the latents cached on disk; captions are
re-phrased per draw (several templates per task family). With ``image_tokens: codes`` (the Chameleon-style
baseline) the same documents hold each image as ``<boi> c_1 .. c_P <eoi>``: the codes of a frozen VQ tokenizer,
as text ids after the text vocabulary (``special_ids["first_code"]``), trained with the LM loss like any text.
Validation has two loaders: packed rows for the losses, and caption->image pairs with true and with shuffled
captions for ``val/cond_gap``.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.shapes.world import (
    FAMILIES,
    Item,
    Prompt,
    Scene,
    ShapesWorld,
    caption,
    render,
    sample_prompt,
    scene_caption,
)
from lit_transfusion.batch import (
    CaptionPairs,
    Document,
    Image,
    PairLayout,
    Segment,
    SpecialIds,
    Text,
    caption_image_document,
    code_segment,
    document_length,
    pack_pairs,
    pack_rows,
    pair_document,
    shifted_caption_pairs,
)
from lit_transfusion.data import PackingFromHparams
from lit_transfusion.images import images_to_tensor
from lit_transfusion.tokenizer import TextTokenizer
from lit_transfusion.vae import LatentCodec, vae_latent_shape
from lit_transfusion.vq import CodeCodec, vq_code_shape, vq_codebook_size

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_CACHE_VERSION = 3  # bump when the cache layout changes
_TEXT_RATIO_DEFAULT = 0.25
_SHARE_DOCUMENTS = 2048  # documents of each kind drawn to measure mean lengths (``text_share``)
_SHARE_POSITIONS = 1 << 18  # positions of simulated packed rows per packing correction (``text_share``)
_SHARE_CORRECTIONS = 2  # packing corrections of the text_ratio solved from mean lengths


class ShapesDataModule(PackingFromHparams, L.LightningDataModule):
    """Packed caption/image/text documents from the shapes world (a ``lit_transfusion.data.MixedModalData``).

    Args:
        data_dir: cache directory for the tokenizer and encoded latents.
        vae_path: directory of a diffusers AutoencoderKL with shift/scaling factors (``configs/shapes/vae.yaml``).
        tokenizer_path: a local ``tokenizer.json``; None trains a byte-level BPE on the corpus (cached).
        bpe_vocab_size: vocabulary size of the trained BPE.
        seed: world seed (samples are a pure function of seed, split and index).
        image_size: rendered image side in pixels.
        num_train: training images rendered and encoded (drawn with replacement into rows).
        num_val: validation (and test) images.
        seq_len: positions per packed row.
        batch_size: rows per batch.
        patch_size: latent patch side (linked from the model's patch_size).
        text_ratio: fraction of documents that are text only (ignored where ``text_share`` is set).
        text_share: target fraction of the training positions that are text, or None (use ``text_ratio``). Positions
            are the non-pad sequence elements (``train/positions_seen``, the D of 6·N·D): image positions are the
            patches (latents) or codes (``image_tokens: codes``) of the images; every other one is text: text-only
            documents, captions, ``<bos>``/``<eos>`` and the ``<boi>``/``<eoi>`` markers. Set, it replaces
            ``text_ratio``: ``setup`` measures the mean lengths of this datamodule's own training documents (text
            positions of a text-only document, text and image positions of an image document after caption dropout
            and the image-first layout), solves the linear equation for the fraction of text-only documents that
            gives this share, and corrects it for packing (a document that does not fit the rest of a row is
            redrawn, which favours short documents) with the lengths realized in simulated rows. The same share
            thus gives each image representation the same text:image ratio of positions (codes need more text-only
            documents than latent patches). Setting a ``text_ratio`` other than its default as well is an error. The
            result: ``text_ratio_effective`` and ``expected_text_share`` (printed once). A share below that of
            image documents alone (no text-only documents) is unreachable: a ValueError says the reachable range.
        image_first_ratio: fraction of image documents laid out image -> caption.
        caption_dropout: fraction of caption -> image documents whose caption is dropped (CFG).
        noise_limit: max diffusion timestep for image-first documents.
        scene_caption_ratio: fraction of captions that describe the whole scene (each object's size, color,
            shape and coarse location). GenEval-style prompts leave most colors and all positions unstated, so
            alone they are too weak a signal to learn conditioning from in a short run.
        color_detail: fraction of the other (GenEval-style) captions that also state the colors the prompt
            left open ("a circle" -> "a red circle"); every caption stays true of its image.
        rows_per_epoch: length of the (randomly drawn) training epoch in rows.
        val_rows: packed validation rows.
        cond_gap_pairs: validation caption->image pairs for ``val/cond_gap``.
        num_workers: DataLoader workers.
        families: GenEval task families the image prompts are drawn from (default: all six).
        image_tokens: "latents" (Transfusion: continuous VAE latents, diffused) or "codes" (the Chameleon-style
            baseline, ``lit_transfusion.chameleon.ChameleonModule``: discrete VQ codes in the vocabulary, one code per
            position, so ``model.patch_size`` must be 1).
        vq_path: the VQ tokenizer directory (``configs/shapes/vq.yaml``) used when ``image_tokens`` is "codes".
    """

    def __init__(
        self,
        data_dir: str = ".cache/shapes",
        vae_path: str = "datamodules/shapes/pretrained_vae",
        tokenizer_path: str | None = None,
        bpe_vocab_size: PositiveInt = 512,
        seed: int = 0,
        image_size: PositiveInt = 32,
        num_train: PositiveInt = 20000,
        num_val: PositiveInt = 512,
        seq_len: PositiveInt = 128,
        batch_size: PositiveInt = 16,
        patch_size: PositiveInt = 2,
        text_ratio: ClosedUnitInterval = _TEXT_RATIO_DEFAULT,
        text_share: ClosedUnitInterval | None = None,
        image_first_ratio: ClosedUnitInterval = 0.2,
        caption_dropout: ClosedUnitInterval = 0.1,
        noise_limit: PositiveInt = 500,
        scene_caption_ratio: ClosedUnitInterval = 0.5,
        color_detail: ClosedUnitInterval = 0.5,
        rows_per_epoch: PositiveInt = 1_000_000,
        val_rows: PositiveInt = 64,
        cond_gap_pairs: PositiveInt = 256,
        num_workers: int = 0,
        families: tuple[str, ...] = FAMILIES,
        image_tokens: Literal["latents", "codes"] = "latents",
        vq_path: str = "datamodules/shapes/pretrained_vq",
    ):
        super().__init__()
        # Not merged into the logger's hparams: the module has a `seed` too (its noise stream) and Lightning refuses
        # equal keys with different values; the run's config.yaml records every data setting anyway.
        self.save_hyperparameters(logger=False)
        try:
            self.world = ShapesWorld(seed=seed, image_size=image_size, families=families)
        except ValueError as e:
            raise ValueError(f"data.{e}") from None
        if image_tokens not in ("latents", "codes"):
            raise ValueError(f"data.image_tokens={image_tokens!r}: expected 'latents' or 'codes'")
        if text_share is not None:
            if not 0 < text_share <= 1:
                raise ValueError(f"data.text_share={text_share!r}: expected a fraction of the training positions in "
                                 "(0, 1], or null to use text_ratio")
            if text_ratio != _TEXT_RATIO_DEFAULT:
                raise ValueError(f"data.text_share={text_share} and data.text_ratio={text_ratio}: text_share sets the "
                                 "fraction of text-only documents itself; set one of them (text_share: null to use "
                                 "text_ratio)")
        # The fraction of text-only documents rows are drawn with: text_ratio, or (text_share) solved in setup.
        self.text_ratio_effective: float | None = None if text_share is not None else float(text_ratio)
        self._expected_text_share: float | None = None
        self.codebook_size = 0
        if image_tokens == "codes":
            try:
                h, w = vq_code_shape(vq_path, image_size)
                self.codebook_size = vq_codebook_size(vq_path)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"data.vq_path: {e}") from None
            # The "latent" of an image is its code grid; the model reads its shape to decode P = h·w codes.
            self.latent_shape: tuple[int, int, int] = (1, h, w)
            if patch_size != 1:
                raise ValueError(f"model.patch_size={patch_size}: data.image_tokens='codes' puts one code per "
                                 "position; set patch_size: 1")
        else:
            try:
                self.latent_shape = tuple(vae_latent_shape(vae_path, image_size))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"data.vae_path: {e}") from None
        C, h, w = self.latent_shape
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"model.patch_size={patch_size} must divide the latent grid {h}x{w} "
                f"(image_size={image_size} through the VAE at {vae_path!r})"
            )
        self.patches_per_image = (h // patch_size) * (w // patch_size)
        self.layout = PairLayout(image_first_ratio, caption_dropout, noise_limit)
        if tokenizer_path is not None:
            try:
                self.tokenizer = TextTokenizer.from_file(tokenizer_path)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"data.tokenizer_path: {e}") from None
        else:
            self.tokenizer = self._train_tokenizer()
        self.latents: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list] = {}  # per split: the Prompt each image was drawn from
        self.scenes: dict[str, list] = {}  # the rendered Scene (ground truth)

    # ---------------------------------------------------------------------- what the model is linked to
    @property
    def vocab_size(self) -> int:
        """Text ids, then (``image_tokens: codes``) the image codes."""
        return self.tokenizer.vocab_size + self.codebook_size

    @property
    def special_ids(self) -> dict[str, int]:
        ids = vars(self.tokenizer.special).copy()
        ids.pop("first_code", None)
        if self.hparams.image_tokens == "codes":
            ids["first_code"] = self.tokenizer.vocab_size
        return ids

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    @property
    def codes(self) -> bool:
        """Are images discrete codes (``image_tokens: codes``)?"""
        return self.hparams.image_tokens == "codes"

    def image_codec(self):
        """The frozen codec between pixels and this data's images: ``LatentCodec`` (VAE) or ``CodeCodec`` (VQ)."""
        if self.codes:
            return CodeCodec.from_dir(self.hparams.vq_path)
        return LatentCodec.from_dir(self.hparams.vae_path)

    def image_segment(self, latent: torch.Tensor, t_max: int = 1000) -> Segment:
        """An image (its latent [C, h, w], or its codes [1, h, w]) as a document segment: an ``Image`` to diffuse, or
        the text run ``<boi> codes <eoi>`` of the discrete-token baseline (``t_max`` then means nothing)."""
        if self.codes:
            return code_segment(latent, SpecialIds(**self.special_ids))
        return Image(latent, t_max=t_max)

    # ------------------------------------------------------------------------------------------- caches
    def _train_tokenizer(self) -> TextTokenizer:
        hp = self.hparams
        path = Path(hp.data_dir) / f"tokenizer-bpe{hp.bpe_vocab_size}-seed{hp.seed}.json"
        if path.is_file():
            return TextTokenizer.from_file(path)
        rng = np.random.default_rng([hp.seed, 99])
        corpus = [caption(sample_prompt(rng), rng) for _ in range(4000)]
        corpus += [self.world.text("train", i) for i in range(4000)]
        return TextTokenizer.train(corpus, hp.bpe_vocab_size, save_to=path)

    def _cache_path(self, split: str, n: int) -> Path:
        hp = self.hparams
        codec_dir = Path(hp.vq_path if self.codes else hp.vae_path)
        weights = sorted(codec_dir.glob("*.safetensors")) + sorted(codec_dir.glob("config.json"))
        digest = hashlib.sha1()
        for f in weights:
            digest.update(f.read_bytes())
        kind = "vq" if self.codes else "vae"
        key = f"v{_CACHE_VERSION}-{split}-n{n}-seed{hp.seed}-px{hp.image_size}-{kind}{digest.hexdigest()[:10]}"
        if tuple(self.world.families) != FAMILIES:
            key += "-" + "+".join(self.world.families)
        return Path(hp.data_dir) / f"latents-{key}.pt"

    def _split_size(self, split: str) -> int:
        return self.hparams.num_train if split == "train" else self.hparams.num_val

    def prepare_data(self) -> None:
        """Render and encode each split once (rank 0); later runs load the cache."""
        codec = None
        for split in ("train", "val", "test"):
            path = self._cache_path(split, self._split_size(split))
            if path.is_file():
                continue
            codec = codec or self.image_codec()
            samples = [self.world.sample(split, i) for i in range(self._split_size(split))]
            latents = codec.encode(images_to_tensor(np.stack([s.image for s in samples])))
            # Codes [N, h, w] long -> [N, 1, h, w], so a "latent" is [C, h, w] in both modes.
            latents = latents[:, None].long() if self.codes else latents.float()
            path.parent.mkdir(parents=True, exist_ok=True)
            # Prompts (not pixels) are kept: documents re-phrase the caption at every draw.
            torch.save({
                "latents": latents.contiguous(),
                "prompts": [s.prompt for s in samples],
                "scenes": [s.scene for s in samples],
            }, path)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if split in self.latents:
                continue
            path = self._cache_path(split, self._split_size(split))
            if not path.is_file():
                self.prepare_data()
            cached = torch.load(path, weights_only=False)  # our own cache file: latents + Prompt dataclasses
            self.latents[split], self.samples[split] = cached["latents"], cached["prompts"]
            self.scenes[split] = cached["scenes"]
        if self.text_ratio_effective is None:
            self._solve_text_share()

    # ------------------------------------------------------------------------------------ text share
    @property
    def expected_text_share(self) -> float:
        """The fraction of training positions that are text at ``text_ratio_effective``, measured on simulated
        packed training rows (after ``setup``)."""
        if self._expected_text_share is None:
            if self.text_ratio_effective is None or "train" not in self.samples:
                raise RuntimeError("expected_text_share is measured on the training documents: call setup() first")
            self._expected_text_share = self._packed_positions(self.text_ratio_effective)[3]
        return self._expected_text_share

    def position_counts(self, doc: Document) -> tuple[int, int]:
        """(text, image) positions of a document once packed. Image positions are an image's patches (or codes);
        the rest are text, ``<boi>``/``<eoi>`` included, so text + image is what ``train/positions_seen`` counts."""
        first_code = self.special_ids.get("first_code")
        text = image = 0
        for seg in doc:
            if isinstance(seg, Image):
                text, image = text + 2, image + self.patches_per_image
            else:
                codes = 0 if first_code is None else sum(i >= first_code for i in seg.ids)
                text, image = text + len(seg.ids) - codes, image + codes
        return text, image

    def _mean_lengths(self) -> tuple[float, float, float]:
        """Mean text positions of a text-only training document, and mean text and image positions of an image
        document (its drawn layout: caption first, image first or dropped caption), on their own random stream."""
        rng = np.random.default_rng([self.hparams.seed, _SPLIT_CODE["train"], 3])
        n = len(self.samples["train"])
        text = [self.position_counts(self.text_document("train", int(rng.integers(1 << 30))))[0]
                for _ in range(_SHARE_DOCUMENTS)]
        image = np.array([self.position_counts(self.image_document("train", int(rng.integers(n)), rng))
                          for _ in range(_SHARE_DOCUMENTS)])
        return float(np.mean(text)), float(image[:, 0].mean()), float(image[:, 1].mean())

    def _packed_positions(self, text_ratio: float) -> tuple[float, float, float, float]:
        """Simulated training rows (their own random stream) at ``text_ratio``: (text positions of text-only
        documents, text positions of image documents, image positions, text share)."""
        hp = self.hparams
        counts = np.zeros(3)
        for k in range(max(1, _SHARE_POSITIONS // hp.seq_len)):
            for doc in self.random_row("train", np.random.default_rng([hp.seed, _SPLIT_CODE["train"], 4, k]),
                                       text_ratio=text_ratio):
                text, image = self.position_counts(doc)
                counts += (text, 0, 0) if len(doc) == 1 else (0, text, image)
        return (*counts.tolist(), float(counts[:2].sum() / counts.sum()))

    def _solve_text_share(self) -> None:
        """``text_ratio_effective`` for ``text_share``: solved from the mean document lengths, then corrected for
        packing with the lengths realized per drawn document in simulated rows (``_SHARE_CORRECTIONS`` times)."""
        share = self.hparams.text_share
        text_len, caption_len, image_len = self._mean_lengths()

        def unreachable(low: float, packed: bool = False) -> ValueError:
            what = "codes" if self.codes else "latent patches"
            return ValueError(
                f"data.text_share={share} cannot be reached: the reachable range is [{low:.3f}, 1]. An image document "
                f"holds {image_len:.1f} image positions ({what}, image_tokens={self.hparams.image_tokens!r}) and "
                f"{caption_len:.1f} text positions (caption, <bos>/<eos>, <boi>/<eoi>) on average, so even with no "
                f"text-only documents (text_ratio=0) text is {low:.3f} of the training positions"
                + (" once packed (a document that does not fit a row is redrawn, which favours short ones)"
                   if packed else ""))

        try:
            ratio = text_ratio_for_share(share, text_len, caption_len, image_len)
        except ValueError:
            raise unreachable(caption_len / (caption_len + image_len)) from None
        for _ in range(_SHARE_CORRECTIONS):
            if ratio in (0.0, 1.0):  # one kind of document only: packing cannot change the share
                break
            text_docs, text_images, images, _ = self._packed_positions(ratio)
            if not (text_docs and images):  # too few draws of one kind to measure its length: keep the ratio
                break
            # Realized positions per drawn document of each kind (the number of draws cancels out).
            lengths = (text_docs / ratio, text_images / (1 - ratio), images / (1 - ratio))
            try:
                ratio = text_ratio_for_share(share, *lengths)
            except ValueError:
                low = lengths[1] / (lengths[1] + lengths[2])
                raise unreachable(low, packed=True) from None
        self.text_ratio_effective = ratio
        rank_zero_info(f"data.text_share={share}: text_ratio={ratio:.4f} (image_tokens={self.hparams.image_tokens!r}; "
                       f"mean positions: text-only document {text_len:.1f}, image document {caption_len:.1f} text + "
                       f"{image_len:.1f} image); expected text share of the training positions "
                       f"{self.expected_text_share:.4f}")

    # ---------------------------------------------------------------------------------------- documents
    def caption_ids(self, split: str, index: int, rng: np.random.Generator, full: bool = False) -> list[int]:
        """Caption token ids of sample ``index``: the full scene caption (every object's size, color, shape,
        location) with probability ``scene_caption_ratio`` (always if ``full``), else the GenEval-style prompt
        caption, its unstated colors filled in from the scene with probability ``color_detail``."""
        hp = self.hparams
        scene = self.scenes[split][index]
        if full or rng.random() < hp.scene_caption_ratio:
            return self.tokenizer.encode(scene_caption(scene, rng))
        prompt = self.samples[split][index]
        if rng.random() < hp.color_detail:
            prompt = with_scene_colors(prompt, scene)
        return self.tokenizer.encode(caption(prompt, rng))

    def image_document(self, split: str, index: int, rng: np.random.Generator, train_layouts: bool = True) -> Document:
        """One image document for sample ``index`` of ``split``; layout (``batch.pair_document``) and phrasing drawn
        with ``rng``. ``train_layouts=False``: caption -> image with the full scene caption (the cond-gap pairs)."""
        latent = self.latents[split][index]
        ids = self.caption_ids(split, index, rng, full=not train_layouts)
        special = self.tokenizer.special  # bos / eos (this runs per training document)
        if not train_layouts:
            return caption_image_document(ids, self.image_segment(latent), special)
        return pair_document(ids, lambda t_max: self.image_segment(latent, t_max=t_max), rng, self.layout, special)

    def text_document(self, split: str, index: int) -> Document:
        sp = self.tokenizer.special
        ids = self.tokenizer.encode(self.world.text(split, index))[: self.hparams.seq_len - 2]
        return [Text([sp.bos] + ids + [sp.eos])]

    def random_row(self, split: str, rng: np.random.Generator, text_ratio: float | None = None) -> list[Document]:
        """Documents drawn at random until the row is full (three misses in a row end it); a fraction ``text_ratio``
        (default: ``text_ratio_effective``) of the draws are text-only documents."""
        hp = self.hparams
        if text_ratio is None:
            text_ratio = self.text_ratio_effective
        docs, used, misses = [], 0, 0
        while misses < 3:
            if rng.random() < text_ratio:
                doc = self.text_document(split, int(rng.integers(1 << 30)))
            else:
                doc = self.image_document(split, int(rng.integers(len(self.samples[split]))), rng)
            n = document_length(doc, self.patches_per_image)
            if used + n > hp.seq_len:
                misses += 1
                continue
            docs.append(doc)
            used += n
        return docs

    def cond_gap_pairs(self, split: str) -> list[tuple[Document, Document]]:
        """(true caption, shifted caption) caption->image documents for the first ``cond_gap_pairs`` images."""
        n = min(self.hparams.cond_gap_pairs, len(self.samples[split]))
        true = [self.image_document(split, i, np.random.default_rng([i]), train_layouts=False) for i in range(n)]
        return shifted_caption_pairs(true, np.random.default_rng([self.hparams.seed, _SPLIT_CODE[split], 7]))

    # ------------------------------------------------------------------------- evaluation (MixedModalData)
    def evaluation_split(self, stage: str) -> str:
        return "val" if stage == "val" else "test"

    def caption_documents(self, split: str, n: int) -> list[Document]:
        """Caption -> image documents of the first ``n`` images of ``split`` (captions phrased with a fixed seed)."""
        rng = np.random.default_rng([self.hparams.seed, 5])
        special = SpecialIds(**self.special_ids)
        return [caption_image_document(self.caption_ids(split, i, rng), self.image_segment(self.latents[split][i]),
                                       special) for i in range(min(n, len(self.samples[split])))]

    def text_documents(self, split: str, n: int) -> list[Document]:
        return [self.text_document(split, i) for i in range(n)]

    def heldout_images(self, split: str, n: int) -> np.ndarray:
        """uint8 [n', H, W, 3]: renders of the first ``n`` scenes of ``split``."""
        return np.stack([render(s) for s in self.scenes[split][:n]])

    def heldout_captions(self, split: str, n: int) -> list[str]:
        """Full scene captions of the first ``n`` scenes of ``split``."""
        rng = np.random.default_rng([self.hparams.seed, 6])
        return [scene_caption(s, rng) for s in self.scenes[split][:n]]

    # -------------------------------------------------------------------------------------- dataloaders
    def _collate_rows(self, rows: list[list[Document]]):
        sp = self.tokenizer.special
        return pack_rows(rows, self.hparams.seq_len, self.hparams.patch_size, sp)

    def _collate_pairs(self, pairs: list[tuple[Document, Document]]) -> CaptionPairs:
        # One document per row keeps images in the same order in both batches.
        return pack_pairs(pairs, self.hparams.patch_size, self.tokenizer.special)

    def _loader(self, dataset, shuffle: bool, collate, batch_size: int) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Training rows in stream order (each row is already a random draw): row ``k`` is a pure function of
        (seed, k), and a resumed run starts at the first row the checkpointed run had not consumed, so it sees
        exactly the rows the uninterrupted run would (Lightning shards the stream across DDP ranks)."""
        hp = self.hparams
        start = 0
        if self.trainer is not None:
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
            start = consumed * hp.batch_size * self.trainer.world_size
        rows = _Rows(self, "train", hp.rows_per_epoch, start=start)
        # Lightning cannot see that this loader resumes by itself (it restarts at `start`), and warns otherwise.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        return self._loader(rows, False, self._collate_rows, hp.batch_size)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [
            self._loader(_Rows(self, split, self.hparams.val_rows), False, self._collate_rows, self.hparams.batch_size),
            # 64 caption->image pairs per batch, one document per row
            self._loader(self.cond_gap_pairs(split), False, self._collate_pairs, 64),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")


def text_ratio_for_share(share: float, text_len: float, caption_len: float, image_len: float) -> float:
    """The fraction r of text-only documents that makes text a fraction ``share`` of the positions, where a text-only
    document holds ``text_len`` (text) positions and an image document ``caption_len`` text and ``image_len`` image
    positions on average: the root of ``share·(r·T + (1 - r)·(C + P)) = r·T + (1 - r)·C``. Raises ValueError when
    ``share`` is below ``C / (C + P)`` (image documents alone hold more text than that)."""
    excess = share * (caption_len + image_len) - caption_len  # text wanted beyond the captions, per image document
    if excess < 0:
        raise ValueError(f"share {share} is below {caption_len / (caption_len + image_len):.4f}, the text share of "
                         "image documents alone")
    return float(excess / (excess + (1 - share) * text_len))


def with_scene_colors(prompt: Prompt, scene: Scene) -> Prompt:
    """``prompt`` with every unstated item color filled in from the scene, where the scene's objects of
    that item share one color (objects follow the prompt's item order, ``count`` objects per item)."""
    items, i = [], 0
    for item in prompt.items:
        colors = {o.color for o in scene.objects[i : i + item.count]}
        i += item.count
        color = item.color if item.color is not None else (colors.pop() if len(colors) == 1 else None)
        items.append(Item(item.shape, color, item.count))
    return Prompt(prompt.family, tuple(items), prompt.relation)


class _Rows(Dataset):
    """Row ``start + i`` of a split: a pure function of (seed, split, position), so any sampler, worker or rank
    sees the same row for the same position."""

    def __init__(self, dm: ShapesDataModule, split: str, length: int, start: int = 0):
        self.dm, self.split, self.length, self.start = dm, split, length, start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[Document]:
        i += self.start  # the stream position this index stands for
        rng = np.random.default_rng([self.dm.hparams.seed, _SPLIT_CODE[self.split], 1, i])
        return self.dm.random_row(self.split, rng)
