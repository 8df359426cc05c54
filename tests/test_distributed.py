"""Distributed runs that prove correctness, not just that they finish.

Every slow test here launches ``tests/distributed/one_step.py`` in a subprocess (never in-process DDP: rank 1
would re-run pytest). Lightning launches that script again for rank 1, so each run is two gloo processes on
the CPU doing ONE optimizer step of the nano ``TransfusionModule`` on two hand-built batches, one per rank
(``tests/distributed/common.py``). The test then redoes the step in this process and compares weights.

What "the same step" means. Each rank's loss is a mean over ITS OWN batch (``loss_text`` over its target
positions, ``loss_image`` over its images) and DDP / FSDP2 average the gradients over ranks, so a 2-rank step
follows the gradient of (loss(batch_0) + loss(batch_1)) / 2: the single-process reference is exactly that
mean of per-rank losses. It equals the loss of ONE batch holding both (the concatenation) only when every rank
normalises over equal counts; the two batches are built with the same number of target positions (20) and of
images (2) so both readings agree (``test_equal_counts_make_the_mean_of_rank_losses_the_concatenated_loss``).
Timesteps and noise are pinned to each batch's content (``common.pinned``), the optimizer is plain SGD (an AdamW
first step, lr·sign(g), would not see a gradient summed instead of averaged) and gradient clipping is off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_transfusion.batch import Batch, Seq
from tests.distributed.common import (
    build_module,
    fingerprint,
    module_kwargs,
    n_targets,
    per_rank_batches,
    pinned,
    reference_step,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "one_step.py"
FINGERPRINTS = [fingerprint(b) for b in per_rank_batches()]


def run_one_step(out: Path, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    for var in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):
        env.pop(var, None)  # a fresh rendezvous (Lightning picks a free port)
    return subprocess.run([sys.executable, str(SCRIPT), "--strategy", strategy, "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ranks(out: Path) -> list[dict]:
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["global_step"] == 1 for r in records)
    return records


def assert_ranks_saw_different_rows(records: list[dict]) -> None:
    seen = [[b["fingerprint"] for b in r["batches"]] for r in records]
    assert all(len(s) == 1 for s in seen), f"each rank should run exactly one batch, got {seen}"
    assert seen[0] != seen[1], "both ranks trained on the same rows (sampler not sharding by rank)"
    assert sorted(s[0] for s in seen) == sorted(FINGERPRINTS), "the ranks' rows are not the two prepared batches"
    assert all(b["n_targets"] == 20 and b["num_images"] == 2 for r in records for b in r["batches"])


def assert_step_matches_reference(out: Path) -> tuple[dict, dict]:
    """Weights after the distributed step == one single-process SGD step on the mean of the per-rank losses,
    started from the same weights (``init.pt``, gathered by the script at the start of training)."""
    init = torch.load(out / "init.pt")
    final = torch.load(out / "final.pt")
    expected, _ = reference_step(init, per_rank_batches())
    assert set(final) == set(expected) == set(init)
    for name, ref in expected.items():
        update_ref, update = ref - init[name], final[name] - init[name]
        assert update_ref.norm() > 0, f"{name}: the reference step does not move it (no gradient reaches it)"
        rel = float((update - update_ref).norm() / update_ref.norm())
        assert rel < 1e-4, f"{name}: distributed update differs from the single-process one by {rel:.2e} (relative)"
        torch.testing.assert_close(final[name], ref, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    return init, final


def test_equal_counts_make_the_mean_of_rank_losses_the_concatenated_loss(monkeypatch):
    """The premise of the distributed tests: with equal target and image counts per rank, the mean of the two
    per-rank losses IS the loss of one batch holding both, with every image at the same t and noise."""
    b0, b1 = per_rank_batches()
    assert (n_targets(b0), b0.num_images) == (n_targets(b1), b1.num_images) == (20, 2)
    assert fingerprint(b0) != fingerprint(b1)
    module = build_module().train()
    per_rank = [module.losses(b, *pinned(b)) for b in (b0, b1)]

    both = Batch(seq=Seq.stack([b0.seq, b1.seq.shift_images(b0.num_images)]),
                 targets=torch.cat([b0.targets, b1.targets]), latents=torch.cat([b0.latents, b1.latents]),
                 t_max=torch.cat([b0.t_max, b1.t_max]))
    # The concatenation's noise is the per-rank noises side by side: draw them as ``losses`` does, then hand
    # them out for the one draw made with the sentinel generator.
    noises = []
    for b in (b0, b1):
        _, g = pinned(b)
        noises.append(torch.randn(b.latents.shape, generator=g))
    sentinel, randn, used = torch.Generator(), torch.randn, []

    def fixed_randn(*args, generator=None, **kwargs):
        if generator is sentinel:
            used.append(True)
            return torch.cat(noises).to(kwargs.get("dtype") or torch.float32)
        return randn(*args, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "randn", fixed_randn)
    t = torch.cat([pinned(b)[0] for b in (b0, b1)])
    whole = module.losses(both, t=t, generator=sentinel)
    monkeypatch.undo()
    assert used, "losses() no longer draws its noise with torch.randn(generator=...): update this test"
    for key in ("loss", "loss_text", "loss_image"):
        mean = (per_rank[0][key] + per_rank[1][key]) / 2
        torch.testing.assert_close(whole[key], mean, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_ddp_step_equals_single_process_step(tmp_path):
    """``Trainer(strategy="ddp", devices=2)`` on gloo: Lightning's distributed sampler gives each rank its own
    batch, DDP averages the gradients, and one SGD step lands on the single-process weights (see the module
    docstring for why the reference is the mean of the per-rank losses); both replicas end identical."""
    proc = run_one_step(tmp_path, "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_ranks_saw_different_rows(ranks(tmp_path))
    init, final = assert_step_matches_reference(tmp_path)
    seeded = build_module().state_dict()
    assert all(torch.equal(init[k], seeded[k]) for k in seeded), "DDP changed the weights before the first step"
    replica0, replica1 = (torch.load(tmp_path / f"final_rank{r}.pt") for r in range(2))
    assert all(torch.equal(replica0[k], replica1[k]) for k in replica0), "DDP replicas diverged after one step"
    assert all(torch.equal(replica0[k], final[k]) for k in final)


def dcp_state_dict(ckpt: Path, tmp: Path) -> dict:
    """A distributed checkpoint read by torch.distributed.checkpoint itself (not the project's loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp / "ckpt_as_torch.pt")
    return torch.load(tmp / "ckpt_as_torch.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("build", ["prebuilt", "meta"])
def test_fsdp2_step_equals_single_process_step_and_checkpoint_holds_it(tmp_path, build):
    """FSDP2: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with the module's
    ``configure_model`` (``fully_shard``). Each rank holds about half of every parameter, the ranks train on
    different rows, and one SGD step equals the single-process step (the reference is rebuilt here with fresh
    non-persistent buffers, e.g. the RoPE table, so a badly materialised buffer shows as a wrong step).
    ``prebuilt``: a module built normally keeps its weights through sharding. ``meta``: built under
    ``trainer.init_module(empty_init=True)`` (as the CLI does), the ranks initialise different shards.
    The distributed checkpoint written after the step, read with ``torch.distributed.checkpoint``, holds
    exactly the gathered in-memory weights: same keys, same values."""
    proc = run_one_step(tmp_path, "fsdp2", *(["--meta", "true"] if build == "meta" else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = ranks(tmp_path)
    assert_ranks_saw_different_rows(records)
    assert all(0.4 < r["local_fraction"] < 0.6 for r in records), f"not sharded: {records}"
    init, final = assert_step_matches_reference(tmp_path)
    if build == "prebuilt":
        seeded = build_module().state_dict()
        assert all(torch.equal(init[k], seeded[k]) for k in seeded), "sharding changed the weights it was given"
    else:
        for name, w in init.items():
            if w.ndim >= 2 and w.shape[0] % 2 == 0 and "proj_out" not in name:
                half = w.shape[0] // 2
                assert not torch.equal(w[:half], w[half:]), f"{name}: both ranks initialised identical shards"

    saved = dcp_state_dict(tmp_path / "ckpt", tmp_path)
    weights = saved["state_dict"]
    assert set(weights) == set(final), f"checkpoint keys differ: {set(weights) ^ set(final)}"
    for name, w in final.items():
        assert torch.equal(weights[name], w), f"{name}: checkpoint differs from the in-memory weights"
    meta = torch.load(tmp_path / "ckpt" / "meta.pt", weights_only=False)
    assert meta["global_step"] == 1
    assert meta["hyper_parameters"]["size"] == module_kwargs()["size"]


@pytest.mark.slow
def test_readme_fsdp2_strategy_is_sharded_data_parallel(tmp_path):
    """The strategy exactly as docs/scaling.md spells it (``{"class_path": ...ModelParallelStrategy}``, its
    defaults) must either shard data-parallel over both processes (the same step as the reference) or refuse
    to start with a message naming ``data_parallel_size``; silently training two unsharded copies on the
    same rows is neither."""
    proc = run_one_step(tmp_path, "fsdp2-auto")
    if proc.returncode != 0:
        assert "data_parallel_size" in proc.stderr, proc.stderr[-3000:]
        return
    records = ranks(tmp_path)
    assert all(0.4 < r["local_fraction"] < 0.6 for r in records), f"not sharded: {records}"
    assert_ranks_saw_different_rows(records)
    assert_step_matches_reference(tmp_path)
