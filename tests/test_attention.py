"""The hybrid mask (causal + bidirectional within an image + document-separated) against a brute-force loop,
for both image-attention rules (the paper's bidirectional one and Table 5's causal one)."""

from __future__ import annotations

import pytest
import torch

from lit_transfusion.attention import IMAGE_ATTENTION, block_mask, dense_mask, flex_mask_mod, hybrid_mask
from lit_transfusion.batch import greedy_rows, pack_rows
from tests.conftest import SPECIAL, random_documents


def brute_force(doc_ids, image_ids, q_start=0, image_attention="bidirectional"):
    """allowed(q, k) = same_doc and (k <= q or same image), one pair at a time; "causal": same_doc and k <= q."""
    B, L = doc_ids.shape
    out = torch.zeros(B, 1, L - q_start, L, dtype=torch.bool)
    for b in range(B):
        for q in range(q_start, L):
            for k in range(L):
                same_doc = doc_ids[b, q].item() == doc_ids[b, k].item()
                same_image = image_ids[b, q].item() != -1 and image_ids[b, q].item() == image_ids[b, k].item()
                if image_attention == "causal":
                    same_image = False
                out[b, 0, q - q_start, k] = same_doc and (k <= q or same_image)
    return out


def random_layout(seed: int, seq_len: int = 48):
    gen = torch.Generator().manual_seed(seed)
    docs = random_documents(gen, 6, latent_shape=(4, 4, 4), max_images=2)
    docs = [d for d in docs if sum(len(s.ids) if hasattr(s, "ids") else 6 for s in d) <= seq_len]
    rows = greedy_rows(docs, seq_len, patches_per_image=4)
    return pack_rows(rows, seq_len, patch_size=2, special=SPECIAL)


@pytest.mark.parametrize("rule", IMAGE_ATTENTION)
@pytest.mark.parametrize("seed", range(6))
def test_dense_mask_matches_brute_force(seed, rule):
    b = random_layout(seed)
    assert b.num_images >= 1 and (b.seq.doc_ids.max(dim=1).values >= 1).any(), "layout should mix docs and images"
    got = dense_mask(b.seq.doc_ids, b.seq.image_ids, image_attention=rule)
    assert torch.equal(got, brute_force(b.seq.doc_ids, b.seq.image_ids, image_attention=rule))


@pytest.mark.parametrize("rule", IMAGE_ATTENTION)
@pytest.mark.parametrize("seed", range(3))
def test_dense_mask_with_cached_prefix(seed, rule):
    b = random_layout(seed)
    L = b.seq.doc_ids.shape[1]
    q0 = L - 10
    got = dense_mask(b.seq.doc_ids, b.seq.image_ids, b.seq.doc_ids[:, q0:], b.seq.image_ids[:, q0:],
                     image_attention=rule)
    assert torch.equal(got, brute_force(b.seq.doc_ids, b.seq.image_ids, q_start=q0, image_attention=rule))


@pytest.mark.parametrize("seed", range(3))
def test_causal_image_rows_are_the_pure_causal_rows(seed):
    """With image_attention="causal" a patch's row is the document-causal row (same_doc and k <= q), built
    here without image ids at all; the bidirectional rule differs exactly at patch rows (later patches of
    the same image), so the setting really changes the mask."""
    b = random_layout(seed)
    doc, img = b.seq.doc_ids, b.seq.image_ids
    L = doc.shape[1]
    pure_causal = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril())[:, None]
    causal = dense_mask(doc, img, image_attention="causal")
    bidirectional = dense_mask(doc, img)
    patch_rows = (img >= 0)[:, None, :, None].expand_as(causal)
    assert torch.equal(causal[patch_rows], pure_causal[patch_rows])
    assert torch.equal(causal, pure_causal)  # text rows are causal under both rules
    assert torch.equal(causal[~patch_rows], bidirectional[~patch_rows])
    differs = (causal != bidirectional).any(-1)[:, 0]  # [B, L] rows that changed
    assert differs.any() and (img[differs] >= 0).all()


@pytest.mark.parametrize("rule", IMAGE_ATTENTION)
@pytest.mark.parametrize("seed", range(4))
def test_flex_mask_mod_matches_brute_force(seed, rule):
    from torch.nn.attention.flex_attention import create_mask

    b = random_layout(seed)
    B, L = b.seq.doc_ids.shape
    mod = flex_mask_mod(b.seq.doc_ids, b.seq.image_ids, image_attention=rule)
    got = create_mask(mod, B, 1, L, L, device="cpu")
    assert torch.equal(got, brute_force(b.seq.doc_ids, b.seq.image_ids, image_attention=rule))
    assert torch.equal(got, dense_mask(b.seq.doc_ids, b.seq.image_ids, image_attention=rule))
    q0 = L - 7
    mod = flex_mask_mod(b.seq.doc_ids, b.seq.image_ids, q0, image_attention=rule)
    got = create_mask(mod, B, 1, L - q0, L, device="cpu")
    assert torch.equal(got, brute_force(b.seq.doc_ids, b.seq.image_ids, q_start=q0, image_attention=rule))


@pytest.mark.parametrize("rule", IMAGE_ATTENTION)
def test_block_mask_builds_with_same_rule(rule):
    """The BlockMask's dense rendering (block granularity 16 here) agrees with the dense mask block by block."""
    b = random_layout(0, seq_len=64)
    bm = block_mask(b.seq.doc_ids, b.seq.image_ids, block_size=16, image_attention=rule)
    dense = dense_mask(b.seq.doc_ids, b.seq.image_ids, image_attention=rule)  # [B, 1, L, L]
    blocks = dense.unflatten(2, (4, 16)).unflatten(4, (4, 16)).any(dim=(3, 5))  # [B, 1, 4, 4] any allowed
    assert torch.equal(bm.to_dense().bool(), blocks)


@pytest.mark.parametrize("rule", IMAGE_ATTENTION)
def test_no_empty_rows_with_padding(rule):
    b = random_layout(1, seq_len=64)
    assert (b.seq.doc_ids == -1).any(), "layout should contain pads"
    assert dense_mask(b.seq.doc_ids, b.seq.image_ids, image_attention=rule).any(dim=-1).all()


def test_module_mask_follows_the_image_attention_setting():
    from lit_transfusion.module import TransfusionModule

    b = random_layout(2)
    for rule in IMAGE_ATTENTION:
        m = TransfusionModule(vocab_size=50, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                              max_seq_len=64, image_attention=rule)
        assert m.model.cfg.image_attention == rule
        assert torch.equal(m.attention_mask(b.seq), brute_force(b.seq.doc_ids, b.seq.image_ids, image_attention=rule))


def test_unknown_image_attention_fails_naming_the_setting():
    from lit_transfusion.module import TransfusionModule

    b = random_layout(0)
    with pytest.raises(ValueError, match="image_attention='full': expected 'bidirectional' or 'causal'"):
        dense_mask(b.seq.doc_ids, b.seq.image_ids, image_attention="full")
    with pytest.raises(ValueError, match="image_attention='full'"):
        flex_mask_mod(b.seq.doc_ids, b.seq.image_ids, image_attention="full")
    with pytest.raises(ValueError, match="model.init_args.image_attention='full'"):
        TransfusionModule(vocab_size=50, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                          image_attention="full")


@pytest.mark.parametrize("rule", IMAGE_ATTENTION)
def test_hybrid_mask_renders_the_rule_as_the_attention_setting_asks(rule):
    from torch.nn.attention.flex_attention import BlockMask

    b = random_layout(1)
    doc, img = b.seq.doc_ids, b.seq.image_ids
    q0 = doc.shape[1] - 10
    for attention in ("auto", "sdpa"):  # auto: dense on CPU
        got = hybrid_mask(doc, img, 10, image_attention=rule, attention=attention)
        assert torch.equal(got, brute_force(doc, img, q_start=q0, image_attention=rule))
    assert isinstance(hybrid_mask(doc, img, 10, image_attention=rule, attention="flex"), BlockMask)
    with pytest.raises(ValueError, match="attention: 'dense'"):
        hybrid_mask(doc, img, attention="dense")


def test_the_sampler_generates_with_the_modules_attention():
    from lit_transfusion.module import TransfusionModule

    for attention in ("auto", "sdpa", "flex"):
        m = TransfusionModule(vocab_size=50, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                              max_seq_len=64, attention=attention)
        assert m.sampler().attention == attention
