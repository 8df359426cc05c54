"""Mixture-of-Transformers against the dense backbone: parameters, FLOPs per position and seconds per step.

    python benchmarks/mot.py [--sizes [nano,tiny]] [--steps 6] [--rows 8] [--seq_len 256] [--threads N]

For each size (latent shape (4, 8, 8), patch 2, vocab 512), a dense and an MoT (``mot=True``) TransfusionModule
built from the same seed, trained on the same packed batches of mixed documents (caption -> image -> text, and
text-only documents):

- parameters: total; non-embedding (without the token embedding and the LM head); active
  (``TransfusionModel.active_params``: one position's parameters, the N of a 6·N·D budget);
- FLOPs per position of one training step (forward + backward of ``TransfusionModule.losses``), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` over every position of the batch (pads included: they are
  computed). It counts matmuls and attention, not the MoT routing's gathers -- those show in the step time;
- seconds per step (losses, backward, AdamW step): the median and the best over interleaved rounds, dense then
  MoT on the same batch, so a noisy spell on the machine hits both alike (on a shared machine the best is the
  steadier of the two).

Then the MoT/dense ratio of each, as a markdown table. MoT's FLOPs per position should equal the dense model's
and its active parameters the dense model's parameters (the MoT paper's equal-FLOPs comparison).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lit_transfusion.batch import Batch, Image, SpecialIds, Text, greedy_rows, pack_rows  # noqa: E402
from lit_transfusion.hardware import cpu_capability  # noqa: E402
from lit_transfusion.module import TransfusionModule  # noqa: E402

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
LATENT, PATCH, VOCAB = (4, 8, 8), 2, 512


def documents(gen: torch.Generator, n: int) -> list[list]:
    """``n`` documents: about half caption -> image -> text, the rest text only (ids 5..VOCAB-1)."""
    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(5, VOCAB, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()

    docs = []
    for _ in range(n):
        doc = [Text([SPECIAL.bos] + ids(4, 20))]
        if torch.rand((), generator=gen) < 0.5:
            doc += [Image(torch.randn(LATENT, generator=gen)), Text(ids(0, 12))]
        docs.append(doc + [Text([SPECIAL.eos])])
    return docs


def batches(count: int, rows: int, seq_len: int, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    patches = (LATENT[1] // PATCH) * (LATENT[2] // PATCH)
    out = []
    for _ in range(count):
        packed = greedy_rows(documents(gen, rows * seq_len // 20), seq_len, patches)[:rows]
        out.append(pack_rows(packed, seq_len, PATCH, SPECIAL))
    return out


def build(size: str, mot: bool, seq_len: int) -> TransfusionModule:
    torch.manual_seed(0)
    return TransfusionModule(vocab_size=VOCAB, special_ids=vars(SPECIAL), latent_shape=LATENT, size=size,
                             patch_size=PATCH, max_seq_len=seq_len, mot=mot).train()


def param_counts(module: TransfusionModule) -> dict[str, int]:
    net = module.model
    embedding = net.embed.weight.numel() + net.lm_head.weight.numel()
    return {"params": net.num_params(), "non-embedding": net.num_params() - embedding, "active": net.active_params()}


def flops_per_position(module: TransfusionModule, batch: Batch) -> float:
    """FLOPs of one forward + backward of the training loss, per position of the packed batch."""
    with FlopCounterMode(display=False) as counter:
        module.losses(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.seq.tokens.numel()


def step_times(modules: dict[str, TransfusionModule], data: list[Batch], warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each (losses, backward, AdamW step) per module after ``warmup`` steps, in interleaved rounds."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in modules.items()}
    times: dict[str, list[float]] = {k: [] for k in modules}
    for i, batch in enumerate(data):
        for k, m in modules.items():
            t0 = time.perf_counter()
            m.losses(batch, generator=torch.Generator().manual_seed(i))["loss"].backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def main(
    sizes: list[str] = ["nano", "tiny"],  # noqa: B006 (jsonargparse: a list option's default)
    steps: int = 6,
    rows: int = 8,
    seq_len: int = 256,
    threads: int | None = None,
) -> None:
    """Mixture-of-Transformers against the dense backbone: parameters, FLOPs per position and seconds per step,
    as a markdown table (the module's docstring says what each column measures).

    Args:
        sizes: model sizes to compare, e.g. [nano,tiny]
        steps: timed steps per model (after one warm-up step)
        rows: rows of each packed batch
        seq_len: positions per row
        threads: intra-op threads (default: torch's); 1 is steadier on a machine shared with other jobs
    """
    if threads:
        torch.set_num_threads(threads)

    data = batches(steps + 1, rows, seq_len)
    real = statistics.mean(int((b.seq.doc_ids >= 0).sum()) for b in data)
    patch = statistics.mean(int(b.seq.image_mask.sum()) for b in data)
    print(f"CPU capability {cpu_capability()}, intra-op threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"batch: {rows} rows x {seq_len} positions ({real:.0f} real, {patch:.0f} of them image "
          f"patches); latent {LATENT}, patch {PATCH}, vocab {VOCAB}; FLOPs per position over all "
          f"{rows * seq_len} positions; s/step median of {steps}\n")
    print("| size | model | params | non-embedding | active | MFLOP/position (fwd+bwd) | s/step median | best |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        modules = {"dense": build(size, False, seq_len), "MoT": build(size, True, seq_len)}
        table = {k: {**param_counts(m), "flops": flops_per_position(m, data[0])} for k, m in modules.items()}
        for k, secs in step_times(modules, data).items():
            table[k]["s/step"], table[k]["best"] = statistics.median(secs), min(secs)
        ratio = {key: table["MoT"][key] / table["dense"][key] for key in table["dense"]}
        for name, r in table.items():
            print(f"| {size} | {name} | {r['params'] / 1e6:.3f}M | {r['non-embedding'] / 1e6:.3f}M | "
                  f"{r['active'] / 1e6:.3f}M | {r['flops'] / 1e6:.2f} | {r['s/step']:.3f} | {r['best']:.3f} |")
        print(f"| {size} | MoT/dense | {ratio['params']:.2f} | {ratio['non-embedding']:.2f} | {ratio['active']:.2f} "
              f"| {ratio['flops']:.3f} | {ratio['s/step']:.2f} | {ratio['best']:.2f} |")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
