"""FSDP2 from the meta device: each rank holds about half of the parameters and optimizer state (measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, small_run_args

MODEL = ["--model.init_args.size=small", "--model.init_args.dim=768", "--model.init_args.n_layers=8",
         "--model.init_args.n_heads=12"]  # ~60M parameters


def run(tmp_path, name: str, *extra: str) -> list[dict]:
    out = tmp_path / name
    args = [sys.executable, "-m", "lit_transfusion", "fit", "--config", "configs/shapes/tiny.yaml",
            *small_run_args(tmp_path), *MODEL, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.precision=32", "--trainer.accelerator=cpu", "--data.init_args.batch_size=2",
            "--trainer.callbacks=tests.distributed.shard_memory.ShardMemory", "--trainer.logger=false", *extra]
    env = {**os.environ, "SHARD_MEMORY_OUT": str(out)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
def test_fsdp2_ranks_hold_half_the_parameters_and_optimizer_state(tmp_path):
    single = run(tmp_path, "single")
    sharded = run(tmp_path, "fsdp2", "--trainer.devices=2", "--trainer.gradient_clip_val=null",
                  '--trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}')
    assert len(single) == 1 and len(sharded) == 2
    full = single[0]["param_bytes"] + single[0]["optimizer_bytes"]
    assert 50e6 < single[0]["full_params"] < 100e6
    for rank in sharded:
        assert rank["full_params"] == single[0]["full_params"] and not rank["any_meta"]
        ratio = (rank["param_bytes"] + rank["optimizer_bytes"]) / full
        assert 0.45 < ratio < 0.55, f"rank {rank['rank']}: {ratio:.3f} of the unsharded bytes"
    print({r["rank"]: round((r["param_bytes"] + r["optimizer_bytes"]) / full, 3) for r in sharded},
          "full MB", full / 2**20, "peak RSS MB", [r["peak_rss_mb"] for r in sharded], single[0]["peak_rss_mb"])
