"""The Transfusion attention mask, one definition in two renderings.

    allowed(q, k) = same_doc(q, k) and (k <= q or image_id[q] == image_id[k] != -1)    (image_attention="bidirectional")
    allowed(q, k) = same_doc(q, k) and k <= q                                           (image_attention="causal")

Causal everywhere, bidirectional among the patches of one image (the paper's choice; "causal" is its Table 5
ablation, where a patch sees only the earlier patches of its image), and no attention across the documents
packed into one row. Pads (doc id -1) form one causal "document" of their own, so no row of the mask is
empty (an all-False row would make softmax NaN).

- :func:`dense_mask` gives a ``[B, 1, Lq, Lk]`` bool tensor for ``F.scaled_dot_product_attention``
  (CPU, and any device as a fallback; memory O(L^2) per row).
- :func:`block_mask` gives a flex-attention ``BlockMask`` (CUDA: sparse, skips fully-masked blocks).

Both accept a key-side prefix (a KV cache): keys ``0..Lk-1`` and queries at the last ``Lq`` of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMAGE_ATTENTION = ("bidirectional", "causal")


def check_image_attention(image_attention: str) -> None:
    """Raise a ValueError naming the setting unless it is one of ``IMAGE_ATTENTION``."""
    if image_attention not in IMAGE_ATTENTION:
        expected = " or ".join(map(repr, IMAGE_ATTENTION))
        raise ValueError(f"image_attention={image_attention!r}: expected {expected}")


def dense_mask(
    doc_ids: Tensor,
    image_ids: Tensor,
    q_doc_ids: Tensor | None = None,
    q_image_ids: Tensor | None = None,
    image_attention: str = "bidirectional",
) -> Tensor:
    """Boolean attention mask ``[B, 1, Lq, Lk]`` (True = may attend).

    Args:
        doc_ids, image_ids: ``[B, Lk]`` for all key positions (cache prefix + current positions).
        q_doc_ids, q_image_ids: ``[B, Lq]`` for the queries, which are the LAST ``Lq`` key positions;
            default: the queries are all positions (``Lq == Lk``).
        image_attention: "bidirectional" (patches of one image see each other) or "causal" (k <= q only).
    """
    check_image_attention(image_attention)
    if q_doc_ids is None:
        q_doc_ids, q_image_ids = doc_ids, image_ids
    Lq, Lk = q_doc_ids.shape[1], doc_ids.shape[1]
    q_pos = torch.arange(Lk - Lq, Lk, device=doc_ids.device)[:, None]  # [Lq, 1]
    k_pos = torch.arange(Lk, device=doc_ids.device)[None, :]  # [1, Lk]
    same_doc = q_doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, Lq, Lk]
    visible = k_pos <= q_pos  # [Lq, Lk]
    if image_attention == "bidirectional":
        same_image = (q_image_ids[:, :, None] == image_ids[:, None, :]) & (q_image_ids[:, :, None] >= 0)
        visible = visible | same_image  # [B, Lq, Lk]
    return (same_doc & visible)[:, None]


def flex_mask_mod(doc_ids: Tensor, image_ids: Tensor, offset: int = 0, image_attention: str = "bidirectional"):
    """The rule as a flex-attention ``mask_mod(b, h, q, k)``; query ``q`` sits at key position ``q + offset``."""
    check_image_attention(image_attention)

    def causal_mod(b, h, q, k):
        qq = q + offset
        return (doc_ids[b, qq] == doc_ids[b, k]) & (k <= qq)

    def bidirectional_mod(b, h, q, k):
        qq = q + offset
        same_doc = doc_ids[b, qq] == doc_ids[b, k]
        same_image = (image_ids[b, qq] == image_ids[b, k]) & (image_ids[b, qq] >= 0)
        return same_doc & ((k <= qq) | same_image)

    return bidirectional_mod if image_attention == "bidirectional" else causal_mod


def block_mask(
    doc_ids: Tensor,
    image_ids: Tensor,
    q_len: int | None = None,
    block_size: int = 128,
    image_attention: str = "bidirectional",
):
    """Flex-attention ``BlockMask`` with the same rule as :func:`dense_mask`.

    ``doc_ids``/``image_ids``: ``[B, Lk]``; queries are the last ``q_len`` positions (default all).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, Lk = doc_ids.shape
    Lq = Lk if q_len is None else q_len
    mask_mod = flex_mask_mod(doc_ids, image_ids, Lk - Lq, image_attention)
    return create_block_mask(
        mask_mod, B, None, Lq, Lk, device=doc_ids.device, BLOCK_SIZE=block_size, _compile=doc_ids.is_cuda
    )


ATTENTION = ("auto", "sdpa", "flex")


def hybrid_mask(doc_ids: Tensor, image_ids: Tensor, q_len: int | None = None, image_attention: str = "bidirectional",
                attention: str = "auto"):
    """The mask of keys ``doc_ids``/``image_ids`` ``[B, Lk]`` for the last ``q_len`` of them as queries (default
    all), in the rendering ``attention`` picks: a flex ``BlockMask`` for "flex", and for "auto" on CUDA (flex has
    no backward on CPU); else the dense bool mask ``[B, 1, Lq, Lk]`` for SDPA. Training and generation both ask here,
    so a model samples with the attention it trained with."""
    if attention not in ATTENTION:
        raise ValueError(f"attention: {attention!r}; expected one of {ATTENTION}")
    if attention == "flex" or (attention == "auto" and doc_ids.is_cuda):
        return block_mask(doc_ids, image_ids, q_len, image_attention=image_attention)
    q = slice(doc_ids.shape[1] - (q_len or doc_ids.shape[1]), None)
    return dense_mask(doc_ids, image_ids, doc_ids[:, q], image_ids[:, q], image_attention=image_attention)
