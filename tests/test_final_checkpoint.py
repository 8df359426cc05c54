"""The final state is kept at every way a fit can end: ``last.ckpt`` holds the step training ended at and the
weights in memory at that moment, whatever periodic checkpoints came before.

Every run here uses the checkpoint callback exactly as ``configs/shapes/tiny.yaml`` ships it (interval 1,000 steps)
and runs past that interval, so an earlier ``last.ckpt`` exists when the run stops: the case Lightning's own
``ModelCheckpoint`` gets wrong (it keeps the step-1,000 state)."""

from __future__ import annotations

import importlib
import itertools
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping

from callbacks.checkpoint import SIGTERM_EXIT, FinalCheckpoint
from callbacks.flops import FlopsBudget
from tests.conftest import ROOT
from tests.test_robust_training import FailAt, loader, make_module, trainer

MAIN_CONFIG = ROOT / "configs" / "shapes" / "tiny.yaml"


def shipped_callbacks(config: Path) -> list[dict]:
    return yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []


def shipped_checkpoint(config: Path, dirpath: Path) -> FinalCheckpoint:
    """The config's checkpoint callback, built from its own class_path and init_args (only the directory moved)."""
    spec = next(c for c in shipped_callbacks(config) if c["class_path"].endswith("Checkpoint"))
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**{**spec.get("init_args", {}), "dirpath": dirpath})


class Endless(torch.utils.data.IterableDataset):
    """The same packed batches over and over, without an epoch end (as a streamed dataset)."""

    def __init__(self):
        self.batches = list(loader(32))

    def __iter__(self):
        return itertools.cycle(self.batches)


def endless() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Endless(), batch_size=None, collate_fn=lambda b: b)


class Data(L.LightningDataModule):
    """For FlopsBudget, which measures positions per step on a datamodule's fresh loader."""

    def train_dataloader(self):
        return endless()

    def val_dataloader(self):
        return loader(1)


class At(Callback):
    """Call ``action(trainer)`` at the end of training step ``step`` (1-based global step after the update)."""

    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.action(trainer)


class FakeClock(Callback):
    """Lightning's Timer reads ``time.monotonic()`` in its own module: make it advance 0.1 s per training step, so
    a time budget ends at a known step whatever this machine's speed."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        timer = importlib.import_module("lightning.pytorch.callbacks.timer")
        monkeypatch.setattr(timer, "time", types.SimpleNamespace(monotonic=lambda: self.now))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.now += 0.1


def assert_final_state_kept(ckpt_dir: Path, step: int, state: dict, interval: int) -> None:
    """``last.ckpt`` holds ``step`` (past the periodic checkpoint at ``interval``) and the weights ``state``."""
    assert step > interval, "the run must pass the shipped checkpoint interval"
    assert (ckpt_dir / f"epoch=0-step={interval}.ckpt").is_file(), "the periodic checkpoint was written first"
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == step, f"last.ckpt holds step {saved['global_step']}, training ended at {step}"
    assert saved["state_dict"].keys() == state.keys()
    for k, v in saved["state_dict"].items():
        assert torch.equal(v, state[k]), f"{k}: last.ckpt differs from the weights in memory"


def build(stop: str, tmp_path: Path, monkeypatch=None):
    """(trainer, module, fit's keyword arguments, the step the run must end at, the checkpoint interval) of a run
    that ``stop`` ends, with the checkpoint callback exactly as configs/shapes/tiny.yaml ships it."""
    ckpt = shipped_checkpoint(MAIN_CONFIG, tmp_path / "ckpt")
    interval = ckpt._every_n_train_steps
    assert interval >= 100 and ckpt.save_last, "the shipped callback saves last.ckpt every few hundred steps"
    end = interval + 7  # past the interval, not on it
    module, callbacks, kw = make_module(), [ckpt], {"max_steps": 100 * interval, "limit_val_batches": 0}
    data = {"train_dataloaders": endless()}
    if stop == "max_steps":
        kw["max_steps"] = end
    elif stop == "max_time":
        callbacks.append(FakeClock(monkeypatch))
        kw["max_time"] = {"seconds": end * 0.1 - 0.05}
    elif stop == "flops_budget":
        budget = FlopsBudget(flops=1.0)  # re-planned below from the measured step cost
        per_step = 6 * sum(p.numel() for p in module.parameters()) * _positions_per_step()
        budget.flops = per_step * (end - 0.5)
        callbacks.append(budget)
        data = {"datamodule": Data()}
    elif stop == "early_stopping":
        callbacks.append(EarlyStopping(monitor="val/loss", stopping_threshold=float("inf")))  # stops at its first
        kw.update(val_check_interval=end, check_val_every_n_epoch=None, limit_val_batches=1)
        data["val_dataloaders"] = loader(1)
    elif stop in SIGNALS:  # the signal to this process at the end of step `end`, acted on in the same step
        callbacks.append(At(end, lambda trainer: os.kill(os.getpid(), SIGNALS[stop])))
    elif stop == "exception":
        callbacks.append(FailAt(end))
    return trainer(tmp_path, callbacks=callbacks, **kw), module, data, end, interval


SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}


@pytest.mark.parametrize("stop", ["max_steps", "max_time", "flops_budget", "early_stopping", "exception"])
def test_last_checkpoint_holds_the_final_state(tmp_path, monkeypatch, stop):
    t, module, data, end, interval = build(stop, tmp_path, monkeypatch)
    if stop == "exception":
        with pytest.raises(RuntimeError, match="planted failure"):
            t.fit(module, **data)
    else:
        t.fit(module, **data)
    assert t.global_step == end, f"{stop}: stopped at {t.global_step}, planned {end}"
    assert_final_state_kept(tmp_path / "ckpt", t.global_step, module.state_dict(), interval)


def run_until_signal(stop: str, out: str) -> None:
    """A whole process stopped by ``stop``'s signal (the way a cluster pre-empts a job; a signal to pytest's own
    process would change its handlers): fit, then save the trainer's step and the weights in memory to
    ``out/result.pt`` and exit with fit's exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell starts us with SIGINT ignored
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    t, module, data, _, _ = build(stop, Path(out))
    code = 0
    try:
        t.fit(module, **data)
    except SystemExit as e:
        code = e.code
    torch.save({"global_step": t.global_step, "state_dict": module.state_dict()}, Path(out) / "result.pt")
    raise SystemExit(code)


@pytest.mark.parametrize("stop, status", [("sigterm", SIGTERM_EXIT), ("sigint", 1)])
def test_a_signal_leaves_the_final_state(tmp_path, stop, status):
    """SIGTERM: exit status 143 (a pre-empted run must not look finished to a sweep); SIGINT: Lightning's 1."""
    code = f"from tests.test_final_checkpoint import run_until_signal; run_until_signal({stop!r}, {str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == status, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", map_location="cpu", weights_only=False)
    interval = shipped_checkpoint(MAIN_CONFIG, tmp_path / "unused")._every_n_train_steps
    assert result["global_step"] == interval + 7, f"{stop}: stopped at {result['global_step']}"
    assert_final_state_kept(tmp_path / "ckpt", result["global_step"], result["state_dict"], interval)


def _positions_per_step() -> float:
    batches = Endless().batches
    return sum(int((b.seq.doc_ids >= 0).sum()) for b in batches[:4]) / 4  # FlopsBudget probes 4 batches


def test_every_shipped_checkpoint_keeps_the_final_state():
    """Every shipped config (fit, autoencoders, sweeps) checkpoints with FinalCheckpoint, and saves last.ckpt."""
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    found = 0
    for config in configs:
        data = yaml.safe_load(config.read_text())
        sections = [data.get("trainer", {}).get("callbacks") or [],
                    (data.get("overrides") or {}).get("trainer.callbacks") or []]
        for spec in itertools.chain(*sections):
            if spec["class_path"].endswith("Checkpoint"):
                found += 1
                assert spec["class_path"] == "callbacks.checkpoint.FinalCheckpoint", config
                assert spec.get("init_args", {}).get("save_last"), f"{config}: save_last"
    assert found >= 6
