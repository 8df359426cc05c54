"""Training that holds: precision by hardware, a time budget that completes the schedule, exact resume after a
kill, non-finite losses and exceptions that leave a checkpoint from before them."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_transfusion import hardware
from lit_transfusion.batch import greedy_rows, pack_rows
from lit_transfusion.module import TransfusionModule
from tests.conftest import ROOT, SPECIAL, random_documents, small_run_args


# ------------------------------------------------------------------------------------------ helpers
def make_module(**kw) -> TransfusionModule:
    torch.manual_seed(0)
    args = dict(vocab_size=50, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano", max_seq_len=128,
                lr=1e-3, min_lr=1e-4, warmup_steps=2)
    return TransfusionModule(**{**args, **kw})


def loader(n_batches: int = 64) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    batches = [pack_rows(greedy_rows(random_documents(gen, 6), 64, 4), 64, 2, SPECIAL) for _ in range(n_batches)]
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=tmp_path, num_sanity_val_steps=0)
    return L.Trainer(**{**args, **kw})


class FailAt(Callback):
    """Raise at the start of training step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"planted failure at step {self.step}")


# ---------------------------------------------------------------------------------------- precision
def test_unset_precision_resolves_to_fp32_without_native_bf16(tmp_path, monkeypatch):
    from lit_transfusion.commands.cli import build_cli

    monkeypatch.setenv(hardware.ENV_CPU_BF16, "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hardware._clear_caches()
    cli = build_cli(["--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path), "--trainer.logger=false",
                     "--trainer.accelerator=cpu"], run=False)
    hardware._clear_caches()
    assert cli.trainer.precision == "32-true"


def test_explicit_precision_wins(tmp_path, monkeypatch):
    from lit_transfusion.commands.cli import build_cli

    monkeypatch.setenv(hardware.ENV_CPU_BF16, "0")
    hardware._clear_caches()
    cli = build_cli(["--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path), "--trainer.logger=false",
                     "--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed"], run=False)
    hardware._clear_caches()
    assert cli.trainer.precision == "bf16-mixed"


class GradNormAfterStep(Callback):
    """The total gradient norm the optimizer stepped with (grads live until the next step's zero_grad)."""

    def __init__(self):
        self.norms, self.fused = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad.float().norm() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.stack(grads).norm()))
        self.fused.append(trainer.optimizers[0].defaults["fused"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_is_clipped_without_a_grad_scaler(tmp_path, precision):
    """fp32 and bf16-mixed step with the fused AdamW and still clip to gradient_clip_val (Lightning's plugin
    refuses to clip a fused optimizer under mixed precision; the module clips itself where no scaler exists)."""
    seen = GradNormAfterStep()
    t = trainer(tmp_path, max_steps=3, precision=precision, gradient_clip_val=1e-3, callbacks=[seen],
                limit_val_batches=0)
    t.fit(make_module(), loader(3))
    assert seen.fused == [True] * 3
    assert all(n == pytest.approx(1e-3, rel=1e-3) for n in seen.norms), seen.norms


# -------------------------------------------------------------------------------------- time budget
def test_time_budget_completes_the_schedule_and_writes_last(tmp_path):
    """A run stopped by max_time (long before max_steps) ends with the LR at its floor, validates at the stop,
    and writes last.ckpt with the final step."""
    module = make_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=10_000)
    t = trainer(tmp_path, max_steps=100_000, max_time={"seconds": 4}, callbacks=[ckpt], val_check_interval=10_000,
                check_val_every_n_epoch=None, limit_val_batches=1)
    data = loader(100_000)
    t.fit(module, data, data)
    step = t.global_step
    assert 0 < step < 100_000
    lr = t.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(module.hparams.min_lr, rel=0.05), "the cosine must reach its floor when time runs out"
    assert "val/loss" in t.callback_metrics, "a validation runs at the time stop"
    assert t.callback_metrics["val/schedule_progress"] >= 0.99
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == step


# ------------------------------------------------------------------------------- failures that stop
def test_nonfinite_loss_stops_naming_step_and_part_and_leaves_the_state_before_it(tmp_path):
    module = make_module()
    real = module.losses

    def poisoned(batch, **kw):
        out = real(batch, **kw)
        if module.trainer.global_step == 3:
            out["loss_image"] = out["loss_image"] * float("nan")
            out["loss"] = out["loss_text"] + out["loss_image"]
        return out

    module.losses = poisoned
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_exception=True)
    t = trainer(tmp_path, max_steps=10, callbacks=[ckpt], limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"step 3: loss_image=nan"):
        t.fit(module, loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3
    state = {k: v for k, v in module.state_dict().items()}
    assert all(torch.equal(saved["state_dict"][k], state[k]) for k in saved["state_dict"]), \
        "the checkpoint holds the weights before the non-finite step (nothing was updated by it)"


def test_nonfinite_loss_skip_counts_and_goes_on(tmp_path):
    module = make_module(nonfinite="skip")
    real = module.losses

    poisoned_steps = set()

    def poisoned(batch, **kw):
        out = real(batch, **kw)
        step = module.trainer.global_step
        if step in (2, 5) and step not in poisoned_steps:  # once each: a skipped step is retried with new data
            poisoned_steps.add(step)
            out["loss_text"] = out["loss_text"] * float("inf")
            out["loss"] = out["loss_text"] + out["loss_image"]
        return out

    module.losses = poisoned
    t = trainer(tmp_path, max_steps=8, limit_val_batches=0, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="non-finite training loss at step 2: loss_text=inf"):
        t.fit(module, loader())
    assert t.global_step == 8
    assert module._nonfinite_skipped == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_exception_leaves_a_resumable_checkpoint(tmp_path):
    module = make_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_exception=True)
    t = trainer(tmp_path, max_steps=8, callbacks=[ckpt, FailAt(5)], limit_val_batches=0)
    with pytest.raises(RuntimeError, match="planted failure"):
        t.fit(module, loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 5
    resumed = trainer(tmp_path, max_steps=8, limit_val_batches=0)
    resumed.fit(make_module(), loader(), ckpt_path=last)
    assert resumed.global_step == 8


# ------------------------------------------------------------------------------------ kill -9, resume
def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    """fp32 on CPU: a run killed (SIGKILL) after its step-20 checkpoint and resumed from it logs the same training
    loss at every step as a run that was never interrupted (same rows, timesteps, noise and learning rate). Without
    a time budget: with one, the learning rate follows the elapsed time, which no two runs share exactly."""
    args = ["fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path), "--trainer.max_steps=40",
            "--trainer.limit_val_batches=0", "--trainer.precision=32", "--trainer.max_time=null",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.logger.init_args.name=r",
            "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.init_args.every_n_train_steps=20", "--trainer.callbacks.init_args.save_top_k=-1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lit_transfusion", *args]
    whole = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    victim = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "runs" / "r" / "version_1" / "checkpoints" / "epoch=0-step=20.ckpt"
    deadline, size = time.time() + 300, -1
    while time.time() < deadline and victim.poll() is None:
        if ckpt.exists() and ckpt.stat().st_size == size > 0:
            break  # written completely (same size twice)
        size = ckpt.stat().st_size if ckpt.exists() else -1
        time.sleep(0.3)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    resumed = subprocess.run([*cmd, f"--ckpt_path={ckpt}"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _train_losses(tmp_path / "runs" / "r" / "version_0")
    b = _train_losses(tmp_path / "runs" / "r" / "version_2")
    assert sorted(b) == list(range(20, 40))
    for step in range(20, 40):
        assert a[step] == b[step], f"step {step}: {a[step]} uninterrupted vs {b[step]} resumed"
    assert not any(math.isnan(v) for v in a.values())
