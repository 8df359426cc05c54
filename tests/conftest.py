import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lit_transfusion.batch import Image, SpecialIds, Text

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)


@pytest.fixture
def special() -> SpecialIds:
    return SPECIAL


def random_documents(gen: torch.Generator, n_docs: int, latent_shape=(4, 4, 4), vocab=50, max_images=3):
    """Random documents: text runs of random length with 0..max_images images in between."""
    docs = []
    for _ in range(n_docs):
        doc = [Text([SPECIAL.bos] + torch.randint(5, vocab, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen).tolist())]
        for _ in range(int(torch.randint(0, max_images + 1, (1,), generator=gen))):
            doc.append(Image(torch.randn(latent_shape, generator=gen)))
            doc.append(Text(torch.randint(5, vocab, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen).tolist()))
        doc.append(Text([SPECIAL.eos]))
        docs.append(doc)
    return docs
