"""Shared by ``tests/test_distributed.py`` and the per-process script ``one_step.py``.

The nano module, two hand-built per-rank batches with EQUAL numbers of text targets and of images, the
timesteps and noise pinned to a batch's content, batch fingerprints, and the single-process reference step.
Nothing here touches the network or the disk outside the paths it is given.
"""

from __future__ import annotations

import hashlib

import torch

from lit_transfusion.batch import Batch, Image, SpecialIds, Text, pack_rows
from lit_transfusion.module import TransfusionModule

VOCAB = 50
LATENT = (4, 4, 4)  # 2x2 patches of side 2 -> 4 patch positions per image
PATCH = 2
SEQ_LEN = 32
SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
LR = 0.5  # plain SGD: the update is lr * gradient, so any error in the gradient shows in the weights
SEED = 1234


def module_kwargs() -> dict:
    return dict(vocab_size=VOCAB, special_ids=dict(pad=0, bos=1, eos=2, boi=3, eoi=4), latent_shape=LATENT,
                size="nano", max_seq_len=64, patch_size=PATCH, attention="sdpa")


@torch.no_grad()
def perturb_noise_head(module: TransfusionModule, seed: int = 99) -> None:
    """Random non-zero weights for the noise-predicting output layers (they start at zero, and a zero head
    passes no image-loss gradient back into the transformer). Works on plain tensors and on FSDP2 shards
    (each rank fills its own shard: give each rank its own ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    for layer in module.model.patcher.output_layers():
        for p in layer.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(torch.randn(local.shape, generator=g) * 0.05)


def build_module(cls: type[TransfusionModule] = TransfusionModule) -> TransfusionModule:
    """The seeded nano module every process and the reference build (same weights everywhere)."""
    torch.manual_seed(SEED)
    module = cls(**module_kwargs())
    perturb_noise_head(module)
    return module


def per_rank_batches() -> list[Batch]:
    """Two per-rank batches of two rows each, laid out differently (several documents per row, one or two
    images per document, image-first and caption-first) but with the same number of LM targets and images."""
    g = torch.Generator().manual_seed(7)

    def lat() -> torch.Tensor:
        return torch.randn(LATENT, generator=g)

    def T(*ids: int) -> Text:
        return Text(list(ids))

    rank0 = [
        [[T(1, 10, 11, 12), Image(lat()), T(13, 14), Image(lat()), T(15, 2)]],
        [[T(1, 20, 21, 2)], [T(1, 22, 23, 24, 25, 26, 27, 28, 2)]],
    ]
    rank1 = [
        [[T(1, 30, 31), Image(lat()), T(32, 33, 2)], [T(1, 34, 35, 2)]],
        [[T(1), Image(lat()), T(36, 37, 38, 39, 40, 2)], [T(1, 41, 42, 43, 2)]],
    ]
    return [pack_rows(rows, SEQ_LEN, PATCH, SPECIAL) for rows in (rank0, rank1)]


def n_targets(batch: Batch) -> int:
    return int((batch.targets != -100).sum())


def fingerprint(batch: Batch) -> str:
    """sha256 of what a batch holds (tokens, targets, images): equal iff the rows are the same."""
    h = hashlib.sha256()
    for x in (batch.seq.tokens, batch.seq.doc_ids, batch.targets, batch.latents, batch.t_max):
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pinned(batch: Batch) -> tuple[torch.Tensor, torch.Generator]:
    """Timesteps and a noise generator that depend on the batch's content only (not on rank or step), so a
    rank and the reference draw the same t and noise for the same rows."""
    g = torch.Generator(device=batch.latents.device).manual_seed(int(fingerprint(batch)[:15], 16))
    t = (torch.rand(batch.t_max.shape, generator=g, device=batch.t_max.device) * batch.t_max).long()
    return t, g


def reference_step(init_state: dict, batches: list[Batch]) -> tuple[dict, list[float]]:
    """One single-process SGD step on the mean of the per-rank losses. Returns (state_dict after the step,
    the per-rank losses)."""
    module = TransfusionModule(**module_kwargs())
    module.load_state_dict(init_state)
    module.train()
    losses = [module.losses(b, *pinned(b))["loss"] for b in batches]
    torch.stack(losses).mean().backward()
    torch.optim.SGD(module.parameters(), lr=LR).step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, [float(x.detach()) for x in losses]
