"""Text conditioning takes hold: in a tiny world where the caption decides the image, a short seeded training
run predicts an image's noise clearly better from its own caption than from another image's -- and the same
run with an uninformative (constant) caption does not, so the gap is the caption's doing, not the noisy
image's.

The world: four captions ``<bos> c`` (c = 5..8), each image the class's fixed random 4x4x4 pattern plus a
little noise. Documents are packed four to a row, as in training. The measure is docs/method.md's ``cond_gap``:
(MSE with shuffled captions - MSE with true captions) / MSE with shuffled captions, same noise for both,
averaged over t in {250, 500, 750}.
"""

import time

import pytest
import torch

from lit_transfusion.batch import Image, Text, pack_rows
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

BOS, EOS = SPECIAL.bos, SPECIAL.eos
CLASSES = [5, 6, 7, 8]  # caption token of each class
CONSTANT = 9  # the uninformative caption's token
SHAPE = (4, 4, 4)
DOCS_PER_ROW, ROWS = 4, 4  # 16 images per step, 36 of 64 positions per row
STEPS = 300  # ~10 s per run on one core
TIMESTEPS = (250, 500, 750)


def world(seed: int, n: int):
    """n (class, latent) pairs: class uniform, latent = the class pattern + 0.1 N(0, 1)."""
    patterns = torch.randn(len(CLASSES), *SHAPE, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(len(CLASSES), (n,), generator=g)
    return cls.tolist(), patterns[cls] + 0.1 * torch.randn(n, *SHAPE, generator=g)


def pack(captions, latents):
    docs = [[Text([BOS, c]), Image(x), Text([EOS])] for c, x in zip(captions, latents, strict=True)]
    rows = [docs[i:i + DOCS_PER_ROW] for i in range(0, len(docs), DOCS_PER_ROW)]
    return pack_rows(rows, 64, 2, SPECIAL)


def train(conditioned: bool, seed: int = 0) -> TransfusionModule:
    torch.manual_seed(seed)
    module = TransfusionModule(vocab_size=16, special_ids=vars(SPECIAL), latent_shape=SHAPE, size="nano",
                               max_seq_len=64, image_loss_weight=5.0)
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 1)
    module.train()
    for step in range(STEPS):
        cls, lat = world(seed=10_000 * (seed + 1) + step, n=DOCS_PER_ROW * ROWS)
        caps = [CLASSES[c] if conditioned else CONSTANT for c in cls]
        loss = module.losses(pack(caps, lat), generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
    return module.eval()


def cond_gap(module) -> tuple[float, list[float]]:
    """The gap on 64 held-out images, each shuffled caption another class's; returns (mean, per t)."""
    cls, lat = world(seed=999_999, n=64)
    true = pack([CLASSES[c] for c in cls], lat)
    shuffled = pack([CLASSES[(c + 1) % len(CLASSES)] for c in cls], lat)
    gaps = []
    with torch.no_grad():
        for i, step in enumerate(TIMESTEPS):
            t = torch.full((64,), step)
            mse_true = module.losses(true, t=t, generator=torch.Generator().manual_seed(i))["mse_per_image"].mean()
            mse_shuf = module.losses(shuffled, t=t, generator=torch.Generator().manual_seed(i))["mse_per_image"].mean()
            gaps.append(float((mse_shuf - mse_true) / mse_shuf))
    return sum(gaps) / len(gaps), gaps


def test_caption_conditioning_takes_hold_and_only_with_informative_captions():
    start = time.perf_counter()
    gap, per_t = cond_gap(train(conditioned=True))
    gap_constant, per_t_constant = cond_gap(train(conditioned=False))
    seconds = time.perf_counter() - start
    print(f"cond_gap conditioned {gap:.3f} {per_t}, constant caption {gap_constant:.3f} {per_t_constant} "
          f"({seconds:.0f} s)")
    # Seeds 0, 1, 2 (300 steps): conditioned 0.77 / 0.77 / 0.77 (0.73 .. 0.82 per t); constant caption
    # -0.04 / -0.00 / 0.02 (-0.07 .. 0.02 per t): the unseen caption tokens' random embeddings, nothing learnt.
    assert gap > 0.5 and min(per_t) > 0.3, f"the caption barely helps: cond_gap {gap:.3f} (per t {per_t})"
    assert abs(gap_constant) < 0.1 and max(map(abs, per_t_constant)) < 0.15, (
        f"a model that never saw informative captions shows a gap {gap_constant:.3f} (per t {per_t_constant})")
