"""The image path is wired right: each image's predicted noise comes from its own latent, its own document's
earlier positions and nothing else; the image loss pairs each image with its own noise and timestep; the
patchers treat every image on its own (the U-Net's skips included).

A fresh model predicts exactly zero noise (its output layers start at zero), which makes every image-loss
bug invisible; ``randomize_output_heads`` gives those layers random weights first. The reference here is
an independent re-implementation of the forward (one image at a time through the patcher, a mask built by
loops from docs/method.md's rule), not the model's own vectorized indexing.
"""

import pytest
import torch

from lit_transfusion.batch import Batch, Image, Text, pack_rows
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL, randomize_output_heads

BOS, EOS = SPECIAL.bos, SPECIAL.eos
PATCHERS = ["linear", "unet"]
L = 48
P = 4  # (4 x 4 latent / 2 x 2 patches)
UNCHANGED = dict(rtol=0.0, atol=1e-6)  # "bit-identical" up to kernel rounding
CHANGED = 1e-4  # the smallest max-abs change that counts as "depends on" (typical: 1e-2 .. 1)

pytestmark = pytest.mark.usefixtures("one_thread")


def documents(captions=None):
    """Two packed rows, five documents, eight images (ids 0..7 in order of appearance):

    row 0: doc 0 = <bos> 5 6 [img 0] 7 [img 1] <eos>
           doc 1 = <bos> 8 [img 2] <eos>
           doc 2 = <bos> 9 10 [img 3] 11 [img 4] <eos>
    row 1: doc 0 = <bos> 12 [img 5] <eos>
           doc 1 = <bos> 14 [img 6] 13 [img 7] <eos>

    ``captions`` (5 lists) replaces each document's caption (the text between <bos> and its first image).
    """
    g = torch.Generator().manual_seed(11)
    lat = [torch.randn(4, 4, 4, generator=g) for _ in range(8)]
    caps = captions or [[5, 6], [8], [9, 10], [12], [14]]
    rows = [
        [[Text([BOS, *caps[0]]), Image(lat[0]), Text([7]), Image(lat[1]), Text([EOS])],
         [Text([BOS, *caps[1]]), Image(lat[2]), Text([EOS])],
         [Text([BOS, *caps[2]]), Image(lat[3]), Text([11]), Image(lat[4]), Text([EOS])]],
        [[Text([BOS, *caps[3]]), Image(lat[5]), Text([EOS])],
         [Text([BOS, *caps[4]]), Image(lat[6]), Text([13]), Image(lat[7]), Text([EOS])]],
    ]
    return rows


DOC_OF_IMAGE = [(0, 0), (0, 0), (0, 1), (0, 2), (0, 2), (1, 0), (1, 1), (1, 1)]  # image -> (row, doc)
T = torch.tensor([50, 999, 300, 450, 600, 120, 780, 900])  # one distinct timestep per image


def batch(captions=None):
    b = pack_rows(documents(captions), L, 2, SPECIAL)
    assert b.num_images == 8 and b.seq.image_ids.max(1).values.tolist() == [4, 7]
    return b


def make_module(patcher: str) -> TransfusionModule:
    torch.manual_seed(0)
    m = TransfusionModule(vocab_size=32, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                          patcher=patcher, max_seq_len=64)
    return randomize_output_heads(m, seed=1).eval()


@pytest.fixture(scope="module", params=PATCHERS)
def module(request) -> TransfusionModule:
    return make_module(request.param)


def forward(module, b, latents, t=T):
    with torch.no_grad():
        return module(b, latents, t)


def first_patch(b, k: int) -> tuple[int, int]:
    """(row, column) of image k's first patch."""
    r, c = (b.seq.image_ids == k).nonzero()[0].tolist()
    return r, c


def rule_mask(seq) -> torch.Tensor:
    """docs/method.md's rule (Mask), position by position: same document and (causal or same image)."""
    B, n = seq.doc_ids.shape
    d, im = seq.doc_ids.tolist(), seq.image_ids.tolist()
    mask = torch.zeros(B, 1, n, n, dtype=torch.bool)
    for b in range(B):
        for q in range(n):
            for k in range(n):
                mask[b, 0, q, k] = d[b][q] == d[b][k] and (k <= q or im[b][q] == im[b][k] != -1)
    return mask


def reference_forward(model, seq, latents, t):
    """TransfusionModel.forward re-done one image at a time: each image alone (a batch of 1) through the
    patcher's encode, its patch vectors placed by (image id, patch id), the transformer under ``rule_mask``,
    and each image's P hidden states (in patch order) alone through decode. Returns (hidden, eps)."""
    with torch.no_grad():
        x = model.embed(seq.tokens).clone()
        states = []
        for k in range(latents.shape[0]):
            patches, state = model.patcher.encode(latents[k:k + 1], t[k:k + 1])
            states.append(state)
            rows, cols = (seq.image_ids == k).nonzero(as_tuple=True)
            assert len(rows) == P
            x[rows, cols] = patches[0, seq.patch_ids[rows, cols]]
        hidden, _ = model.transformer(x, seq.positions, rule_mask(seq))
        eps = []
        for k in range(latents.shape[0]):
            rows, cols = (seq.image_ids == k).nonzero(as_tuple=True)
            h = torch.empty(P, hidden.shape[-1])
            h[seq.patch_ids[rows, cols]] = hidden[rows, cols]
            eps.append(model.patcher.decode(h[None], states[k], t[k:k + 1])[0])
    return hidden, torch.stack(eps)


def max_change(a, b) -> torch.Tensor:
    """Per image (or per position): the largest absolute change."""
    return (a - b).flatten(1).abs().amax(1)


# ------------------------------------------------------------------------------------- (a) own latent
@pytest.mark.parametrize("k", range(8))
def test_each_image_noise_depends_on_its_latent_and_only_where_the_mask_allows(module, k):
    """Perturb image k's latent: eps[k] changes; images of other documents and EARLIER images of k's document
    are untouched (document isolation, causality); LATER images of its document do change (they attend to
    image k: causal across images of one document). Text positions follow the same rule."""
    b = batch()
    base = forward(module, b, b.latents)
    lat = b.latents.clone()
    lat[k] += torch.randn(lat[k].shape, generator=torch.Generator().manual_seed(k))
    out = forward(module, b, lat)
    change = max_change(out.eps, base.eps)
    assert change[k] > CHANGED, f"eps of image {k} does not depend on its own latent"
    for j in range(8):
        same_doc = DOC_OF_IMAGE[j] == DOC_OF_IMAGE[k]
        if j == k:
            continue
        if not same_doc or j < k:
            torch.testing.assert_close(out.eps[j], base.eps[j], **UNCHANGED,
                                       msg=f"image {k}'s latent leaked into image {j} "
                                           f"({'same document, earlier' if same_doc else 'another document'})")
        else:
            assert change[j] > CHANGED, f"image {j} does not see the earlier image {k} of its document"
    # Hidden states of every position: may change only in k's document at or after its first patch.
    r, c = first_patch(b, k)
    doc = b.seq.doc_ids[r, c]
    may = torch.zeros(b.seq.shape, dtype=torch.bool)
    may[r, c:] = b.seq.doc_ids[r, c:] == doc
    torch.testing.assert_close(out.hidden[~may], base.hidden[~may], **UNCHANGED)
    assert max_change(out.hidden[b.seq.image_ids == k], base.hidden[b.seq.image_ids == k]).min() > CHANGED


# ------------------------------------------------------------------------------------ (b) captions
@pytest.mark.parametrize("doc", range(5))
def test_caption_changes_its_own_documents_images_only(module, doc):
    """A new caption for document ``doc`` changes the noise of that document's images and of no other
    document's, earlier or later in the row, or in the other row."""
    caps = [[5, 6], [8], [9, 10], [12], [14]]
    b = batch(caps)
    new_caps = [list(c) for c in caps]
    new_caps[doc] = [c + 10 for c in caps[doc]]
    b2 = batch(new_caps)
    base, out = forward(module, b, b.latents), forward(module, b2, b2.latents)
    torch.testing.assert_close(b2.latents, b.latents)
    change = max_change(out.eps, base.eps)
    row_doc = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)][doc]
    for j in range(8):
        if DOC_OF_IMAGE[j] == row_doc:
            assert change[j] > CHANGED, f"image {j} ignores its document's caption"
        else:
            torch.testing.assert_close(out.eps[j], base.eps[j], **UNCHANGED,
                                       msg=f"document {doc}'s caption leaked into image {j} of {DOC_OF_IMAGE[j]}")


def test_any_token_reaches_exactly_the_later_images_of_its_document(module):
    """Every non-patch position in turn (text, <boi>, <eoi>, pads) gets another token id: the images whose
    noise changes are exactly those of the same document whose patches come after it."""
    b = batch()
    base = forward(module, b, b.latents)
    starts = [first_patch(b, j) for j in range(8)]
    for r, c in (b.seq.image_ids < 0).nonzero().tolist():
        seq = b.seq.map(lambda name, x: x.clone())
        seq.tokens[r, c] = 20 + (seq.tokens[r, c] % 10)
        b2 = Batch(seq=seq, targets=b.targets, latents=b.latents, t_max=b.t_max)
        change = max_change(forward(module, b2, b.latents).eps, base.eps)
        d = int(b.seq.doc_ids[r, c])
        expect = torch.tensor([sr == r and sc > c and d >= 0 and int(b.seq.doc_ids[sr, sc]) == d for sr, sc in starts])
        assert torch.equal(change > CHANGED, expect), (r, c, change)
        assert (change[~expect] <= 1e-6).all(), (r, c, change)


# ----------------------------------------------------------------------------- (c) the image loss
def test_model_eps_equals_the_per_image_reference(module):
    """The model's batched forward == the one-image-at-a-time re-implementation (gather/scatter of patch
    vectors, image order, per-image timesteps, the mask)."""
    b = batch()
    lat = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(4))
    out = forward(module, b, lat)
    hidden, eps = reference_forward(module.model, b.seq, lat, T)
    torch.testing.assert_close(out.hidden, hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.eps, eps, rtol=1e-4, atol=1e-5)


def test_image_loss_pairs_each_image_with_its_own_noise_and_t(module):
    """``losses`` with a fixed generator == an independent computation: the same noise draw, each image noised
    by hand at its own t, eps from the per-image reference, MSE per image. An eps rolled over the image
    axis (or a noise/t paired with another image) gives clearly different per-image MSEs."""
    b = batch()
    out = module.losses(b, t=T, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(3))  # losses' one draw
    a = module.diffusion.alphas_cumprod
    noisy = torch.stack([a[t].sqrt() * x0 + (1 - a[t]).sqrt() * n
                         for x0, n, t in zip(b.latents, noise, T.tolist(), strict=True)])
    _, eps = reference_forward(module.model, b.seq, noisy, T)
    mse = (eps - noise).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["mse_per_image"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mse_image"], mse.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_image"], mse.mean(), rtol=1e-5, atol=1e-6)
    # The check has power: a mis-paired eps moves the per-image MSE far beyond the tolerance above.
    rolled = (eps.roll(1, 0) - noise).pow(2).flatten(1).mean(1)
    assert ((rolled - mse).abs() / mse).max() > 0.05


# ------------------------------------------------------------------------------- (d) the patchers
def _hidden_per_image(module, b, lat):
    """The transformer's hidden states of each image's patches, [N, P, D] in patch order."""
    out = forward(module, b, lat)
    h = torch.empty(lat.shape[0], P, out.hidden.shape[-1])
    for k in range(lat.shape[0]):
        rows, cols = (b.seq.image_ids == k).nonzero(as_tuple=True)
        h[k, b.seq.patch_ids[rows, cols]] = out.hidden[rows, cols]
    return h


def test_patcher_treats_each_image_alone(module):
    """encode and decode over N images == over each image alone (a batch of 1), with the same transformer
    hidden states and (U-Net) skip features: no image's vectors, skips or timestep reach another."""
    b = batch()
    lat = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(5))
    patcher = module.model.patcher
    hidden = _hidden_per_image(module, b, lat)
    with torch.no_grad():
        patches, state = patcher.encode(lat, T)
        eps = patcher.decode(hidden, state, T)
        for k in range(8):
            p1, s1 = patcher.encode(lat[k:k + 1], T[k:k + 1])
            torch.testing.assert_close(patches[k:k + 1], p1, rtol=1e-4, atol=1e-5)
            if state is not None:
                for s, s_one in zip(state, s1, strict=True):
                    torch.testing.assert_close(s[k:k + 1], s_one, rtol=1e-4, atol=1e-5)
            one = patcher.decode(hidden[k:k + 1], s1, T[k:k + 1])
            torch.testing.assert_close(eps[k:k + 1], one, rtol=1e-4, atol=1e-5, msg=f"image {k}")
    assert eps.abs().mean() > 1e-3


def test_unet_skips_reach_only_their_own_image():
    """Changing image k's skip features (each resolution in turn) changes eps[k] and nothing else."""
    module = make_module("unet")
    b = batch()
    lat = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(6))
    patcher = module.model.patcher
    hidden = _hidden_per_image(module, b, lat)
    with torch.no_grad():
        _, skips = patcher.encode(lat, T)
        base = patcher.decode(hidden, skips, T)
        assert len(skips) >= 2
        for level in range(len(skips)):
            for k in (0, 3, 7):
                changed = [s.clone() for s in skips]
                changed[level][k] += torch.randn(changed[level][k].shape, generator=torch.Generator().manual_seed(k))
                change = max_change(patcher.decode(hidden, changed, T), base)
                assert change[k] > CHANGED, f"skip level {level} of image {k} is ignored"
                others = torch.arange(8) != k
                assert (change[others] <= 1e-6).all(), f"skip level {level} of image {k} leaked: {change}"
