"""Sweeps: a sweep file -> checked runs -> ordinary fits in subprocesses -> results.csv / .md / curves.png.

The fast tests check the file format, the checks, the run ids and command lines, the scheduler and the SLURM
script without training. The slow ones share one tiny sweep (configs/sweeps/tiny_test.yaml: 2 variants × 2 seeds,
nano model, 6 steps, plus a variant that fails at start) run through the real command line.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_transfusion.commands.sweep import results as sweep_results
from lit_transfusion.commands.sweep.expand import FLOPS_CALLBACK, Run, cli_value, expand, fit_args
from lit_transfusion.commands.sweep.load import load_sweep
from lit_transfusion.commands.sweep.main import main
from lit_transfusion.commands.sweep.runner import schedule
from lit_transfusion.commands.sweep.schema import SlurmSection, SweepError
from lit_transfusion.commands.sweep.slurm import submit_slurm
from lit_transfusion.commands.sweep.validate import validate
from tests.conftest import ROOT, run_cli

TINY = ROOT / "configs" / "sweeps" / "tiny_test.yaml"
SWEEPS = sorted((ROOT / "configs" / "sweeps").rglob("*.yaml"))  # gpu/ included


def write_sweep(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def error_of(argv: list[str], capsys) -> str:
    """The one-line error of a sweep command that must fail with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- fast
def test_runs_are_variants_times_grid_times_seeds_seed_major(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", name="s", base="configs/shapes/tiny.yaml",
                       grid={"model.init_args.patch_size": [1, 2], "data.init_args.patch_size": [4]},
                       variants=[{"name": "causal", "model.init_args.image_loss_weight": 1.0}, {"name": "plain"}],
                       seeds=[0, 1])
    runs = expand(load_sweep(path))
    assert len(runs) == 2 * 2 * 2
    assert [r.index for r in runs] == list(range(8))
    # Two keys end in patch_size: each gets the shortest suffix the other does not share.
    assert runs[0].run_id == "causal-model.init_args.patch_size=1-data.init_args.patch_size=4-seed0"
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4  # every setting's first seed comes first
    assert runs[2].variant == "plain-model.init_args.patch_size=1-data.init_args.patch_size=4"
    assert runs[0].settings == {"model.init_args.image_loss_weight": 1.0, "model.init_args.patch_size": 1,
                                "data.init_args.patch_size": 4}
    assert runs[0].sources["model.init_args.image_loss_weight"] == "variants[causal]"
    assert runs[0].sources["model.init_args.patch_size"] == "grid"
    assert [r.run_id for r in expand(load_sweep(TINY))] == ["lambda1-seed0", "lambda5-seed0", "lambda1-seed1",
                                                             "lambda5-seed1"]


def test_values_reach_the_command_line_unchanged():
    assert cli_value("causal") == "causal"
    assert cli_value(2) == "2" and cli_value(1.0e-3) == "0.001" and cli_value(None) == "null"
    assert cli_value(True) == "true"
    assert cli_value("1") == '"1"'  # a string that YAML would read as a number stays a string
    assert cli_value("a: b") == '"a: b"'
    assert json.loads(cli_value([{"class_path": "x", "init_args": {"k": 1}}])) == [{"class_path": "x",
                                                                                    "init_args": {"k": 1}}]


def test_fit_arguments_pin_the_run_directory_seed_and_flops_callback(tmp_path):
    sweep = load_sweep(TINY)
    run = expand(sweep)[3]
    args = fit_args(sweep, run, tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert args[:3] == ["fit", "--config", "configs/shapes/tiny.yaml"]
    assert "--model.init_args.image_loss_weight=5.0" in args
    assert "--seed_everything=1" in args and "--model.init_args.seed=1" in args
    logger = json.loads(next(a for a in args if a.startswith("--trainer.logger=")).split("=", 1)[1])
    # <save_dir>/<name>/<version> is the run directory, whatever exists there already
    assert Path(logger["init_args"]["save_dir"], logger["init_args"]["name"], logger["init_args"]["version"]) == (
        tmp_path / "tiny_test" / "runs" / "lambda5-seed1")
    assert f"--trainer.callbacks+={FLOPS_CALLBACK}" in args
    assert args[-1] == f"--ckpt_path={tmp_path / 'last.ckpt'}"
    # the runner's own keys come after the file's, so nothing in the file can silently move them
    assert args.index("--seed_everything=1") > args.index("--model.init_args.image_loss_weight=5.0")


@pytest.mark.parametrize("sections, where", [
    ({"grids": {"model.init_args.patch_size": [1]}}, "grids: unknown key"),
    ({"grid": {}}, "grid: empty"),
    ({"grid": {"model.init_args.patch_size": []}}, "grid: model.init_args.patch_size: empty list"),
    ({"grid": {"model.init_args.patch_size": 2}}, "grid: model.init_args.patch_size: a list of values"),
    ({}, "grid: a sweep needs a grid or variants"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants[1]: duplicate variant name 'a'"),
    ({"variants": [{"model.init_args.lr": 1.0}]}, "variants[0]: a mapping with a name"),
    ({"grid": {"seed_everything": [1, 2]}}, "grid: seed_everything: set by the sweep runner"),
    ({"grid": {"model.init_args.lr": [1.0]}, "variants": [{"name": "v", "model.init_args.lr": 2.0}]},
     "variants[v]: model.init_args.lr: also in the grid"),
    ({"grid": {"model.init_args.lr": [1.0]}, "slurm": {"partitions": "gpu"}}, "slurm.partitions: unknown key"),
    ({"grid": {"model.init_args.lr": [1.0]}, "seeds": []}, "seeds: a non-empty list"),
])
def test_a_wrong_sweep_file_names_the_file_and_key(tmp_path, capsys, sections, where):
    path = write_sweep(tmp_path / "bad.yaml", name="bad", base="configs/shapes/tiny.yaml", **sections)
    err = error_of(["--config", str(path), "--out", str(tmp_path / "out"), "--dry_run"], capsys)
    assert err.startswith(f"error: {path}: {where}"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, key, value, message", [
    ("grid", "model.init_args.patchsize", [1, 2], "'patchsize' is not accepted"),
    ("overrides", "trainer.max_stepz", 3, "unrecognized arguments"),
    ("overrides", "data.init_args.num_train", 0, "PositiveInt"),
])
def test_a_key_the_parser_rejects_is_found_before_any_run(tmp_path, capsys, section, key, value, message):
    """Every run's whole argument list goes through the Transfusion parser; the error names the setting."""
    sections = {"overrides": {"model.init_args.size": "nano"}, "grid": {"model.init_args.image_loss_weight": [1.0]}}
    sections.setdefault(section, {})[key] = value
    path = write_sweep(tmp_path / "typo.yaml", name="typo", base="configs/shapes/tiny.yaml", **sections)
    err = error_of(["--config", str(path), "--out", str(tmp_path / "out")], capsys)  # not a dry run
    assert err.startswith(f"error: {path}: {section}: {key}: "), err
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_variant_key_the_parser_rejects_is_named_with_its_variant(tmp_path):
    path = write_sweep(tmp_path / "v.yaml", name="v", base="configs/shapes/tiny.yaml",
                       variants=[{"name": "good", "model.init_args.lr": 0.001},
                                 {"name": "typo", "model.init_args.lrr": 0.001}])
    sweep = load_sweep(path)
    with pytest.raises(SweepError, match=r"variants\[typo\]: model.init_args.lrr: .*'lrr' is not accepted"):
        validate(sweep, expand(sweep), tmp_path)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(ROOT / "configs" / "sweeps")))
def test_every_shipped_sweep_file_is_valid(path, tmp_path):
    sweep = load_sweep(path.relative_to(ROOT))
    runs = expand(sweep)
    validate(sweep, runs, tmp_path)
    assert len(runs) == (len(sweep.seeds) * max(len(sweep.variants), 1) * math.prod(map(len, sweep.grid.values()))
                         * max(len(sweep.budgets), 1))


def test_dry_run_lists_the_runs_and_starts_none(tmp_path, capsys):
    main(["--config", str(TINY), "--out", str(tmp_path), "--dry_run"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["0", "lambda1-seed0", "model.init_args.image_loss_weight=1.0", "seed=0"]
    assert [line.split()[1] for line in out[:4]] == ["lambda1-seed0", "lambda5-seed0", "lambda1-seed1",
                                                     "lambda5-seed1"]
    assert out[4].startswith("4 runs")
    assert not list(tmp_path.iterdir())


def test_sbatch_script_is_an_array_of_only_i(tmp_path, capsys):
    main(["--config", str(TINY), "--out", str(tmp_path), "--sbatch", "--partition", "gpu", "--time", "90",
          "--gpus", "1", "--cpus", "8"])
    script = tmp_path / "tiny_test" / "sweep.sbatch"
    assert f"sbatch {script}" in capsys.readouterr().out
    text = script.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --time=01:30:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", "#SBATCH --ntasks=1", f"cd {ROOT}"):
        assert line in lines, line
    assert lines[-1].endswith(f'sweep --config {TINY} --out {tmp_path} --only "$SLURM_ARRAY_TASK_ID"')
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # the shell accepts it


def test_scheduler_runs_new_data_alone_and_the_rest_in_parallel():
    """A run whose data settings no run has finished with starts only when nothing else runs (it may write a
    cache the others would read); the others run ``parallel`` at a time."""
    runs = [Run(i, f"r{i}", "v", {"data.init_args.num_train": 64 if i < 4 else 32}, {}, seed=0) for i in range(6)]
    active: set[int] = set()
    overlaps: list[set[int]] = []
    lock = threading.Lock()

    told_alone: dict[int, bool] = {}

    def one(run: Run, alone: bool) -> dict:
        with lock:
            active.add(run.index)
            overlaps.append(set(active))
            told_alone[run.index] = alone
        time.sleep(0.05)
        with lock:
            active.discard(run.index)
        return {"status": "failed" if run.index == 4 else "finished"}

    records = schedule(runs, 2, one, warm=set())
    assert sorted(r["index"] for r in records) == list(range(6))
    alone = [s for s in overlaps if {0, 4, 5} & s]  # 0: first of its data; 4 failed, so 5 was first again
    assert all(len(s) == 1 for s in alone), overlaps
    assert max(len(s) for s in overlaps) == 2  # the runs with warm data did overlap
    # ... and each run was told whether it runs alone (then it may take every core)
    assert told_alone == {0: True, 1: False, 2: False, 3: False, 4: True, 5: True}


def test_markdown_bolds_the_best_mean_in_each_direction(tmp_path):
    def run(variant, seed, loss, gap, status="finished"):
        return {"run_id": f"{variant}-seed{seed}", "variant": variant, "seed": seed, "status": status, "steps": 6,
                "final": {"val/loss": loss, "val/cond_gap": gap}, "flops_6nd": 10.0, "flops_measured": 8.0,
                "error": "" if status == "finished" else "boom"}

    runs = [run("a", 0, 1.0, 0.1), run("a", 1, 3.0, 0.3), run("b", 0, 1.5, 0.5), run("b", 1, 1.5, 0.7),
            run("c", 0, 0.1, 9.0, status="failed")]
    sweep_results.write_markdown(runs, ["val/loss", "val/cond_gap"], tmp_path / "r.md")
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "r.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    # mean [95 % interval], Student t with 1 df (12.706): 0.6 ± 12.706 · 0.1414 / √2 = 0.6 ± 1.2706
    assert "**1.5 [1.5, 1.5]**" in rows["b"] and "**0.6 [-0.6706, 1.871]**" in rows["b"]  # lower loss, higher gap
    assert "2 [-10.71, 14.71]" in rows["a"] and "**" not in rows["a"]
    assert "0 (failed)" in rows["c"] and "— | —" in rows["c"]  # a failed run's numbers are not counted
    assert "| 20 | 16 |" in rows["a"]  # total compute over the variant's runs
    assert "`c-seed0`: boom" in (tmp_path / "r.md").read_text()


# ----------------------------------------------------------------------------------------------- slow
def tiny_sweep(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess | None]:
    """configs/sweeps/tiny_test.yaml plus a variant that fails at start (trainer.max_steps=-5), its data cache in
    a temporary directory, run once per test session: (sweep file, sweep directory, the sweep's process)."""
    base = tmp_path_factory.getbasetemp() / "tiny_sweep"
    file, out = base / "tiny_test.yaml", base / "out"
    if (base / "done").is_file():
        return file, out / "tiny_test", None
    base.mkdir(exist_ok=True)
    spec = yaml.safe_load(TINY.read_text())
    spec["overrides"]["data.init_args.data_dir"] = str(base / "cache")
    spec["variants"].append({"name": "broken", "trainer.max_steps": -5})
    write_sweep(file, **spec)
    proc = run_cli("sweep", "--config", str(file), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    (base / "done").write_text("")
    return file, out / "tiny_test", proc


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return tiny_sweep(tmp_path_factory)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_runs_end_to_end_and_tabulates(swept):
    file, directory, proc = swept
    runs = {d.name: d for d in (directory / "runs").iterdir()}
    assert sorted(runs) == sorted(f"{v}-seed{s}" for v in ("lambda1", "lambda5", "broken") for s in (0, 1))
    good = [d for name, d in runs.items() if not name.startswith("broken")]
    for d in good:
        done = json.loads((d / "done.json").read_text())
        assert done["status"] == "finished" and done["seconds"] > 0
        for name in ("config.yaml", "command.txt", "metrics.json", "flops.json", "run.json",
                     "checkpoints/last.ckpt"):
            assert (d / name).is_file(), (d, name)
        assert f"version\": \"{d.name}\"" in (d / "command.txt").read_text()
        assert done["final"]["val/loss"] == json.loads((d / "metrics.json").read_text())["latest"]["val/loss"]
        seed = json.loads((d / "run.json").read_text())["seed"]
        assert yaml.safe_load((d / "config.yaml").read_text())["model"]["init_args"]["seed"] == seed
    for name in ("broken-seed0", "broken-seed1"):  # failed at start, recorded; the others went on
        done = json.loads((runs[name] / "done.json").read_text())
        assert done["status"] == "failed" and done["returncode"] != 0
        assert any("max_steps" in line for line in done["error"])

    rows = {r["run_id"]: r for r in read_csv(directory / "results.csv")}
    assert set(rows) == set(runs)
    for d in good:
        row, latest = rows[d.name], json.loads((d / "metrics.json").read_text())["latest"]
        flops = json.loads((d / "flops.json").read_text())
        assert row["status"] == "finished" and int(row["steps"]) == 7
        # the reported metrics and last.ckpt are of the same, final step (7: on neither 3-step interval)
        last = torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert latest["step"] == last["global_step"] == 7
        assert row["model.init_args.image_loss_weight"] == ("1.0" if "lambda1" in d.name else "5.0")
        for metric in ("val/loss", "val/cond_gap", "val/loss_image"):
            assert float(row[f"final/{metric}"]) == latest[metric]  # exact: read back from metrics.json
        history = [e["val/loss"] for e in json.loads((d / "metrics.json").read_text())["history"]]
        assert float(row["best/val/loss"]) == min(history) and len(history) == 3  # steps 3, 6 and the final 7
        assert int(row["params"]) == flops["params"] > 0
        assert int(row["flops_measured"]) == flops["flops_per_step"] * 7 == flops["flops_measured"]
        assert int(row["flops_6nd"]) == 6 * flops["params"] * flops["positions_seen"] == flops["flops_6nd"]
        assert int(row["positions_seen"]) == flops["positions_seen"] > 0
    assert rows["broken-seed0"]["status"] == "failed" and "max_steps" in rows["broken-seed0"]["error"]

    md = (directory / "results.md").read_text()
    assert "| lambda1 |" in md and "| lambda5 |" in md and md.count("**") >= 4  # a bold best in each column
    assert "`broken-seed0`" in md
    png = (directory / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    curves = read_csv(directory / "curves.csv")
    assert {(r["run_id"], r["metric"], r["step"]) for r in curves} >= {("lambda1-seed0", "val/loss", "7")}
    # TensorBoard HPARAMS: one run per finished run, with its final metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hp = EventAccumulator(str(directory / "hparams" / "lambda5-seed1"))
    hp.Reload()
    assert "_hparams_/session_start_info" in hp.PluginTagToContent("hparams")
    final = json.loads((runs["lambda5-seed1"] / "metrics.json").read_text())["latest"]["val/loss"]
    assert hp.Scalars("val/loss")[-1].value == pytest.approx(final)
    assert sorted(p.name for p in (directory / "hparams").iterdir()) == sorted(d.name for d in good)


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_retries_failed_ones(swept):
    file, directory, _ = swept
    stamps = {d.name: (d / "done.json").stat().st_mtime_ns for d in (directory / "runs").iterdir()}
    proc = run_cli("sweep", "--config", str(file), "--out", str(directory.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished before, skipped") == 4
    for name, stamp in stamps.items():
        changed = (directory / "runs" / name / "done.json").stat().st_mtime_ns != stamp
        assert changed == name.startswith("broken"), name
    attempts = (directory / "runs" / "broken-seed1" / "attempts.jsonl").read_text().splitlines()
    assert len(attempts) >= 2


@pytest.mark.slow
def test_collect_rebuilds_the_files_from_the_run_directories(swept, capsys):
    _, directory, _ = swept
    before = {name: (directory / name).read_bytes() for name in ("results.csv", "results.md", "curves.csv")}
    for name in ("results.csv", "results.md", "curves.csv", "curves.png"):
        (directory / name).unlink()
    shutil.rmtree(directory / "hparams")
    main(["--collect", str(directory)])
    for name, content in before.items():
        assert (directory / name).read_bytes() == content, name
    assert (directory / "curves.png").stat().st_size > 20_000 and (directory / "hparams").is_dir()
    assert "| lambda1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_submitit_array_gets_one_function_per_unfinished_run(swept, tmp_path, monkeypatch):
    """submitit's own debug executor (the local stand-in for its SLURM one) receives the array."""
    file, directory, _ = swept
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(file)
    runs = expand(sweep)
    jobs = submit_slurm(sweep, runs, directory.parent, SlurmSection(partition="gpu", time=30, gpus=1), parallel=2,
                        cluster="debug")
    unfinished = [r.index for r in runs if r.run_id.startswith("broken")]
    assert [j.submission().args[2] for j in jobs] == unfinished
    assert all(j.submission().function.__name__ == "run_index" for j in jobs)
    assert jobs[0].submission().args[:2] == (str(file.resolve()), str(directory.parent.resolve()))
    record = jobs[0].result()  # runs that run here, in this process, the way a SLURM task would
    assert record["status"] == "failed" and any("max_steps" in line for line in record["error"])


@pytest.mark.slow
def test_only_i_resumes_an_interrupted_run_and_touches_no_other(swept):
    """Simulate a run killed after its step-3 checkpoint (last.ckpt at step 3, no done.json): ``--only i``
    resumes it from that checkpoint and trains steps 4..7; no other run is touched."""
    file, directory, _ = swept
    run = expand(load_sweep(file))[1]
    d = directory / "runs" / run.run_id
    (d / "done.json").unlink()
    shutil.copy(d / "checkpoints" / "epoch=0-step=3.ckpt", d / "checkpoints" / "last.ckpt")
    events_before = set(d.glob("events.out.tfevents.*"))
    stamps = {p.name: (p / "done.json").stat().st_mtime_ns for p in (directory / "runs").iterdir() if p != d}

    proc = run_cli("sweep", "--config", str(file), "--out", str(directory.parent), "--only", str(run.index))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[{run.index}] {run.run_id}: resuming" in proc.stdout
    assert stamps == {p.name: (p / "done.json").stat().st_mtime_ns for p in (directory / "runs").iterdir()
                      if p != d}
    done = json.loads((d / "done.json").read_text())
    assert done["status"] == "finished"
    assert f"--ckpt_path={d / 'checkpoints' / 'last.ckpt'}" in (d / "command.txt").read_text()
    assert json.loads((d / "attempts.jsonl").read_text().splitlines()[-1])["resumed_from"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (new,) = set(d.glob("events.out.tfevents.*")) - events_before
    events = EventAccumulator(str(new))
    events.Reload()
    steps = [e.step + 1 for e in events.Scalars("train/positions_seen")]  # global step of each logged step
    assert steps == [4, 5, 6, 7]  # continued from the checkpoint's step 3, not from the start
    assert json.loads((d / "flops.json").read_text())["step"] == 7
    assert json.loads((d / "metrics.json").read_text())["latest"]["step"] == 7
