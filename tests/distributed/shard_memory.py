"""A callback that records, on each rank, the bytes its parameters and optimizer state really occupy (the local
shards under FSDP2), after one optimizer step; written to ``$SHARD_MEMORY_OUT/rank<r>.json``."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import lightning as L
import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


class ShardMemory(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != 1:
            return
        params = list(pl_module.model.parameters())
        state = [v for s in trainer.optimizers[0].state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "full_params": sum(p.numel() for p in params),  # the global (unsharded) parameter count
            "param_bytes": _bytes(params),
            "optimizer_bytes": _bytes(state),
            "any_meta": any(_local(p).is_meta for p in params),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        out = Path(os.environ["SHARD_MEMORY_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
