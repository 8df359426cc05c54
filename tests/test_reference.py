"""``python -m lit_transfusion reference add | band | overlay`` on synthetic fit runs: TensorBoard scalars written as
Lightning logs them (at global step - 1), metrics.json as the evaluation callback writes it, config.yaml from the
main job's config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lit_transfusion.commands.main import main
from lit_transfusion.stats import mean_interval

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shapes" / "tiny.yaml"
VAL_STEPS = (1000, 2000)
POSITIONS_PER_STEP = 2000
HPARAMS = """vocab_size: 433
special_ids:
  boi: 3
  bos: 1
  eoi: 4
  eos: 2
  pad: 0
latent_shape: !!python/tuple
- 4
- 8
- 8
"""
MACHINE = {"cpu": "Test CPU", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"], "cores": 2, "gpu": None,
           "torch": "2.0"}
# val/ values by seed (exact in float32) at steps 1000 and 2000; val/cond_gap at 2000: mean 0.625, min 0.5, max 0.75.
SEEDS = {
    0: {"val/cond_gap": (0.125, 0.5), "val/fid": (140.0, 100.0), "val/loss_text": (0.75, 0.625)},
    1: {"val/cond_gap": (0.25, 0.625), "val/fid": (150.0, 110.0), "val/loss_text": (0.8125, 0.6875)},
    2: {"val/cond_gap": (0.375, 0.75), "val/fid": (160.0, 120.0), "val/loss_text": (0.875, 0.75)},
}
OTHER = {"val/geneval/overall": (0.0625, 0.25), "val/caption_f1": (0.125, 0.5), "val/kid": (50.0, 30.0),
         "val/loss_image": (0.03125, 0.0234375)}


def train_loss(seed: int, step: int) -> float:
    return 1.0 + 0.1 * seed + 1.0 / step  # 0.1 and 1/step are not exact in float32: what the file stores counts


def make_run(root: Path, name: str, seed: int, val: dict, lr: float = 1.0e-3, last_kid_step: int = 2000) -> Path:
    """runs/<name>/version_0 of a 2,000-step fit: event files, metrics.json, config.yaml, hparams.yaml."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / name / "version_0"
    with SummaryWriter(log_dir=str(run)) as writer:
        for step in range(25, 2001, 25):
            writer.add_scalar("train/loss_text", train_loss(seed, step), step - 1)
            writer.add_scalar("train/loss_image", 0.05 + 0.01 * seed, step - 1)
            writer.add_scalar("train/positions_seen", POSITIONS_PER_STEP * step, step - 1)
        for i, step in enumerate(VAL_STEPS):
            for tag, values in val.items():
                if tag != "val/kid" or step <= last_kid_step:
                    writer.add_scalar(tag, values[i], step - 1)
            writer.add_scalar("val/fid_n", 96.0 if step < 2000 else 384.0, step - 1)
            writer.add_scalar("val/schedule_progress", step / 2000, step - 1)
    history = [{"step": s, **{t: v[i] for t, v in val.items()}, "val/fid_n": 96.0 if s < 2000 else 384.0,
                "val/schedule_progress": s / 2000} for i, s in enumerate(VAL_STEPS)]
    metrics = {"latest": history[-1], "history": history,
               "run": {"machine": MACHINE, "precision": "bf16-mixed", "steps": 2000, "wall_seconds": 400.0}}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    config = yaml.safe_load(CONFIG.read_text())
    config["seed_everything"] = seed
    config["trainer"]["precision"] = "bf16-mixed"
    config["trainer"]["logger"]["init_args"]["name"] = name
    config["model"]["init_args"]["lr"] = lr
    (run / "config.yaml").write_text("# lightning.pytorch==2.6.6\n" + yaml.safe_dump(config, sort_keys=False))
    (run / "hparams.yaml").write_text(HPARAMS)
    return run


def error_of(argv: list[str], capsys) -> str:
    """The one-line error of a reference command that must fail with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three seeds of the main job and one run of another config, added to main_job/; a user's run beside."""
    tmp = tmp_path_factory.mktemp("reference")
    runs, into = tmp / "runs", tmp / "main_job"
    for seed, values in SEEDS.items():
        run = make_run(runs, f"main-seed{seed}", seed, {**values, **OTHER})
        main(["reference", "add", str(run), "--into", str(into), "--config", str(CONFIG)])
    other = make_run(runs, "lr-seed0", 0, {**SEEDS[0], **OTHER}, lr=3.0e-4)
    main(["reference", "add", str(other), "--into", str(into), "--config", str(CONFIG), "--name", "lr3e-4-seed0"])
    # The user's run: cond_gap below every seed, FID above, val/kid only at step 1000, the rest inside the band.
    user_values = {**SEEDS[1], **OTHER, "val/cond_gap": (0.25, 0.375), "val/fid": (150.0, 130.0)}
    user = make_run(runs, "user", 1, user_values, last_kid_step=1000)
    main(["reference", "band", "--runs", str(into), "--out", str(tmp / "reference")])
    return {"tmp": tmp, "runs": runs, "into": into, "band": tmp / "reference", "user": user}


def band_csv(directory: Path) -> dict[tuple[str, int], dict]:
    with open(directory / "band.csv", newline="") as f:
        return {(r["tag"], int(r["step"])): r for r in csv.DictReader(f)}


def test_add_copies_small_files_and_scalars_round_trip(world):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    entry = world["into"] / "avx512bf16-seed1"
    assert sorted(p.name for p in entry.iterdir()) == ["config.yaml", "hparams.yaml", "metrics.json", "scalars.csv",
                                                      "summary.json"]
    with open(entry / "scalars.csv", newline="") as f:
        rows = {(r["tag"], int(r["step"])): float(r["value"]) for r in csv.DictReader(f)}
    events = EventAccumulator(str(world["runs"] / "main-seed1" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    expected = {(tag, e.step + 1): float(e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert rows == expected  # every scalar, at the trainer's global step, value for value
    assert rows[("train/loss_text", 25)] == float(np.float32(train_loss(1, 25))) != train_loss(1, 25)
    summary = json.loads((entry / "summary.json").read_text())
    assert summary["seed"] == 1 and summary["steps"] == 2000 and summary["steps_per_s"] == 5.0
    assert summary["cpu_class"] == "avx512bf16" and summary["precision"] == "bf16-mixed" and summary["finished"]
    assert summary["params"] > 1_000_000 and summary["final"]["val/cond_gap"] == 0.625
    assert summary["flops_6nd"] == 6 * summary["params"] * POSITIONS_PER_STEP * 2000
    index = (world["into"] / "runs.md").read_text()
    assert all(f"| {n} |" in index for n in ("avx512bf16-seed0", "avx512bf16-seed2", "lr3e-4-seed0"))
    assert "| 100 (n=384) |" in index


def test_band_is_the_hand_computed_mean_min_max(world):
    rows = band_csv(world["band"])
    row = rows[("val/cond_gap", 2000)]
    mean, low, high = mean_interval([0.5, 0.625, 0.75])
    assert int(row["n"]) == 3 and float(row["mean"]) == pytest.approx(0.625, abs=1e-15)
    assert (float(row["min"]), float(row["max"])) == (0.5, 0.75)
    assert (float(row["low"]), float(row["high"])) == pytest.approx((low, high), abs=1e-12)
    # train/ losses: the mean over the window (750, 1000] of each run, then over runs.
    per_run = [np.mean([float(np.float32(train_loss(s, step))) for step in range(775, 1001, 25)]) for s in SEEDS]
    row = rows[("train/loss_text", 1000)]
    assert float(row["mean"]) == pytest.approx(np.mean(per_run), abs=1e-12)
    assert (float(row["min"]), float(row["max"])) == pytest.approx((min(per_run), max(per_run)), abs=1e-12)
    params = json.loads((world["into"] / "avx512bf16-seed0" / "summary.json").read_text())["params"]
    assert float(rows[("val/fid", 1000)]["flops"]) == pytest.approx(6 * params * POSITIONS_PER_STEP * 1000)
    assert {tag for tag, _ in rows} == {"val/cond_gap", "val/geneval/overall", "val/caption_f1", "val/fid", "val/kid",
                                        "val/loss_text", "val/loss_image", "train/loss_text", "train/loss_image"}
    assert sorted(step for tag, step in rows if tag == "train/loss_image") == list(range(250, 2001, 250))


def test_band_takes_the_largest_config_and_says_so(world):
    meta = json.loads((world["band"] / "band.json").read_text())
    assert [r["name"] for r in meta["runs"]] == ["avx512bf16-seed0", "avx512bf16-seed1", "avx512bf16-seed2"]
    assert [e["name"] for e in meta["excluded"]] == ["lr3e-4-seed0"]
    assert meta["excluded"][0]["differs"] == ["model.init_args.lr: 0.001 -> 0.0003"]
    text = (world["band"] / "band.md").read_text()
    assert f"`python -m lit_transfusion reference band --runs {world['into']} --out {world['band']} " in text
    assert "left out: lr3e-4-seed0 (model.init_args.lr: 0.001 -> 0.0003)" in text
    assert "| val/cond_gap | higher ↑ | 2000 | 3 | 0.625 [" in text
    assert (world["band"] / "band.png").stat().st_size > 10_000


def test_band_groups_runs_that_computed_the_same_schedule(tmp_path):
    """A cap a run never reached (``max_time`` of a run that ended by its steps), the progress bar and a callback
    that only counts FLOPs (a sweep adds it) do not split a band; a run that stopped by time did compute another
    schedule and is left out."""

    def run_with(name: str, seed: int, trainer: dict, flops_counter: bool = False) -> Path:
        run = make_run(tmp_path / "runs", name, seed, {**SEEDS[seed % 3], **OTHER})
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["trainer"].update(trainer)
        config["model"]["init_args"]["seed"] = seed  # a sweep passes its seed to the model's noise too
        if flops_counter:
            config["trainer"]["callbacks"].insert(1, {"class_path": "callbacks.flops.FlopsCounter"})
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        main(["reference", "add", str(run), "--into", str(tmp_path / "mj"), "--config", str(CONFIG)])
        return run

    run_with("capped-seed0", 0, {"max_steps": 2000, "max_time": "00:00:25:00", "enable_progress_bar": False})
    run_with("sweep-seed1", 1, {"max_steps": 2000, "max_time": None}, flops_counter=True)
    run_with("shipped-seed2", 2, {"max_steps": 2000, "max_time": "00:01:10:00"})
    run_with("timed-seed3", 3, {"max_steps": 4000, "max_time": "00:00:25:00"})  # stopped by time at 2,000
    main(["reference", "band", "--runs", str(tmp_path / "mj"), "--out", str(tmp_path / "band")])
    meta = json.loads((tmp_path / "band" / "band.json").read_text())
    assert [r["name"] for r in meta["runs"]] == ["avx512bf16-seed0", "avx512bf16-seed1", "avx512bf16-seed2"]
    assert [e["name"] for e in meta["excluded"]] == ["avx512bf16-seed3"]
    assert "trainer.max_steps: 2000 -> 4000" in meta["excluded"][0]["differs"]


def test_overlay_reads_a_run_against_the_band(world, capsys):
    out = world["tmp"] / "overlay"
    main(["reference", "overlay", str(world["user"]), "--band", str(world["band"]), "--out", str(out)])
    printed = capsys.readouterr().out
    text = (out / "overlay.md").read_text()
    assert printed.splitlines()[0] in text and (out / "overlay.png").is_file()
    assert ("within the reference band at step 2000 for 7 of 9 metrics; outside: val/cond_gap below (worse: higher "
            "is better), val/fid above (worse: lower is better); judged earlier: val/kid at step 1000") in printed
    assert "Skipped: 1 band step(s) the run has passed without a value there: val/kid: 2000." in printed
    assert "past the run's last logged step" not in printed
    assert "| val/cond_gap | 1000 |" in text and "| inside |" in text
    # Its config is the band's: no note; FID at the same n as the band's runs.
    assert "Note:" not in text


def test_overlay_of_an_entry_and_of_a_run_of_another_config(world, capsys):
    main(["reference", "overlay", str(world["into"] / "avx512bf16-seed2"), "--band", str(world["band"])])
    assert "within the reference band at step 2000 for 9 of 9 metrics." in capsys.readouterr().out
    assert (world["into"] / "avx512bf16-seed2" / "overlay.md").is_file()
    main(["reference", "overlay", str(world["into"] / "lr3e-4-seed0"), "--band", str(world["band"])])
    assert "differs from the band's (band -> run) in 1 key(s): model.init_args.lr: 0.001 -> 0.0003" in \
        capsys.readouterr().out


def test_steps_sets_runs_side_by_side_on_one_metric(world, capsys):
    """Per band step: the band and each run's value with its position; a step a run lacks is "—"; a metric the
    band does not have is a one-line error."""
    out = world["tmp"] / "steps.md"
    runs = f"[{world['user']},{world['into'] / 'avx512bf16-seed2'}]"
    main(["reference", "steps", runs, "--metric", "val/cond_gap", "--band", str(world["band"]), "--out", str(out)])
    text = out.read_text()
    assert capsys.readouterr().out == text
    assert "| step | band min – max | band mean [95 %] | user/version_0 | avx512bf16-seed2 |" in text
    assert "| 1000 | 0.125 – 0.375 | 0.25 [" in text and "| 0.25 (inside) | 0.375 (inside) |" in text
    assert "| 0.375 (below (worse: higher is better)) | 0.75 (inside) |" in text
    main(["reference", "steps", runs, "--metric", "val/kid", "--band", str(world["band"])])
    assert capsys.readouterr().out.splitlines()[-1].split(" | ")[-2:] == ["—", "30 (inside) |"]
    err = error_of(["reference", "steps", runs, "--metric", "val/nope", "--band", str(world["band"])], capsys)
    assert err.startswith("error: --metric val/nope: not in ")


def test_fewer_runs_than_min_runs_or_a_tie_is_a_one_line_error(world, capsys):
    into, out = str(world["into"]), str(world["tmp"] / "band2")
    err = error_of(["reference", "band", "--runs", into, "--out", out, "--names", "[avx512bf16-seed0,lr3e-4-seed0]"],
                   capsys)
    assert err.startswith("error: --min_runs 3: ") and "1 run(s) of one config" in err
    err = error_of(["reference", "band", "--runs", into, "--out", out, "--min_runs", "1",
                    "--names", "[avx512bf16-seed0,lr3e-4-seed0]"], capsys)
    assert "the largest tied at 1 runs" in err and "--names" in err
    assert not Path(out).exists()


def test_add_refuses_what_is_not_a_finished_fit_run(world, capsys, tmp_path):
    err = error_of(["reference", "add", str(tmp_path), "--into", str(tmp_path / "mj")], capsys)
    assert "no TensorBoard event files" in err
    run = make_run(tmp_path / "runs", "half", 0, OTHER)
    (run / "metrics.json").unlink()
    assert "no metrics.json" in error_of(["reference", "add", str(run), "--into", str(tmp_path / "mj")], capsys)
    assert not (tmp_path / "mj").exists()


def test_train_losses_are_averaged_over_complete_windows_only():
    from lit_transfusion.commands.reference.band import binned

    assert binned({25: 1.0, 250: 3.0, 275: 5.0, 500: 7.0}, 250) == {250: 2.0, 500: 6.0}
    assert binned({25: 1.0, 250: 3.0, 275: 5.0}, 250) == {250: 2.0}  # (250, 500] not reached yet: left out


def test_readme_quotes_the_committed_band():
    """The README's main-job numbers are the committed band's final values (3 significant digits)."""
    import csv

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    text = readme[readme.index("## What the main job reaches"):readme.index("## Commands")]
    rows = list(csv.DictReader((ROOT / "results" / "reference" / "band.csv").open()))
    last = max(int(r["step"]) for r in rows)
    final = {r["tag"]: r for r in rows if int(r["step"]) == last}

    def g3(x: str) -> str:
        return f"{float(x):#.3g}".rstrip(".")

    for tag in ("val/cond_gap", "val/geneval/overall", "val/caption_f1", "val/fid", "val/kid"):
        quoted = f"{g3(final[tag]['mean'])} [{g3(final[tag]['low'])}, {g3(final[tag]['high'])}]"
        assert quoted in " ".join(text.split()), f"README: {tag} should read {quoted} (results/reference/band.csv)"
