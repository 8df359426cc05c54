"""PreparedDataModule: a prepared directory (``python -m lit_transfusion prepare``) streamed into packed batches.

Training streams each source's ``train`` split with litdata (shuffled chunks, several sources mixed by
``CombinedStreamingDataset``), turns every stored sample into one document and packs the documents of a batch
into rows of ``seq_len`` (first-fit decreasing). Documents, as in ``ShapesDataModule``:

- PAIR, caption -> image   ``<bos> caption <boi> image <eoi> <eos>``         (one of the stored captions)
- PAIR, image -> caption   ``<bos> <boi> image <eoi> caption <eos>``, t capped at ``noise_limit``
- PAIR, null caption       ``<bos> <boi> image <eoi> <eos>``, no LM loss on the empty caption (CFG)
- INTERLEAVED              ``<bos>`` text and images in their stored order ``<eos>``
- TEXT                     ``<bos> text <eos>``

Image latents are drawn from the stored posterior (mean + std * noise) of the image or of its stored horizontal
flip. Validation reads each source's ``val`` split into memory: packed rows for the losses, and caption->image
pairs with true and with shifted captions for ``val/cond_gap``.

Resume: the training loader is stateful; Lightning keeps its position in checkpoints and ``fit(ckpt_path=...)``
continues the stream after the last batch trained on, with the same shuffle and the same documents (caption,
layout, flip and latent noise are seeded by (seed, epoch, the batch's sample keys)). This is exact with
``num_workers=0`` or one training source. With several sources and worker processes litdata puts each source back
as if every worker had drawn from it in turn, which it need not have: a few samples near the resume point may then
be seen twice, or not at all, in that epoch.
"""

from __future__ import annotations

import hashlib
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset
from torch.utils.data import DataLoader

from datamodules.files.schema import IMAGE, INTERLEAVED, PAIR, TEXT, TOKENIZER, Manifest, Sample
from lit_transfusion.batch import (
    Batch,
    CaptionPairs,
    Document,
    Image,
    PairLayout,
    SpecialIds,
    Text,
    caption_image_document,
    document_length,
    greedy_rows,
    pack_pairs,
    pack_rows,
    pair_document,
    shifted_caption_pairs,
)
from lit_transfusion.data import PackingFromHparams
from lit_transfusion.errors import SettingError
from lit_transfusion.tokenizer import TextTokenizer
from lit_transfusion.vae import LatentCodec


class NoValidationData(SettingError):
    """The prepared directory holds no validation sample: a ValueError naming the settings that give it one. Being
    a SettingError, ``python -m lit_transfusion fit`` ends with it as one ``error:``
    line (exit status 2) although it is raised in ``setup``, inside ``trainer.fit``."""


class PreparedDataModule(PackingFromHparams, L.LightningDataModule):
    """Packed documents streamed from a prepared directory (a ``lit_transfusion.data.MixedModalData``).

    Args:
        data_dir: a directory written by ``python -m lit_transfusion prepare`` (``manifest.json``, ``tokenizer.json``
            and one litdata dataset per source and split).
        weights: training mix by source name. None: every training sample of every source once per epoch. With
            weights, each sample is drawn from a source chosen with these probabilities and the epoch ends when
            the first source runs out (litdata's ``CombinedStreamingDataset``); a source left out or given 0 is
            not trained on.
        seq_len: positions per packed row; at least the ``seq_len`` the data was prepared for.
        batch_size: rows per batch (a batch whose documents need more rows simply has more; none is dropped).
        patch_size: latent patch side (linked from the model's patch_size); at most as many patches per image as
            the data was prepared for.
        image_first_ratio: fraction of image-caption documents laid out image -> caption.
        caption_dropout: fraction of the other image-caption documents whose caption is dropped (CFG).
        noise_limit: max diffusion timestep for image-first documents.
        flip: use the stored horizontal flips (each image document picks the image or its flip at random).
        sample_latents: draw each latent from the stored posterior (mean + std * noise); False: the mean.
        shuffle: shuffle the training stream (chunks, then samples within them) anew every epoch.
        seed: seeds the shuffle and every random choice of a document (caption, layout, flip, latent noise).
        num_workers: DataLoader worker processes for training.
        val_samples: validation samples read per source (the first ones).
        cond_gap_pairs: validation caption->image pairs for ``val/cond_gap``.
        docs_per_batch: samples (documents) per training batch; None: about ``batch_size`` rows' worth, from the
            mean document length in the manifest.
    """

    def __init__(
        self,
        data_dir: str,
        weights: dict[str, float] | None = None,
        seq_len: PositiveInt = 128,
        batch_size: PositiveInt = 16,
        patch_size: PositiveInt = 2,
        image_first_ratio: ClosedUnitInterval = 0.2,
        caption_dropout: ClosedUnitInterval = 0.1,
        noise_limit: PositiveInt = 500,
        flip: bool = True,
        sample_latents: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        val_samples: PositiveInt = 512,
        cond_gap_pairs: PositiveInt = 256,
        docs_per_batch: PositiveInt | None = None,
    ):
        super().__init__()
        # Not merged into the logger's hparams: the module has a `seed` too (its noise stream) and Lightning refuses
        # equal keys with different values; the run's config.yaml records every data setting anyway.
        self.save_hyperparameters(logger=False)
        self.root = Path(data_dir)
        try:
            self._manifest = Manifest.read(self.root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.data_dir: {e}") from None
        except (ValueError, TypeError, KeyError) as e:  # a wrong version or a malformed manifest.json
            raise ValueError(f"data.data_dir: {e}") from None
        self._tokenizer = self._read_tokenizer()
        self._check_shapes(seq_len, patch_size)
        self.train_weights = self._check_weights(weights)
        self.layout = Layout(
            special=self._tokenizer.special, image_first_ratio=image_first_ratio, caption_dropout=caption_dropout,
            noise_limit=noise_limit, flip=flip and self._manifest.flip, sample_latents=sample_latents, seed=seed,
        )
        self.train_dataset = None
        self._train_loader: _TrainLoader | None = None
        self._eval: dict[str, list[Sample]] = {}  # split -> its samples, source after source
        self._warned_no_val = False

    # ----------------------------------------------------------------------------------------- checks
    def _read_tokenizer(self) -> TextTokenizer:
        path = self.root / TOKENIZER
        if not path.is_file():
            raise FileNotFoundError(f"data.data_dir: {str(path)!r} does not exist: a prepared directory holds the "
                                    "tokenizer its text was encoded with")
        sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
        if sha1 != self._manifest.tokenizer_sha1:
            raise ValueError(
                f"data.data_dir: {str(path)!r} does not match the tokenizer the data was prepared with (sha1 {sha1}, "
                f"manifest.json says {self._manifest.tokenizer_sha1}): the stored token ids would mean other text. "
                "Restore that tokenizer.json or prepare the data again"
            )
        return TextTokenizer.from_file(path)

    def _check_shapes(self, seq_len: int, patch_size: int) -> None:
        m = self._manifest
        _, h, w = m.latent_shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"model.patch_size={patch_size} must divide the latent grid {h}x{w} of the data in "
                             f"{str(self.root)!r}")
        if seq_len < m.seq_len:
            raise ValueError(f"data.seq_len={seq_len} is smaller than seq_len={m.seq_len} the data in "
                             f"{str(self.root)!r} was prepared for: its longest documents would not fit a row")
        prepared = (h // m.patch_size) * (w // m.patch_size)
        if self.patches_per_image > prepared:
            raise ValueError(
                f"model.patch_size={patch_size} gives {self.patches_per_image} patches per image, more than the "
                f"{prepared} of patch_size={m.patch_size} the data in {str(self.root)!r} was prepared for: its "
                f"longest documents would not fit a row (use patch_size >= {m.patch_size} or prepare the data again)"
            )

    def _check_weights(self, weights: dict[str, float] | None) -> dict[str, float] | None:
        """The sources to train on with their (unnormalised) weights; None: all, each sample once an epoch."""
        trainable = [name for name, s in self._manifest.sources.items() if "train" in s.splits]
        if weights is None:
            if not trainable:
                raise ValueError(f"data.data_dir: no source in {str(self.root)!r} has a train split")
            return None
        known = sorted(self._manifest.sources)
        unknown = sorted(set(weights) - set(known))
        if unknown:
            raise ValueError(f"data.weights names unknown sources {unknown}; the sources of {str(self.root)!r} are "
                             f"{known}")
        if any(not np.isfinite(v) or v < 0 for v in weights.values()):
            raise ValueError(f"data.weights must be finite and >= 0, got {weights}")
        untrainable = sorted(n for n, v in weights.items() if v > 0 and n not in trainable)
        if untrainable:
            raise ValueError(f"data.weights gives weight to sources without a train split: {untrainable}")
        chosen = {name: float(v) for name, v in weights.items() if v > 0}
        if not chosen:
            raise ValueError(f"data.weights leaves no source to train on: {weights}")
        return chosen

    # ---------------------------------------------------------------------- what the model is linked to
    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        return vars(self._tokenizer.special).copy()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self._manifest.latent_shape)

    @property
    def image_size(self) -> int:
        return self._manifest.image_size

    @property
    def patches_per_image(self) -> int:
        _, h, w = self._manifest.latent_shape
        p = self.hparams.patch_size
        return (h // p) * (w // p)

    def image_codec(self) -> LatentCodec:
        """The VAE the latents were encoded with (loaded here)."""
        return LatentCodec.from_dir(self.vae_path)

    @property
    def vae_path(self) -> str:
        """The VAE the latents were encoded with (decode them with ``LatentCodec.from_dir(vae_path)``)."""
        path = Path(self._manifest.vae_path)
        if not path.is_absolute() and not path.exists() and (self.root / path).exists():
            return str(self.root / path)
        return str(path)

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Build the training stream (fit) and read the evaluation samples. Called in every process: under DDP
        litdata splits the stream by the rank it finds here. Raises :class:`NoValidationData` for fit, validate
        and test when there is no validation sample, before any training step."""
        if stage in ("fit", "validate", "test"):
            self._check_validation(stage)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._train_dataset()
        if stage in (None, "fit", "validate", "test"):
            self.eval_samples("val")

    def _check_validation(self, stage: str) -> None:
        """Refuse a ``stage`` without validation samples: Lightning would train without a single evaluation, saying
        only "Total length of `list` across ranks is zero". A fit with ``trainer.limit_val_batches: 0`` asked for
        no validation and goes ahead."""
        if self.eval_samples("val"):
            return
        stage = getattr(stage, "value", stage)  # the Trainer passes a TrainerFn (a str enum), printed as its name
        if stage == "fit" and self.trainer is not None and self.trainer.limit_val_batches == 0:
            return
        lacking = ", ".join(f"{name!r}" + (" (val_fraction: 0)" if info.validation == "none" else "")
                            for name, info in self._manifest.sources.items())
        hint = ", or set trainer.limit_val_batches: 0 to train without validation" if stage == "fit" else ""
        raise NoValidationData(
            f"data.data_dir: {str(self.root)!r} holds no validation sample (no val split in {lacking}), so {stage} "
            "would run without evaluation: prepare the data again with held-out samples (prepare's val_fraction, "
            f"default 0.05, or a source's val_path or val_fraction > 0){hint}")

    def _train_dataset(self) -> StreamingDataset | CombinedStreamingDataset:
        hp = self.hparams
        names = list(self.train_weights or
                     [n for n, s in self._manifest.sources.items() if "train" in s.splits])
        # Under DDP every rank must run the same number of steps (a rank that runs out first would leave the others
        # waiting in the gradient all-reduce). litdata never repeats samples to even the ranks out: with drop_last
        # each rank gets the same whole number of batches, so up to world_size * docs_per_batch - 1 samples of each
        # source are left out of an epoch (different ones each epoch when shuffling). One process drops nothing.
        drop_last = _world_size() > 1
        datasets = [StreamingDataset(str(self.root / self._manifest.sources[n].splits["train"].dir),
                                     shuffle=hp.shuffle, seed=hp.seed, drop_last=drop_last) for n in names]
        if len(datasets) == 1:
            return datasets[0]
        if self.train_weights is None:
            return CombinedStreamingDataset(datasets, seed=hp.seed, iterate_over_all=True)
        return CombinedStreamingDataset(datasets, seed=hp.seed, weights=[self.train_weights[n] for n in names],
                                        iterate_over_all=False)

    def default_docs_per_batch(self) -> int:
        """About ``batch_size`` rows' worth of documents: batch_size * seq_len / (mean positions per document),
        the mean taken over the training sources in their mix (by sample count, or by weight) from the
        manifest's counts: per sample, the text tokens one use of it holds (a PAIR sample: one of its captions)
        + <bos> <eos> + (patches + 2) per image. Packing adds a row rather than drop a document, so a batch that
        comes out longer than the mean has ``batch_size + 1`` rows."""
        hp = self.hparams
        mix = self.train_weights or {n: float(s.splits["train"].samples) for n, s in self._manifest.sources.items()
                                     if "train" in s.splits}
        mean, total = 0.0, sum(mix.values())
        for name, w in mix.items():
            info = self._manifest.sources[name].splits["train"]
            n = max(info.samples, 1)
            text = info.tokens_per_use or info.tokens  # older manifests: every caption counted (fewer documents)
            mean += w / total * (text / n + 2 + info.images / n * (self.patches_per_image + 2))
        return max(1, round(hp.batch_size * hp.seq_len / max(mean, 1.0)))

    # -------------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> StreamingDataLoader:
        hp = self.hparams
        if self.train_dataset is None:
            self.setup("fit")
        collate = PackCollate(self.layout, hp.seq_len, hp.patch_size, self.patches_per_image)
        # Workers start anew every epoch (not persistent): each gets the collate of its epoch. Epochs of streamed
        # data are long, so the start-up is a small price.
        self._train_loader = _TrainLoader(
            self.train_dataset, batch_size=hp.docs_per_batch or self.default_docs_per_batch(), collate_fn=collate,
            num_workers=hp.num_workers,
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # A training batch on its way to the step: the loader's checkpointed position moves past it.
        if isinstance(batch, Batch) and "stream_state" in batch.meta:
            state = batch.meta.pop("stream_state")
            if self._train_loader is not None:
                self._train_loader.taken(state)
        return batch

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        hp = self.hparams
        samples = self.eval_samples(split)
        if not samples:
            if not self._warned_no_val:
                warnings.warn(f"{str(self.root)!r} has no {split} split: no validation losses", stacklevel=2)
                self._warned_no_val = True
            return []
        # The same layouts, flips and latent noise at every evaluation: sample i draws from (seed, i).
        docs = [document(s, np.random.default_rng([hp.seed, i]), self.layout) for i, s in enumerate(samples)]
        rows = greedy_rows(docs, hp.seq_len, self.patches_per_image)
        sp = self._tokenizer.special
        loaders = [DataLoader(rows, batch_size=hp.batch_size, shuffle=False,
                              collate_fn=_PackRows(hp.seq_len, hp.patch_size, sp))]
        pairs = self.cond_gap_pairs(split)
        if pairs:  # a caption of another image needs another image
            # One document per row keeps images in the same order in both batches.
            loaders.append(DataLoader(pairs, batch_size=64, shuffle=False, collate_fn=_PackPairs(hp.patch_size, sp)))
        return loaders

    def cond_gap_pairs(self, split: str) -> list[tuple[Document, Document]]:
        """(true caption, shifted caption) caption->image documents of the first ``cond_gap_pairs`` PAIR samples."""
        captions = self.caption_documents(split, self.hparams.cond_gap_pairs)
        return shifted_caption_pairs(captions, np.random.default_rng([self.hparams.seed, 7]))

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    # ------------------------------------------------------------------------- evaluation (MixedModalData)
    def evaluation_split(self, stage: str) -> str:
        return "val"  # prepared data holds no test split: test evaluates "val" too

    def eval_samples(self, split: str = "val") -> list[Sample]:
        """The first ``val_samples`` samples of each source's ``split``, source after source (read once)."""
        if split not in self._eval:
            out = []
            for info in self._manifest.sources.values():
                if split not in info.splits:
                    continue
                ds = StreamingDataset(str(self.root / info.splits[split].dir), shuffle=False)
                out += [Sample.from_item(ds[i]) for i in range(min(len(ds), self.hparams.val_samples))]
            self._eval[split] = out
        return self._eval[split]

    def _pairs(self, split: str, n: int) -> list[Sample]:
        return [s for s in self.eval_samples(split) if s.kind == PAIR][:n]

    def caption_documents(self, split: str, n: int) -> list[Document]:
        """Caption -> image documents of the first ``n`` PAIR samples of ``split``: ``<bos>`` + first caption,
        the clean latent mean of the unflipped image, ``<eos>``."""
        return [caption_document(s, self._tokenizer.special) for s in self._pairs(split, n)]

    def text_documents(self, split: str, n: int) -> list[Document]:
        """The first ``n`` TEXT and INTERLEAVED samples of ``split`` as documents (images as clean means)."""
        samples = [s for s in self.eval_samples(split) if s.kind in (TEXT, INTERLEAVED)][:n]
        return [clean_document(s, self._tokenizer.special) for s in samples]

    def heldout_images(self, split: str, n: int) -> np.ndarray:
        """uint8 [n', H, W, 3]: the stored pixels of the first ``n`` PAIR samples of ``split`` (n' <= n)."""
        samples = self._pairs(split, n)
        missing = [s.key for s in samples if s.pixels is None]
        if missing:
            raise ValueError(f"{split} samples of {str(self.root)!r} carry no pixels (e.g. {missing[0]!r}): only "
                             "validation splits written by prepare store them")
        size = self.image_size
        if not samples:
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        return np.stack([np.asarray(s.pixels[0], dtype=np.uint8) for s in samples])

    def heldout_captions(self, split: str, n: int) -> list[str]:
        """The decoded first caption of each sample of ``heldout_images(split, n)``."""
        return [self._tokenizer.decode(_first_caption(s)) for s in self._pairs(split, n)]


# ------------------------------------------------------------------------------------------- documents
@dataclass
class Layout:
    """What turning a stored sample into a training document needs (picklable: it travels to workers); the
    fields are the PreparedDataModule arguments of the same names (``flip`` off when the data has no flips)."""

    special: SpecialIds
    image_first_ratio: float
    caption_dropout: float
    noise_limit: int
    flip: bool
    sample_latents: bool
    seed: int = 0

    @property
    def pairs(self) -> PairLayout:
        """The paper's pair layouts with this data's ratios (``batch.pair_document``)."""
        return PairLayout(self.image_first_ratio, self.caption_dropout, self.noise_limit)


def latent(sample: Sample, i: int, rng: np.random.Generator, flip: bool, noisy: bool) -> torch.Tensor:
    """float32 [C, h, w]: image ``i`` of ``sample``, or its stored flip (``flip``: one of the stored versions
    at random), drawn from the posterior (``noisy``: mean + exp(logvar / 2) * N(0, 1)) or its mean."""
    versions = sample.mean.shape[1]
    f = int(rng.integers(versions)) if flip and versions > 1 else 0
    mean = sample.mean[i, f].astype(np.float32)
    if noisy:
        std = np.exp(sample.logvar[i, f].astype(np.float32) / 2)
        mean = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(mean))


def document(sample: Sample, rng: np.random.Generator, layout: Layout, noisy: bool | None = None) -> Document:
    """One training document of ``sample`` (layout, caption, flip and latent noise drawn with ``rng``);
    ``noisy`` overrides ``layout.sample_latents``."""
    sp = layout.special
    noisy = layout.sample_latents if noisy is None else noisy
    if sample.kind == PAIR:
        captions = sample.texts()
        ids = captions[int(rng.integers(len(captions)))].tolist() if captions else []
        lat = latent(sample, 0, rng, layout.flip, noisy)
        return pair_document(ids, lambda t_max: Image(lat, t_max=t_max), rng, layout.pairs, sp)
    if sample.kind == INTERLEAVED:
        return _interleaved(sample, sp, lambda i: latent(sample, i, rng, layout.flip, noisy))
    if sample.kind == TEXT:
        return [Text([sp.bos] + sample.tokens.tolist() + [sp.eos])]
    raise ValueError(f"sample {sample.key!r}: kind {sample.kind} is not PAIR, INTERLEAVED or TEXT")


def _interleaved(sample: Sample, sp: SpecialIds, image) -> Document:
    """``<bos>`` + segments in order + ``<eos>``; ``image(i)`` gives the latent of image ``i``."""
    doc: Document = []
    text, start, n_image = [sp.bos], 0, 0
    for n in sample.segments.tolist():
        if n == IMAGE:
            if text:
                doc.append(Text(text))
            doc.append(Image(image(n_image)))
            text, n_image = [], n_image + 1
        else:
            text = text + sample.tokens[start : start + n].tolist()
            start += n
    doc.append(Text(text + [sp.eos]))
    return doc


def caption_document(sample: Sample, sp: SpecialIds) -> Document:
    """``<bos>`` first caption, the unflipped clean image, ``<eos>`` (a PAIR sample)."""
    image = Image(torch.from_numpy(sample.mean[0, 0].astype(np.float32)))
    return caption_image_document(_first_caption(sample), image, sp)


def _first_caption(sample: Sample) -> list[int]:
    captions = sample.texts()
    return captions[0].tolist() if captions else []


def clean_document(sample: Sample, sp: SpecialIds) -> Document:
    """A TEXT or INTERLEAVED sample as its document with each image the mean of its unflipped version."""
    if sample.kind == TEXT:
        return [Text([sp.bos] + sample.tokens.tolist() + [sp.eos])]
    return _interleaved(sample, sp, lambda i: torch.from_numpy(sample.mean[i, 0].astype(np.float32)))


def first_fit_decreasing(docs: list[Document], seq_len: int, patches_per_image: int) -> list[list[Document]]:
    """Rows of documents, longest first, each into the first row with room (fewer rows than in stream order)."""
    order = sorted(range(len(docs)), key=lambda i: -document_length(docs[i], patches_per_image))
    return greedy_rows([docs[i] for i in order], seq_len, patches_per_image)


# ------------------------------------------------------------------------------------------- collation
class PackCollate:
    """litdata items -> one packed :class:`Batch` with ``meta["keys"]`` (the samples' keys, in stream order).

    Its random choices come from a numpy Generator seeded by (seed, epoch, the batch's keys): workers and ranks
    differ because their samples do, the same sample is drawn anew every epoch, and a run resumed from a
    checkpoint builds exactly the batches the uninterrupted run built. ``epoch`` is set by the loader."""

    def __init__(self, layout: Layout, seq_len: int, patch_size: int, patches_per_image: int):
        self.layout, self.seq_len, self.patch_size = layout, seq_len, patch_size
        self.patches_per_image = patches_per_image
        self.epoch = 0

    def __call__(self, items: list[dict]) -> Batch:
        samples = [Sample.from_item(item) for item in items]
        keys = [s.key for s in samples]
        rng = np.random.default_rng([self.layout.seed, self.epoch, zlib.crc32("\n".join(keys).encode())])
        docs = [document(s, rng, self.layout) for s in samples]
        rows = first_fit_decreasing(docs, self.seq_len, self.patches_per_image)
        batch = pack_rows(rows, self.seq_len, self.patch_size, self.layout.special)
        batch.meta["keys"] = keys
        return batch


class _PackRows:
    def __init__(self, seq_len: int, patch_size: int, special: SpecialIds):
        self.seq_len, self.patch_size, self.special = seq_len, patch_size, special

    def __call__(self, rows: list[list[Document]]) -> Batch:
        return pack_rows(rows, self.seq_len, self.patch_size, self.special)


class _PackPairs:
    def __init__(self, patch_size: int, special: SpecialIds):
        self.patch_size, self.special = patch_size, special

    def __call__(self, pairs: list[tuple[Document, Document]]) -> CaptionPairs:
        return pack_pairs(pairs, self.patch_size, self.special)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _TrainLoader(StreamingDataLoader):
    """A StreamingDataLoader that tells its collate the epoch it is in, and whose checkpointed state is its
    position after the last batch training took.

    The epoch is set before each epoch's iterator (so before its workers start) and restored with the loader's
    state on resume. The position: Lightning stores ``state_dict()`` in checkpoints, but when a loader has no
    length (a weighted mix) it fetches one batch ahead, and litdata's own state would count that unused batch, so
    a resumed run would skip it. Every batch therefore carries the loader's state after it
    (``meta["stream_state"]``), and :meth:`PreparedDataModule.on_before_batch_transfer` hands that back when the
    batch goes to training."""

    _taken: dict | None = None

    def _get_iterator(self):
        self.collate_fn.collate_fn.epoch = self.current_epoch  # the loader wraps the collate it was given
        return super()._get_iterator()

    def __iter__(self):
        for batch in super().__iter__():
            batch.meta["stream_state"] = StreamingDataLoader.state_dict(self)
            yield batch

    def taken(self, state: dict) -> None:
        """Training took the batch whose ``meta["stream_state"]`` is ``state``."""
        self._taken = state

    def state_dict(self) -> dict:
        return self._taken if self._taken is not None else super().state_dict()

    def load_state_dict(self, obj: dict) -> None:
        self._taken = None
        super().load_state_dict(obj)
