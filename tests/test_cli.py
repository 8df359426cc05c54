"""The command line: every shipped YAML parses, a 2-step fit runs end to end, bad input fails clearly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_transfusion.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def small_run_args(tmp: Path) -> list[str]:
    """Shrink the tiny config to seconds: a nano model, 64 training images, 2 steps."""
    return [
        "--model.init_args.size=nano",
        f"--data.init_args.data_dir={tmp / 'cache'}",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=32",
        "--data.init_args.val_rows=4",
        "--data.init_args.cond_gap_pairs=16",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
    ]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lit_transfusion", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_two_step_fit_writes_checkpoint_and_tensorboard(tmp_path):
    proc = run_cli("fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = tmp_path / "runs" / "shapes-tiny" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/loss_text", "train/loss_image", "train/lr", "train/tokens_per_s",
                "val/loss", "val/loss_text", "val/loss_image", "val/cond_gap"]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.init_args.not_a_setting=1"], "not_a_setting"),
        (["--model.init_args.image_loss_weight=-1"], "image_loss_weight"),
        (["--model.init_args.patch_size=3"], "patch_size=3"),
        (["--data.init_args.vae_path=/nonexistent/vae"], "/nonexistent/vae"),
        (["--data.init_args.tokenizer_path=/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
        (["--model.init_args.patcher=mlp"], "patcher"),
    ],
    ids=["unknown-key", "negative-lambda", "patch-size", "missing-vae", "missing-tokenizer", "bad-patcher"],
)
def test_bad_input_fails_at_start_naming_the_setting(tmp_path, override, expected):
    proc = run_cli("fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path), *override)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))
