"""The command line: every shipped YAML parses, a 2-step fit runs end to end, bad input fails clearly."""

import json
from pathlib import Path

import pytest
import torch

from lit_transfusion.commands.main import main
from tests.conftest import run_cli, small_run_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# Sweep files and `prepare` configs are not LightningCLI configs: each kind is checked by its own command.
SWEEPS = [c for c in CONFIGS if "sweeps" in c.relative_to(ROOT / "configs").parts]  # gpu/ too
PREPARE = [c for c in CONFIGS if c.name == "prepare.yaml"]
# Overlays change a few settings of the main job's config and are given after it: --config tiny.yaml --config X.
OVERLAYS = [c for c in CONFIGS if "overlays" in c.relative_to(ROOT / "configs").parts]
TRAINER = [c for c in CONFIGS if c not in SWEEPS and c not in PREPARE and c not in OVERLAYS]


@pytest.mark.parametrize("config", TRAINER, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("config", OVERLAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_overlay_changes_the_main_job_as_it_says(config, capsys):
    """An overlay parses on top of configs/shapes/tiny.yaml, and every setting it names ends up in the result."""
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/shapes/tiny.yaml", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    merged = yaml.safe_load(capsys.readouterr().out)

    def settings(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from settings(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for key, value in settings(yaml.safe_load(config.read_text())):
        node = merged
        for part in key.split("."):
            node = node[part]
        assert node == value, key


@pytest.mark.parametrize("config", PREPARE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_prepare_config_parses(config):
    from datamodules.files.prepare import prepare_parser

    ns = prepare_parser().parse_args(["--config", str(config)])
    assert ns.sources and ns.out_dir and ns.vae_path


def test_two_step_fit_writes_checkpoint_and_tensorboard(trained_run):
    version = trained_run
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/loss_text", "train/loss_image", "train/lr", "train/tokens_per_s",
                "val/loss", "val/loss_text", "val/loss_image", "val/cond_gap", "train/mse_image", "val/mse_image"]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"


@pytest.mark.slow
def test_ddp_on_cpu_in_a_subprocess(tmp_path):
    """Two gloo processes (never in-process DDP under pytest: rank 1 would re-run pytest). The evaluation
    callback runs on rank 0 alone: it must not wait on rank 1 (no metric gathers), and its values get logged."""
    proc = run_cli("fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path),
                   "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = tmp_path / "runs" / "shapes-tiny" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    expected = {"val/cond_gap", "val/loss_image", "val/geneval/overall", "val/fid", "val/ppl_text"}
    assert expected <= set(events.Tags()["scalars"])
    assert "val/fid" in json.loads((version / "metrics.json").read_text())["latest"]


@pytest.mark.slow
def test_fsdp2_on_cpu_in_a_subprocess(tmp_path):
    """FSDP2 (ModelParallelStrategy + TransfusionModule.configure_model) on two gloo processes. Sharded forwards
    need every rank, so the evaluation callback runs on both; rank 0 logs it."""
    proc = run_cli("fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path),
                   '--trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}',
                   "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.gradient_clip_val=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = tmp_path / "runs" / "shapes-tiny" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").exists()  # a distributed checkpoint (a directory)
    latest = json.loads((version / "metrics.json").read_text())["latest"]
    assert {"val/loss_text", "val/cond_gap", "val/geneval/overall", "val/fid"} <= set(latest)
    # `sample` gathers the shards of the directory checkpoint into one model
    ckpt = version / "checkpoints" / "last.ckpt"
    proc = run_cli("sample", "--ckpt_path", str(ckpt), "--prompt", "a red circle", "--num_images", "1",
                   "--steps", "2", "--scheduler", "ddim", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "s" / "grid.png").is_file()
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    from lit_transfusion.commands.load import load_run

    module = load_run(ckpt)[0]
    saved = _load_distributed_checkpoint(ckpt)["state_dict"]
    loaded = module.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def assert_one_line_error(proc, *expected: str) -> None:
    """Exit status 2, no traceback, no usage block or jsonargparse dump: stderr ends with exactly one line
    ``error: ...`` that holds every expected word (info lines such as "Seed set to 0" may come before it)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-2000:]
    for marker in ("usage:", "Given value", "Subtypes:", "Problem with given class_path"):
        assert marker not in proc.stderr, proc.stderr[-2000:]
    for word in expected:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.init_args.not_a_setting=1"], ["model.init_args", "not_a_setting", "not accepted"]),
        (["--model.init_args.image_loss_weight=-1"], ["image_loss_weight", ">=0"]),
        (["--model.init_args.patch_size=3"], ["patch_size=3", "8x8"]),
        (["--data.init_args.vae_path=/nonexistent/vae"], ["data.vae_path", "/nonexistent/vae", "does not exist"]),
        (["--data.init_args.tokenizer_path=/nonexistent/tokenizer.json"],
         ["data.tokenizer_path", "/nonexistent/tokenizer.json"]),
        (["--model.init_args.patcher=mlp"], ["model.init_args.patcher", "'linear', 'unet'", "mlp"]),
        (["--model.init_args.snr_gamma=0"], ["model.init_args.snr_gamma", "v>0"]),
        (["--model.init_args.snr_gamma=null", "--model.init_args.timestep_sampling=importance"],
         ["timestep_sampling", "snr_gamma"]),
        (["--trainer.max_steps=abc"], ["trainer.max_steps", "int", "abc"]),
    ],
    ids=["unknown-key", "negative-lambda", "patch-size", "missing-vae", "missing-tokenizer", "bad-patcher",
         "zero-snr-gamma", "importance-without-gamma", "bad-trainer-type"],
)
def test_bad_input_fails_at_start_naming_the_setting(tmp_path, override, expected):
    proc = run_cli("fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path), *override)
    assert_one_line_error(proc, *expected)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_errors_during_training_keep_their_traceback(tmp_path, monkeypatch):
    """Only settings are reported in one line: a ValueError raised by the training loop itself propagates."""
    from lit_transfusion.module import TransfusionModule

    def broken_step(self, batch, batch_idx):
        raise ValueError("raised inside training_step")

    monkeypatch.setattr(TransfusionModule, "training_step", broken_step)
    monkeypatch.chdir(ROOT)  # the config's relative paths (the shipped VAE)
    with pytest.raises(ValueError, match="raised inside training_step"):
        main(["fit", "--config", "configs/shapes/tiny.yaml", *small_run_args(tmp_path),
              "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"])


def test_sample_writes_images_grid_and_text(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_cli("sample", "--ckpt_path", str(ckpt), "--prompt", "a red circle", "--prompt", "two squares",
                   "--num_images", "2", "--steps", "3", "--scheduler", "ddim", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "s" / "grid.png").is_file()
    pngs = sorted(p.name for p in (tmp_path / "s").glob("00*.png"))
    assert pngs == ["000_0.png", "000_1.png", "001_0.png", "001_1.png"]
    # captioning a rendered scene
    import torch
    from torchvision.io import write_png

    from datamodules.shapes import ShapesWorld

    img = torch.from_numpy(ShapesWorld(0).sample("test", 0).image).permute(2, 0, 1).contiguous()
    write_png(img, str(tmp_path / "scene.png"))
    proc = run_cli("sample", "--ckpt_path", str(ckpt), "--image", str(tmp_path / "scene.png"),
                   "--max_new_tokens", "5", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caption" in (tmp_path / "c" / "samples.json").read_text()


@pytest.mark.parametrize("case", ["missing-ckpt", "corrupt-ckpt", "plain-directory", "bad-scheduler", "not-an-image"])
def test_sample_bad_input_is_one_clear_line(trained_run, tmp_path, case):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    args = ["--ckpt_path", str(ckpt), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "o")]
    expected = ""
    if case == "missing-ckpt":
        args[1], expected = str(tmp_path / "nope.ckpt"), "nope.ckpt"
    elif case == "corrupt-ckpt":
        bad = trained_run / "checkpoints" / "corrupt.ckpt"
        bad.write_bytes(b"not a checkpoint")
        args[1], expected = str(bad), "corrupt.ckpt"
    elif case == "plain-directory":
        plain = trained_run / "checkpoints" / "a_dir.ckpt"
        plain.mkdir(exist_ok=True)
        args[1], expected = str(plain), "not a distributed checkpoint"
    elif case == "bad-scheduler":
        args += ["--scheduler", "euler"]
        expected = "scheduler: expected a typing.Literal['ddpm', 'ddim', 'dpm++']. Got value: euler"
    else:
        (tmp_path / "fake.png").write_text("hello")
        args = ["--ckpt_path", str(ckpt), "--image", str(tmp_path / "fake.png")]
        expected = "fake.png"
    proc = run_cli("sample", *args)
    assert_one_line_error(proc, expected)


def test_sample_help_and_sampling_config_agree_on_every_default():
    """`sample`'s sampling options come from SamplingConfig: same names, same defaults, nothing extra."""
    import dataclasses

    from lit_transfusion.commands.sample import parser
    from lit_transfusion.generation import SamplingConfig

    defaults = parser().get_defaults()
    for f in dataclasses.fields(SamplingConfig):
        assert defaults[f.name] == f.default, f.name
    help_text = parser().format_help()
    for f in dataclasses.fields(SamplingConfig):
        assert f"--{f.name}" in help_text and "default:" in help_text


def test_vae_is_its_own_command():
    proc = run_cli("vae", "fit", "--config", "configs/shapes/vae.yaml", "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lit_transfusion.vae.VAEModule" in proc.stdout and "export_dir" in proc.stdout


@pytest.mark.parametrize("config", SWEEPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_sweep_file_is_valid(config, capsys):
    """Every shipped sweep: its keys, its grid and every run's overrides pass validation (a dry run)."""
    main(["sweep", "--config", str(config), "--dry_run"])
    assert "seed" in capsys.readouterr().out
