"""One training epoch of the nano TransfusionModule over a prepared directory on two CPU processes (DDP, gloo);
run by ``tests/test_streaming.py`` as ``python tests/distributed/stream_ranks.py --data DIR --out OUT``.

Lightning's ``ddp`` launches this very script again for rank 1; each process builds its own
``PreparedDataModule`` stream in ``setup`` (litdata splits it by rank). Writes ``OUT/rank{r}.json``: the rank,
the world size, the backend and the sample keys of every training batch the rank ran, in order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.files.streaming import PreparedDataModule  # noqa: E402
from lit_transfusion.module import TransfusionModule  # noqa: E402


class RecordKeys(L.Callback):
    def __init__(self, out: Path):
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(list(batch.meta["keys"]))

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(dict(
            rank=trainer.global_rank, world_size=trainer.world_size, backend=torch.distributed.get_backend(),
            batches=self.batches)))


def main(data: Path, out: Path, docs_per_batch: int = 2) -> None:
    """One training epoch over a prepared directory on two CPU processes (DDP); each rank's batches to ``out``.

    Args:
        data: a prepared directory
        out: the directory to write rank{r}.json to (created)
        docs_per_batch: samples (documents) per training batch
    """
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)

    datamodule = PreparedDataModule(str(data), seq_len=128, batch_size=2, docs_per_batch=docs_per_batch)
    torch.manual_seed(0)
    module = TransfusionModule(vocab_size=datamodule.vocab_size, special_ids=datamodule.special_ids,
                               latent_shape=datamodule.latent_shape, size="nano", max_seq_len=128, warmup_steps=1)
    # Plain DDP: a batch of text documents only still gives the image layers a (zero) gradient (module.losses).
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[RecordKeys(out)],
    )
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    auto_cli(main, as_positional=False)
