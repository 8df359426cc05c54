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
from dataclasses import dataclass, field, fields
from typing import Sequence, Union

import torch
from torch import Tensor

IGNORE = -100  # target value meaning "no LM loss here" (torch's cross_entropy default ignore_index)


@dataclass
class SpecialIds:
    """Ids of the special tokens every tokenizer of the project provides."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int


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


Segment = Union[Text, Image]
Document = list  # list[Segment]


@dataclass
class Batch:
    """Packed rows. ``B`` rows of ``L`` positions; ``N`` images over the whole batch.

    tokens     [B, L] long   text ids; ``<boi>``/``<eoi>`` around images; pad id at patch positions and pads
    targets    [B, L] long   next-token id to predict at this position, ``IGNORE`` for no LM loss
    image_ids  [B, L] long   index into ``latents`` at patch positions; -1 elsewhere (<boi>/<eoi> are text)
    patch_ids  [B, L] long   -1 for text, else raster index of the patch within its image
    doc_ids    [B, L] long   document index within the row, -1 for pads
    positions  [B, L] long   position within the document (RoPE resets per document)
    latents    [N, C, h, w]  clean, standardized latents, numbered in row-major order of appearance
    t_max      [N] long      per-image cap on the training timestep
    """

    tokens: Tensor
    targets: Tensor
    image_ids: Tensor
    patch_ids: Tensor
    doc_ids: Tensor
    positions: Tensor
    latents: Tensor
    t_max: Tensor
    meta: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)

    @property
    def num_images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def image_mask(self) -> Tensor:
        """[B, L] bool, True at patch positions."""
        return self.image_ids >= 0


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
        tokens=as_long(tokens),
        targets=as_long(targets),
        image_ids=as_long(image_ids),
        patch_ids=as_long(patch_ids),
        doc_ids=as_long(doc_ids),
        positions=as_long(positions),
        latents=lat,
        t_max=torch.tensor(t_max, dtype=torch.long),
    )


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
