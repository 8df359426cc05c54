"""Loss bookkeeping on hand-built batches: which positions carry an LM target, and image numbering."""

import pytest
import torch

from lit_transfusion.batch import IGNORE, Image, Text, document_length, greedy_rows, pack_rows
from tests.conftest import SPECIAL

BOS, EOS, PAD, BOI, EOI = SPECIAL.bos, SPECIAL.eos, SPECIAL.pad, SPECIAL.boi, SPECIAL.eoi
X = IGNORE


def lat(v):
    return torch.full((4, 4, 4), float(v))  # 4x4 grid, patch 2 -> 4 patches per image


def test_caption_image_and_image_caption_targets():
    caption_first = [Text([BOS, 10, 11]), Image(lat(0)), Text([EOS])]
    image_first = [Text([BOS]), Image(lat(1), t_max=500), Text([12, 13, EOS])]
    b = pack_rows([[caption_first, image_first]], seq_len=24, patch_size=2, special=SPECIAL)
    P = PAD
    tokens = [BOS, 10, 11, BOI, P, P, P, P, EOI, EOS,  BOS, BOI, P, P, P, P, EOI, 12, 13, EOS,  P, P, P, P]
    # position whose target is <boi> is trained; no loss at the <boi> input, at patches, at the last
    # position of a document, or at pads; <eoi> predicts the text after the image.
    targets = [10, 11, BOI, X, X, X, X, X, EOS, X,  BOI, X, X, X, X, X, 12, 13, EOS, X,  X, X, X, X]
    image_ids = [-1] * 4 + [0] * 4 + [-1] * 4 + [1] * 4 + [-1] * 8
    patch_ids = [-1] * 4 + [0, 1, 2, 3] + [-1] * 4 + [0, 1, 2, 3] + [-1] * 8
    doc_ids = [0] * 10 + [1] * 10 + [-1] * 4
    positions = list(range(10)) + list(range(10)) + [0] * 4
    assert b.seq.tokens[0].tolist() == tokens
    assert b.targets[0].tolist() == targets
    assert b.seq.image_ids[0].tolist() == image_ids
    assert b.seq.patch_ids[0].tolist() == patch_ids
    assert b.seq.doc_ids[0].tolist() == doc_ids
    assert b.seq.positions[0].tolist() == positions
    assert b.t_max.tolist() == [1000, 500]
    assert torch.equal(b.latents[1], lat(1))


def test_null_caption_carries_no_lm_loss():
    null = [Text([BOS], loss=False), Image(lat(0)), Text([EOS])]
    b = pack_rows([[null]], seq_len=8, patch_size=2, special=SPECIAL)
    # <bos> -> <boi> is NOT trained (the caption was dropped); <eoi> -> <eos> is.
    assert b.targets[0].tolist() == [X, X, X, X, X, X, EOS, X]


def test_images_numbered_in_row_major_order_across_rows():
    doc = lambda v: [Text([BOS, 9]), Image(lat(v)), Text([EOS])]  # noqa: E731
    b = pack_rows([[doc(0), doc(1)], [doc(2)]], seq_len=20, patch_size=2, special=SPECIAL)
    seen = b.seq.image_ids[b.seq.image_mask].tolist()
    assert seen == sorted(seen) and set(seen) == {0, 1, 2}
    assert [b.latents[i, 0, 0, 0].item() for i in range(3)] == [0, 1, 2]


def test_text_only_batch_has_zero_images():
    b = pack_rows([[[Text([BOS, 5, 6, EOS])]]], seq_len=6, patch_size=2, special=SPECIAL)
    assert b.num_images == 0 and b.targets[0].tolist() == [5, 6, EOS, X, X, X]


def test_errors():
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows([[[Text([BOS] * 10)]]], seq_len=5, patch_size=2, special=SPECIAL)
    with pytest.raises(ValueError, match="patch_size=3"):
        pack_rows([[[Image(lat(0))]]], seq_len=20, patch_size=3, special=SPECIAL)
    with pytest.raises(ValueError, match="does not fit"):
        greedy_rows([[Text([BOS] * 10)]], seq_len=5, patches_per_image=4)


def test_greedy_rows_fill_first_fit():
    docs = [[Text([1] * n)] for n in (6, 5, 3, 2)]
    rows = greedy_rows(docs, seq_len=8, patches_per_image=4)
    assert [[len(d[0].ids) for d in r] for r in rows] == [[6, 2], [5, 3]]
    assert document_length([Text([1, 2]), Image(lat(0))], 4) == 2 + 6
