"""Perplexity of a Transfusion model on packed documents, with torchmetrics' ``Perplexity``.

Images in the documents are fed clean (t = 0), as context; only positions with a target (``batch.targets !=
IGNORE``, the same bookkeeping as the training loss) count.
"""

from __future__ import annotations

import torch
from torchmetrics.text import Perplexity

from lit_transfusion.batch import IGNORE, Batch


@torch.no_grad()
def perplexity(module, batches: list[Batch]) -> float:
    """exp(mean next-token cross-entropy) over every target position of ``batches``.

    Args:
        module: a ``MixedModalModule`` (Transfusion or Chameleon), called on each batch with its images clean
            (``representation.clean_inputs``: latents at t = 0, or nothing for codes, which are tokens).
        batches: packed batches (``pack_rows``); moved to the module's device here.
    """
    # sync_on_compute=False: callers evaluate on one rank; a cross-rank gather here would wait forever.
    metric = Perplexity(ignore_index=IGNORE, sync_on_compute=False).to(module.device)
    for batch in batches:
        batch = batch.to(module.device)
        out = module(batch)
        # Text targets only: a discrete-token model also predicts image codes, which are no part of a text perplexity.
        logits, targets = module.model.target_logits(out.hidden, module.text_targets(batch.targets))  # [n, V], [n]
        if targets.numel():
            metric.update(logits[None], targets[None])
    return float(metric.compute())
