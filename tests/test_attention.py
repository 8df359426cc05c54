"""The hybrid mask (causal + bidirectional within an image + document-separated) against a brute-force loop."""

import pytest
import torch

from lit_transfusion.attention import block_mask, dense_mask, flex_mask_mod
from lit_transfusion.batch import greedy_rows, pack_rows
from tests.conftest import SPECIAL, random_documents


def brute_force(doc_ids, image_ids, q_start=0):
    """allowed(q, k) = same_doc and (k <= q or same image), one pair at a time."""
    B, L = doc_ids.shape
    out = torch.zeros(B, 1, L - q_start, L, dtype=torch.bool)
    for b in range(B):
        for q in range(q_start, L):
            for k in range(L):
                same_doc = doc_ids[b, q].item() == doc_ids[b, k].item()
                same_image = image_ids[b, q].item() != -1 and image_ids[b, q].item() == image_ids[b, k].item()
                out[b, 0, q - q_start, k] = same_doc and (k <= q or same_image)
    return out


def random_layout(seed: int, seq_len: int = 48):
    gen = torch.Generator().manual_seed(seed)
    docs = random_documents(gen, 6, latent_shape=(4, 4, 4), max_images=2)
    docs = [d for d in docs if sum(len(s.ids) if hasattr(s, "ids") else 6 for s in d) <= seq_len]
    rows = greedy_rows(docs, seq_len, patches_per_image=4)
    return pack_rows(rows, seq_len, patch_size=2, special=SPECIAL)


@pytest.mark.parametrize("seed", range(6))
def test_dense_mask_matches_brute_force(seed):
    b = random_layout(seed)
    assert b.num_images >= 1 and (b.seq.doc_ids.max(dim=1).values >= 1).any(), "layout should mix docs and images"
    assert torch.equal(dense_mask(b.seq.doc_ids, b.seq.image_ids), brute_force(b.seq.doc_ids, b.seq.image_ids))


@pytest.mark.parametrize("seed", range(3))
def test_dense_mask_with_cached_prefix(seed):
    b = random_layout(seed)
    L = b.seq.doc_ids.shape[1]
    q0 = L - 10
    got = dense_mask(b.seq.doc_ids, b.seq.image_ids, b.seq.doc_ids[:, q0:], b.seq.image_ids[:, q0:])
    assert torch.equal(got, brute_force(b.seq.doc_ids, b.seq.image_ids, q_start=q0))


@pytest.mark.parametrize("seed", range(4))
def test_flex_mask_mod_matches_brute_force(seed):
    from torch.nn.attention.flex_attention import create_mask

    b = random_layout(seed)
    B, L = b.seq.doc_ids.shape
    got = create_mask(flex_mask_mod(b.seq.doc_ids, b.seq.image_ids), B, 1, L, L, device="cpu")
    assert torch.equal(got, brute_force(b.seq.doc_ids, b.seq.image_ids))
    q0 = L - 7
    got = create_mask(flex_mask_mod(b.seq.doc_ids, b.seq.image_ids, q0), B, 1, L - q0, L, device="cpu")
    assert torch.equal(got, brute_force(b.seq.doc_ids, b.seq.image_ids, q_start=q0))


def test_block_mask_builds_with_same_rule():
    """The BlockMask's dense rendering (block granularity 16 here) agrees with the dense mask block by block."""
    b = random_layout(0, seq_len=64)
    bm = block_mask(b.seq.doc_ids, b.seq.image_ids, block_size=16)
    dense = dense_mask(b.seq.doc_ids, b.seq.image_ids)  # [B, 1, L, L]
    blocks = dense.unflatten(2, (4, 16)).unflatten(4, (4, 16)).any(dim=(3, 5))  # [B, 1, 4, 4] any allowed
    assert torch.equal(bm.to_dense().bool(), blocks)


def test_no_empty_rows_with_padding():
    b = random_layout(1, seq_len=64)
    assert (b.seq.doc_ids == -1).any(), "layout should contain pads"
    assert dense_mask(b.seq.doc_ids, b.seq.image_ids).any(dim=-1).all()
