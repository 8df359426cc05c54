"""The Batch contract: documents of text and images -> packed tensors.

A *document* is an ordered list of segments. A text segment is a list of token ids; an image segment is a
clean latent ``[C, h, w]``. Packing lays one image out as ``<boi> p_1 ... p_N <eoi>`` (patches in raster
order) and puts several documents in one row; the attention mask, the loss routing and generation all
derive from the resulting tensors.

Loss bookkeeping (the paper's):
- a position carries an LM target iff it is text (or the ``<eoi>`` closing an image), the next position is
  in the same document and is text or ``<boi>`` -- so the position whose target is ``<boi>`` IS trained;
- no LM loss at the ``<boi>`` input, at patch positions (``<eoi>`` is appended, never sampled), at pads,
  nor for text segments marked ``loss=False`` (the null caption used for classifier-free guidance);
- diffusion loss is per image (every image in ``latents`` is noised and predicted).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

IGNORE = -100  # target value meaning "no LM loss here" (torch's cross_entropy default ignore_index)


@dataclass
class SpecialIds:
    """Ids of the special tokens every tokenizer of the project provides. ``first_code``: where a discrete-token
    (Chameleon-style) vocabulary puts image code 0, after every text id (codes are ``first_code + 0..K-1``); -1 for
    the continuous-image (Transfusion) data, which has no image codes."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    first_code: int = -1


@dataclass
class Text:
    """A run of text token ids. ``loss=False`` trains nothing on these positions (e.g. a null caption)."""

    ids: list[int]
    loss: bool = True


@dataclass
class Image:
    """A clean image latent ``[C, h, w]``. ``t_max`` caps the diffusion timestep sampled for it in training
    (1000 normally; 500 for image-first captioning, the paper's "noise limiting")."""

    latent: Tensor
    t_max: int = 1000


Segment = Text | Image
Document = list  # list[Segment]


def code_segment(codes: Tensor, special: SpecialIds) -> Text:
    """An image's VQ codes [h, w] or [1, h, w] (raster order, 0..K-1) -> the text segment ``<boi> codes <eoi>``
    (the discrete-token baseline's image: codes are ids ``first_code + k`` after the text vocabulary)."""
    ids = (codes.flatten().long() + special.first_code).tolist()
    return Text([special.boi, *ids, special.eoi])


# What a left pad (or any filler position) holds in each per-position field: its own "document" (-1), no image.
_FILL = {"tokens": 0, "positions": 0, "doc_ids": -1, "image_ids": -1, "patch_ids": -1}


@dataclass
class Seq:
    """The per-position fields of ``B`` packed rows of ``L`` positions, each ``[B, L]`` long.

    tokens     text ids; ``<boi>``/``<eoi>`` around images; pad id at patch positions and pads
    positions  position within the document (RoPE resets per document)
    doc_ids    document index within the row, -1 for pads
    image_ids  index into the batch's latents at patch positions; -1 elsewhere (<boi>/<eoi> are text)
    patch_ids  -1 for text, else raster index of the patch within its image

    The model, the attention mask, the training batch and the generation state all speak in this type, so
    the fields travel together and cannot be swapped.
    """

    tokens: Tensor
    positions: Tensor
    doc_ids: Tensor
    image_ids: Tensor
    patch_ids: Tensor

    def map(self, fn) -> Seq:
        """A new Seq with ``fn(name, tensor)`` applied to every field."""
        return Seq(**{f.name: fn(f.name, getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str) -> Seq:
        return self.map(lambda _, x: x.to(device, non_blocking=True))

    def cat(self, other: Seq) -> Seq:
        """Positions of ``other`` after those of ``self`` (along L)."""
        return self.map(lambda name, x: torch.cat([x, getattr(other, name)], 1))

    def left_pad(self, n: int) -> Seq:
        """``n`` filler positions in front of every row (their own document: invisible to real positions)."""
        return self.map(lambda name, x: torch.nn.functional.pad(x, (n, 0), value=_FILL[name]))

    def shift_images(self, offset: int) -> Seq:
        """Image ids moved past ``offset`` earlier images (stacking rows whose latents are concatenated)."""
        return self.map(lambda name, x: torch.where(x >= 0, x + offset, x) if name == "image_ids" else x)

    @staticmethod
    def stack(seqs: Sequence[Seq]) -> Seq:
        """Rows of several Seqs of the same length in one (along B)."""
        return Seq(**{f.name: torch.cat([getattr(s, f.name) for s in seqs]) for f in fields(Seq)})

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    @property
    def image_mask(self) -> Tensor:
        """[B, L] bool, True at patch positions."""
        return self.image_ids >= 0


@dataclass
class Batch:
    """Packed rows for training: ``B`` rows of ``L`` positions; ``N`` images over the whole batch.

    seq        the per-position fields (:class:`Seq`)
    targets    [B, L] long   next-token id to predict at this position, ``IGNORE`` for no LM loss
    latents    [N, C, h, w]  clean, standardized latents, numbered in row-major order of appearance
    t_max      [N] long      per-image cap on the training timestep
    """

    seq: Seq
    targets: Tensor
    latents: Tensor
    t_max: Tensor
    meta: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(seq=self.seq.to(device), targets=self.targets.to(device, non_blocking=True),
                     latents=self.latents.to(device, non_blocking=True),
                     t_max=self.t_max.to(device, non_blocking=True), meta=self.meta)

    @property
    def num_images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class CaptionPairs:
    """Caption->image documents packed twice with the same images in the same order: once with each image's
    own caption, once with another image's (``val/cond_gap``: does the caption change the predicted noise?)."""

    true: Batch
    shuffled: Batch

    def to(self, device: torch.device | str) -> CaptionPairs:
        return CaptionPairs(self.true.to(device), self.shuffled.to(device))


def document_length(doc: Sequence[Segment], patches_per_image: int) -> int:
    """Number of positions a document occupies once packed."""
    n = 0
    for seg in doc:
        n += len(seg.ids) if isinstance(seg, Text) else patches_per_image + 2
    return n


def pack_rows(
    rows: Sequence[Sequence[Document]],
    seq_len: int,
    patch_size: int,
    special: SpecialIds,
) -> Batch:
    """Pack ``rows`` (each a list of documents that fit in ``seq_len``) into one :class:`Batch`.

    Documents are laid out left to right and the rest of each row is padding. Raises ``ValueError`` if a
    row overflows ``seq_len`` or an image's latent grid is not divisible by ``patch_size``.
    """
    B, L = len(rows), seq_len
    # Built as Python lists and turned into tensors once per batch (this runs in the training loop).
    tokens = [[special.pad] * L for _ in range(B)]
    targets = [[IGNORE] * L for _ in range(B)]
    image_ids = [[-1] * L for _ in range(B)]
    patch_ids = [[-1] * L for _ in range(B)]
    doc_ids = [[-1] * L for _ in range(B)]
    positions = [[0] * L for _ in range(B)]
    latents: list[Tensor] = []
    t_max: list[int] = []

    for b, docs in enumerate(rows):
        cursor = 0
        for d, doc in enumerate(docs):
            # Per-position description of the document, then written into the row in one go.
            ids: list[int] = []
            img: list[int] = []
            pid: list[int] = []
            trainable: list[bool] = []  # may this position carry a target?
            for seg in doc:
                if isinstance(seg, Text):
                    ids += list(seg.ids)
                    img += [-1] * len(seg.ids)
                    pid += [-1] * len(seg.ids)
                    trainable += [seg.loss] * len(seg.ids)
                elif isinstance(seg, Image):
                    _, h, w = seg.latent.shape
                    if h % patch_size or w % patch_size:
                        raise ValueError(
                            f"latent grid {h}x{w} is not divisible by patch_size={patch_size}"
                        )
                    n_patch = (h // patch_size) * (w // patch_size)
                    index = len(latents)
                    latents.append(seg.latent)
                    t_max.append(int(seg.t_max))
                    ids += [special.boi] + [special.pad] * n_patch + [special.eoi]
                    img += [-1] + [index] * n_patch + [-1]
                    pid += [-1] + list(range(n_patch)) + [-1]
                    # <boi> input: no loss; patches: no loss; <eoi> predicts the following text.
                    trainable += [False] + [False] * n_patch + [True]
                else:
                    raise TypeError(f"document segment must be Text or Image, got {type(seg).__name__}")
            n = len(ids)
            if cursor + n > L:
                raise ValueError(f"row {b} needs {cursor + n} positions but seq_len={L}")
            sl = slice(cursor, cursor + n)
            tokens[b][sl] = ids
            image_ids[b][sl] = img
            patch_ids[b][sl] = pid
            doc_ids[b][sl] = [d] * n
            positions[b][sl] = range(n)
            for i in range(n - 1):
                # The next position must be text or <boi> (never a patch, never <eoi>).
                if trainable[i] and img[i + 1] == -1 and ids[i + 1] != special.eoi:
                    targets[b][cursor + i] = ids[i + 1]
            cursor += n

    if latents:
        lat = torch.stack(latents)
    else:  # keep C/h/w unknown-but-valid: a text-only batch has zero images
        lat = torch.zeros((0, 1, patch_size, patch_size))
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    return Batch(
        seq=Seq(tokens=as_long(tokens), positions=as_long(positions), doc_ids=as_long(doc_ids),
                image_ids=as_long(image_ids), patch_ids=as_long(patch_ids)),
        targets=as_long(targets),
        latents=lat,
        t_max=torch.tensor(t_max, dtype=torch.long),
    )


def pack_pairs(pairs: Sequence[tuple[Document, Document]], patch_size: int, special: SpecialIds) -> CaptionPairs:
    """(true-caption, shuffled-caption) documents -> :class:`CaptionPairs`, one document per row, both
    batches padded to the longest document of either."""
    patches = _patches_per_image(pairs[0][0], patch_size)
    n = max(document_length(d, patches) for pair in pairs for d in pair)
    return CaptionPairs(
        true=pack_rows([[p[0]] for p in pairs], n, patch_size, special),
        shuffled=pack_rows([[p[1]] for p in pairs], n, patch_size, special),
    )


def _patches_per_image(doc: Document, patch_size: int) -> int:
    for seg in doc:
        if isinstance(seg, Image):
            _, h, w = seg.latent.shape
            return (h // patch_size) * (w // patch_size)
    return 0


def greedy_rows(docs: Sequence[Document], seq_len: int, patches_per_image: int) -> list[list[Document]]:
    """First-fit packing of documents (in order) into rows of ``seq_len``; a document longer than a row is
    an error (truncating would cut an image in half)."""
    rows: list[list[Document]] = []
    free: list[int] = []
    for doc in docs:
        n = document_length(doc, patches_per_image)
        if n > seq_len:
            raise ValueError(f"a document of {n} positions does not fit in seq_len={seq_len}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(doc)
                free[r] -= n
                break
        else:
            rows.append([doc])
            free.append(seq_len - n)
    return rows


# ---------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class PairLayout:
    """How an (image, caption) pair becomes a training document (the paper's three layouts, drawn in this order):

    image first      ``<bos> <boi> image <eoi> caption <eos>``, t capped at ``noise_limit``  (``image_first_ratio``)
    null caption     ``<bos> <boi> image <eoi> <eos>``, no LM loss on the empty caption (CFG) (``caption_dropout``
                     of the rest)
    caption -> image ``<bos> caption <boi> image <eoi> <eos>``                                (the rest)
    """

    image_first_ratio: float = 0.2
    caption_dropout: float = 0.1
    noise_limit: int = 500


def caption_image_document(caption: list[int], image: Segment, special: SpecialIds) -> Document:
    """``<bos> caption <boi> image <eoi> <eos>``: the generation layout (evaluation, cond-gap pairs)."""
    return [Text([special.bos] + list(caption)), image, Text([special.eos])]


def pair_document(caption: list[int], image, rng, layout: PairLayout, special: SpecialIds) -> Document:
    """One of ``layout``'s documents for a pair, drawn with ``rng`` (a numpy Generator: one draw for image-first,
    then one for dropout). ``image(t_max)`` gives the image segment whose training timestep is capped at ``t_max``
    (an ``Image``, or the code run of the discrete-token baseline, which ignores it)."""
    if rng.random() < layout.image_first_ratio:
        return [Text([special.bos]), image(layout.noise_limit), Text(list(caption) + [special.eos])]
    if rng.random() < layout.caption_dropout:
        return [Text([special.bos], loss=False), image(1000), Text([special.eos])]
    return caption_image_document(caption, image(1000), special)


def shifted_caption_pairs(docs: Sequence[Document], rng) -> list[tuple[Document, Document]]:
    """(true, shuffled) pairs for ``val/cond_gap`` from caption -> image documents: document ``i`` with the caption
    (first segment) of document ``(i + s) % n``, one shift ``s`` in [1, n) drawn with ``rng``, so no image keeps its
    own caption. Fewer than two documents: no pairs."""
    n = len(docs)
    if n < 2:
        return []
    shift = int(rng.integers(1, n))
    return [(doc, [docs[(i + shift) % n][0], *doc[1:]]) for i, doc in enumerate(docs)]
