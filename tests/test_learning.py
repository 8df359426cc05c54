"""A model that measurably learns: overfitting one fixed batch drives both losses down."""

import pytest
import torch

from lit_transfusion.batch import Image, Text, pack_rows
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL


@pytest.mark.slow  # 80 optimizer steps: ~40 s on 2 CPU cores
def test_overfit_one_batch_drives_both_losses_down():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    docs = [
        [Text([SPECIAL.bos, 5 + i % 4, 10 + i % 3]), Image(torch.randn(4, 4, 4, generator=g)), Text([SPECIAL.eos])]
        for i in range(12)
    ] + [[Text([SPECIAL.bos] + list(range(5, 20)) + [SPECIAL.eos])]]
    batch = pack_rows([docs[:4], docs[4:8], docs[8:12], docs[12:]], 48, 2, SPECIAL)
    m = TransfusionModule(vocab_size=32, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="micro",
                          max_seq_len=64)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    t = torch.full((batch.num_images,), 500)

    def evaluate():
        with torch.no_grad():
            return m.losses(batch, t=t, generator=torch.Generator().manual_seed(1))

    first = evaluate()
    for _ in range(80):
        out = m.losses(batch, t=t, generator=torch.Generator().manual_seed(1))  # same noise: memorizable
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = evaluate()
    assert last["loss_text"] < 0.3 * first["loss_text"], (first["loss_text"], last["loss_text"])
    assert last["loss_image"] < 0.5 * first["loss_image"], (first["loss_image"], last["loss_image"])
