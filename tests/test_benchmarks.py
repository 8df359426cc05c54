"""The benchmark scripts run end to end (smoke: tiny settings, numbers not checked)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_transfusion.hardware import cpu_bf16_native

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_step_benchmark(tmp_path):
    out = run("benchmarks/train_step.py", "--steps", "2", "--fit_steps", "6", "--override+=--model.init_args.size=nano",
              f"--override+=--data.init_args.data_dir={tmp_path}", "--override+=--data.init_args.num_train=64",
              "--override+=--data.init_args.num_val=16")
    for key in ("step time", "tokens/s", "MFU", "peak RSS", "--- precision 32\n", "--- trainer.fit, precision",
                "between steps", "the data loader alone", "inside a step"):
        assert key in out
    # bf16 is timed by default only where the hardware has it natively (the subprocess sees the same env/CUDA);
    # elsewhere one line says it was skipped and why.
    native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_bf16_native()
    if native:
        assert "--- precision bf16-mixed" in out and "bf16-mixed skipped" not in out
    else:
        assert "--- precision bf16-mixed" not in out
        assert "bf16-mixed skipped:" in out and "pass --precision '[bf16-mixed]'" in out


@pytest.mark.slow
def test_generation_benchmark():
    out = run("benchmarks/generation.py", "--quick", "true")
    assert "speed-up" in out and "tokens/s" in out


@pytest.mark.slow
def test_mot_benchmark():
    out = run("benchmarks/mot.py", "--sizes", "[nano]", "--steps", "1", "--rows", "2", "--seq_len", "64",
              "--threads", "1")
    assert "MoT/dense" in out and "MFLOP/position" in out


def test_sampling_scan_scores_each_setting_of_one_checkpoint(trained_run, tmp_path):
    """One record per guidance scale, scored on the same images' prompts; the setting reaches the sampler (a
    2-step model's images already differ between no guidance and guidance 7.5, and so do their FIDs)."""
    import json

    out = tmp_path / "scan.json"
    run("benchmarks/sampling_scan.py", "--ckpt", str(trained_run / "checkpoints" / "last.ckpt"),
        "--guidance_scales", "[1,7.5]", "--steps", "[4]", "--images", "8", "--out", str(out))
    records = json.loads(out.read_text())["records"]
    assert [r["guidance_scale"] for r in records] == [1.0, 7.5]
    assert records[0]["metrics"]["fid_n"] == records[1]["metrics"]["fid_n"] >= 8  # whole prompts per family
    assert all(0 <= r["metrics"]["geneval/overall"] <= 1 for r in records)
    assert records[0]["metrics"]["fid"] != records[1]["metrics"]["fid"]
    assert "| ddim | 4 | 7.5 |" in out.with_suffix(".md").read_text()
