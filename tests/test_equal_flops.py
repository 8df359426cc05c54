"""Equal-compute comparisons: compute budgets (``callbacks.flops.FlopsBudget``, a sweep's ``budgets:``) and the
power-law "FLOP ratio to match" (``equal_flops.fit_power_law`` / ``parity_ratio``, a sweep's ``compare:``).

The fast tests check the fit and the ratio on synthetic power laws with known answers, the budget arithmetic, the
probe on the real shapes datamodule, the sweep file checks and the runs a budget sweep expands to. The slow ones
run configs/sweeps/equal_flops_test.yaml (2 patchers × 2 budgets × 2 seeds, nano model) through the real command
line once, and one plain fit beside it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from callbacks.flops import FlopsBudget, probe_positions
from lit_transfusion.commands.sweep import equal_flops as equal_flops_module
from lit_transfusion.commands.sweep import results as sweep_results
from lit_transfusion.commands.sweep.claims import judge_all
from lit_transfusion.commands.sweep.equal_flops import Parity, PowerLaw, equal_flops, fit_power_law, parity_ratio
from lit_transfusion.commands.sweep.expand import BUDGET_CALLBACK, FLOPS_CALLBACK, expand, fit_args
from lit_transfusion.commands.sweep.load import load_sweep
from lit_transfusion.commands.sweep.main import main
from lit_transfusion.commands.sweep.validate import transfusion_parser
from tests.conftest import ROOT, run_cli

EQUAL = ROOT / "configs" / "sweeps" / "equal_flops_test.yaml"
BUDGETS = (1e9, 2e9, 4e9)


def power_law(scale: float, slope: float):
    return lambda c: scale * c**slope


def points(law, budgets=BUDGETS, jitter: float = 0.01) -> tuple[list[float], list[float]]:
    """Two "seeds" per budget, the law's value times exp(±jitter): on the log scale the mean is the law itself,
    so a least-squares fit recovers it exactly."""
    compute = [c for c in budgets for _ in (0, 1)]
    return compute, [law(c) * math.exp(s * jitter) for c in budgets for s in (1, -1)]


def fitted(law, budgets=BUDGETS) -> PowerLaw:
    return fit_power_law(*points(law, budgets))


# ----------------------------------------------------------------------------------------------- fit and ratio
def test_power_law_fit_recovers_scale_and_slope():
    fit = fitted(power_law(3.0, -0.2))
    assert fit.a == pytest.approx(math.log(3.0), abs=1e-9) and fit.b == pytest.approx(-0.2, abs=1e-12)
    assert fit.points == 6 and (fit.low, fit.high) == (1e9, 4e9)
    # R² = 1 - SS_res / SS_tot: the residuals are the ±0.01 seed offsets (6 × 0.01²); x = ln C deviates by
    # -ln 2, 0, ln 2 (twice each), so SS_tot = b² · 4 (ln 2)² + SS_res
    assert fit.r2 == pytest.approx(1 - 6e-4 / (0.04 * 4 * math.log(2) ** 2 + 6e-4), rel=1e-9)  # 0.99226
    assert fit.value_at(2e9) == pytest.approx(3.0 * 2e9**-0.2, rel=1e-9)
    assert fit.compute_at(3.0 * 5e9**-0.2) == pytest.approx(5e9, rel=1e-9)


def test_parity_ratio_lower_is_better_same_slope():
    """A family whose loss at compute C equals the reference's at 4·C matches it with a quarter of the compute."""
    reference, family = fitted(power_law(10.0, -0.1)), fitted(lambda c: 10.0 * (4 * c) ** -0.1)
    result = parity_ratio(family, reference.value_at(4e9), budget=4e9, higher_is_better=False)
    assert result.ratio == pytest.approx(0.25, rel=1e-9) and result.compute == pytest.approx(1e9, rel=1e-9)
    assert result.target == pytest.approx(10.0 * 4e9**-0.1, rel=1e-9)
    assert not result.extrapolated and not result.reason
    assert parity_ratio(reference, reference.value_at(4e9), 4e9, False).ratio == pytest.approx(1.0, rel=1e-12)


def test_parity_ratio_different_slopes_hand_computed():
    """reference 10·C^-0.1, family 25·C^-0.15: the target 10·(4e9)^-0.1 = 1.0959582 is reached at
    C = (1.0959582 / 25)^(-1/0.15) = 1.1332004e9, a ratio of 0.2833001."""
    result = parity_ratio(fitted(power_law(25.0, -0.15)), fitted(power_law(10.0, -0.1)).value_at(4e9), 4e9, False)
    assert result.target == pytest.approx(1.0959582263852172, rel=1e-9)
    assert result.compute == pytest.approx(1.1332004e9, rel=1e-6)
    assert result.ratio == pytest.approx(0.2833001, rel=1e-6)


def test_parity_ratio_higher_is_better():
    """A score that rises with compute: a family that needs 4× the compute for the same score has ratio 4 (4×
    the largest measured compute: an extrapolation, but within the 10× flag)."""
    reference, family = fitted(power_law(0.01, 0.2)), fitted(lambda c: 0.01 * (c / 4) ** 0.2)
    result = parity_ratio(family, reference.value_at(4e9), budget=4e9, higher_is_better=True)
    assert result.ratio == pytest.approx(4.0, rel=1e-9) and result.compute == pytest.approx(1.6e10, rel=1e-9)
    assert not result.extrapolated


def test_parity_ratio_of_a_target_at_or_below_zero_is_withheld():
    """An untrained reference can average a gap of 0 or below; no positive power law reaches it: no ratio, a
    reason instead of a math error."""
    family = fitted(power_law(0.01, 0.2))
    for target in (0.0, -0.003):
        result = parity_ratio(family, target, budget=4e9, higher_is_better=True)
        assert result.ratio is None and result.compute is None and "<= 0" in result.reason


def test_parity_ratio_flags_far_extrapolation_both_ways():
    reference = fitted(power_law(10.0, -0.1))
    far_up = parity_ratio(fitted(lambda c: 10.0 * (c / 50) ** -0.1), reference.value_at(4e9), 4e9, False)
    assert far_up.ratio == pytest.approx(50.0, rel=1e-9) and far_up.extrapolated  # 2e11 > 10 × 4e9
    far_down = parity_ratio(fitted(lambda c: 10.0 * (c * 100) ** -0.1), reference.value_at(4e9), 4e9, False)
    assert far_down.ratio == pytest.approx(0.01, rel=1e-9) and far_down.extrapolated  # 4e7 < 1e9 / 10
    near = parity_ratio(fitted(lambda c: 10.0 * (c / 9) ** -0.1), reference.value_at(4e9), 4e9, False)
    assert near.ratio == pytest.approx(9.0, rel=1e-9) and not near.extrapolated  # 3.6e10 < 10 × 4e9


def test_no_ratio_when_the_fit_cannot_give_one():
    reference = fitted(power_law(10.0, -0.1))
    flat = parity_ratio(fitted(lambda c: 2.0), reference.value_at(4e9), 4e9, False)
    assert flat.ratio is None and flat.compute is None and flat.reason.startswith("flat fit")
    worse = parity_ratio(fitted(power_law(1.0, 0.1)), reference.value_at(4e9), 4e9, higher_is_better=False)
    assert worse.ratio is None and "rises with compute, the wrong way (lower is better)" in worse.reason
    falling_score = parity_ratio(fitted(power_law(1.0, -0.1)), reference.value_at(4e9), 4e9, higher_is_better=True)
    assert falling_score.ratio is None
    assert "falls with compute, the wrong way (higher is better)" in falling_score.reason
    with pytest.raises(ValueError, match="fewer than 2 compute values"):
        fit_power_law([4e9, 4e9], [1.0, 1.1])
    with pytest.raises(ValueError, match="values <= 0"):
        fit_power_law([1e9, 4e9], [0.5, -0.1])


def fake_run(family: str, budget: float, seed: int, flops: float, metrics: dict, status: str = "finished") -> dict:
    """What ``sweep_results.read_run`` returns, with the fields the equal-compute analysis reads."""
    return {"run_id": f"{family}-b{budget:g}-seed{seed}", "family": family, "budget": budget, "seed": seed,
            "status": status, "steps": int(flops // 1e8), "flops_6nd": flops, "flops_measured": 0.75 * flops,
            "final": metrics}


def test_equal_flops_tables_ratios_and_reasons(tmp_path):
    """Two families on exact power laws (the family reaches the reference's loss with 1/4 of the compute), a third
    with one budget; the markdown shows the per-budget means with their seed ranges and the ratios."""
    ref, good = power_law(10.0, -0.1), lambda c: 10.0 * (4 * c) ** -0.1
    runs = []
    for budget in (1e9, 4e9):
        for seed in (0, 1):
            flops = budget * (1 + 0.02 * seed)  # 6·N·D lands a little past the budget, by seed here
            gap = 0.1 * seed - 0.05  # one seed below 0: no power law
            runs.append(fake_run("ref", budget, seed, flops, {"val/loss": ref(flops), "val/cond_gap": gap}))
            runs.append(fake_run("good", budget, seed, flops, {"val/loss": good(flops)}))
    runs.append(fake_run("lone", 1e9, 0, 1e9, {"val/loss": 3.0}))
    runs.append(fake_run("good", 1.6e10, 0, 1.6e10, {"val/loss": 0.1}, status="failed"))  # not counted
    analysis = equal_flops(runs, "ref", ["val/loss", "val/cond_gap"])
    assert analysis["budget"] == 4e9 and list(analysis["families"]["good"]) == [1e9, 4e9]
    good_parity = analysis["parity"]["val/loss"]["good"]
    # The target is the reference's observed mean at 4e9 (its seeds at 4e9 and 4.08e9), solved on good's exact law
    target = (ref(4e9) + ref(4.08e9)) / 2
    ratio = (target / 10.0) ** -10 / 4 / 4e9
    assert isinstance(good_parity, Parity) and good_parity.ratio == pytest.approx(ratio, rel=1e-9)
    assert good_parity.target == pytest.approx(target, rel=1e-12) and good_parity.ratio_interval is not None
    assert analysis["parity"]["val/loss"]["lone"] == "fewer than 2 budgets with val/loss (1 run(s))"
    assert analysis["fits"]["val/cond_gap"]["ref"].startswith("values <= 0")
    assert analysis["fits"]["val/cond_gap"]["good"].startswith("fewer than 2 budgets")

    path = tmp_path / "equal_flops.md"
    equal_flops_module.write_equal_flops_markdown(analysis, path, title="t")
    text = path.read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()
            if line.startswith("| ")}
    # ref at 4e9: 6·N·D 4e9 and 4.08e9 -> mean 4.04e9; measured 0.75 of it; val/loss 10·C^-0.1
    losses = [ref(4e9), ref(4.08e9)]
    assert f"| 4.04e+09 [4e+09, 4.08e+09] | 3.03e+09 [3e+09, 3.06e+09] | {statistics_cell(losses)} |" in \
        rows[("ref", "4e+09")]
    assert "| 0, 1 | 40 |" in rows[("ref", "4e+09")]  # seeds; steps (flops // 1e8 here)
    assert f"| {ratio:.3g}× [" in rows[("val/loss ↓", "good")]
    assert f"matches at C = {ratio * 4e9:.4g} |" in rows[("val/loss ↓", "good")]
    assert "× [" in rows[("val/loss ↓", "ref (reference)")]  # its own fit at its observed mean: near 1
    assert "| n/a | fewer than 2 budgets with val/loss (1 run(s)) |" in rows[("val/loss ↓", "lone")]
    assert "C* = 4e+09" in text and "⚠" not in rows[("val/loss ↓", "good")]
    assert "1.6e+10" not in text  # the failed run
    equal_flops_module.write_equal_flops_figure(analysis, tmp_path / "equal_flops.png")
    assert (tmp_path / "equal_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def statistics_cell(values: list[float]) -> str:
    """The markdown's "mean [lowest, highest]" cell, written out by hand."""
    return f"{sum(values) / len(values):.4g} [{min(values):.4g}, {max(values):.4g}]"


# ----------------------------------------------------------------------------------------------- the budget
def test_budget_turns_flops_into_steps():
    """6 × 185,488 parameters × 468.5 positions = 521,406,768 FLOPs a step: 2e9 FLOPs are 3.84 steps -> 4."""
    assert FlopsBudget(flops=2e9).plan(185_488, 468.5) == 4
    assert FlopsBudget(flops=521_406_768).plan(185_488, 468.5) == 1  # exactly one step
    with pytest.raises(ValueError, match=r"flops=5e\+08 is below one training step .*5\.214e\+08 FLOPs"):
        FlopsBudget(flops=5e8).plan(185_488, 468.5)
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="a positive number of FLOPs"):
            FlopsBudget(flops=bad)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The real shapes datamodule with a small cache of its own (16 training images)."""
    from datamodules.shapes import ShapesDataModule

    dm = ShapesDataModule(data_dir=str(tmp_path_factory.mktemp("probe") / "cache"), num_train=16, num_val=8,
                          val_rows=2, cond_gap_pairs=4, batch_size=4,
                          vae_path=str(ROOT / "datamodules" / "shapes" / "pretrained_vae"))
    dm.setup("fit")
    return dm


def test_probe_counts_the_first_batches_and_leaves_every_random_state(shapes):
    """The probe's mean is the non-pad positions of the loader's first batches, and torch's, numpy's and Python's
    global random states are as before (a DataLoader's iterator draws its base seed from torch's)."""
    firsts = [b for _, b in zip(range(3), shapes.train_dataloader(), strict=False)]
    expected = sum(int((b.seq.doc_ids >= 0).sum()) for b in firsts) / 3
    assert 0 < expected <= 4 * 128
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert probe_positions(shapes, 3) == expected
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    after = next(iter(shapes.train_dataloader()))
    assert torch.equal(after.seq.tokens, firsts[0].seq.tokens)  # a fresh loader starts where training does


# ----------------------------------------------------------------------------------------------- sweep files
def write_sweep(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


VARIANTS = [{"name": "linear", "model.init_args.patcher": "linear"},
            {"name": "unet", "model.init_args.patcher": "unet"}]


@pytest.mark.parametrize("sections, where", [
    ({"budgets": []}, "budgets: a non-empty list"),
    ({"budgets": 2e9}, "budgets: a non-empty list"),
    ({"budgets": [2e9, -1.0]}, "budgets[1]: -1.0: a positive number of FLOPs"),
    ({"budgets": ["lots"]}, "budgets[0]: 'lots': a positive number"),
    ({"budgets": [True]}, "budgets[0]: True: a positive number"),
    ({"budgets": [2e9, "2e9"]}, "budgets[1]: '2e9': repeated budget"),
    ({"budgets": [2e9], "overrides": {"trainer.max_steps": 5}}, "overrides: trainer.max_steps: set by budgets"),
    ({"budgets": [2e9], "variants": [{"name": "a", "trainer.max_steps": 5}]},
     "variants[a]: trainer.max_steps: set by budgets"),
    ({"compare": {"reference": "linear"}}, "compare: needs budgets"),
    ({"budgets": [2e9], "compare": {"reference": "lin"}}, "compare.reference: 'lin': not a family of this sweep "
                                                          "(expected one of linear, unet"),
    ({"budgets": [2e9], "compare": {"reference": "linear", "metric": ["val/loss"]}}, "compare.metric: unknown key"),
    ({"budgets": [2e9], "compare": {"reference": "linear", "metrics": "val/loss"}}, "compare.metrics: a non-empty"),
    ({"budgets": [2e9], "compare": "linear"}, "compare: a mapping"),
    ({"compare": {"metrics": ["val/loss"]}}, "compare: a reference: <family> (with budgets) or claims"),
    ({"compare": {"claims": [{"metric": "val/loss", "arm": "unet", "reference": "linear", "direction": "down"}]}},
     "compare.claims[0].direction: 'down': \"lower\" or \"higher\""),
    ({"compare": {"claims": [{"metric": "val/loss", "arm": "unet"}]}}, "compare.claims[0]: a mapping {metric"),
    ({"compare": {"claims": [{"metric": "val/loss", "arm": "unet", "reference": "lin", "direction": "lower"}]}},
     "compare.claims[0].reference: 'lin': not a family of this sweep"),
    ({"compare": {"claims": [{"metric": "val/loss", "arm": "unet", "reference": "unet", "direction": "lower"}]}},
     "compare.claims[0]: arm and reference are both 'unet'"),
    ({"compare": {"claims": [{"metric": "m", "arm": "unet", "reference": "linear", "direction": "lower"}],
                  "floors": {"m": [2.0, 1.0]}}}, "compare.floors: m: [2.0, 1.0]: a number, [low, high]"),
    ({"compare": {"claims": [{"metric": "m", "arm": "unet", "reference": "linear", "direction": "lower"}],
                  "floors": {"m": "nowhere.json:a.b"}}}, "compare.floors: m: 'nowhere.json:a.b': expected"),
])
def test_a_wrong_budget_or_compare_names_the_file_and_key(tmp_path, capsys, sections, where):
    sections.setdefault("variants", VARIANTS)
    path = write_sweep(tmp_path / "bad.yaml", name="bad", base="configs/shapes/tiny.yaml", **sections)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--out", str(tmp_path / "out"), "--dry_run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {where}"), err


def test_budgets_written_as_yaml_text_are_numbers(tmp_path):
    """YAML reads 2e9 (no dot) as a string: it is taken as the number it spells; compare's metrics default to the
    sweep's; the reference may be a grid point's family."""
    path = write_sweep(tmp_path / "s.yaml", name="s", base="configs/shapes/tiny.yaml", budgets=["2e9", 4.0e9],
                       grid={"model.init_args.patch_size": [1, 2]}, compare={"reference": "patch_size=2"},
                       metrics=["val/loss", "val/cond_gap"])
    sweep = load_sweep(path)
    assert sweep.budgets == [2e9, 4e9]
    assert sweep.compare == {"reference": "patch_size=2", "metrics": ["val/loss", "val/cond_gap"], "claims": [],
                             "floors": {}, "draws": []}
    assert [r.run_id for r in expand(sweep)][:2] == ["patch_size=1-budget2e9-seed0", "patch_size=2-budget2e9-seed0"]


def test_budget_sweep_runs_are_budgets_times_variants_times_seeds(tmp_path, capsys):
    sweep = load_sweep(EQUAL)
    runs = expand(sweep)
    assert [r.run_id for r in runs] == [f"{v}-budget{b}-seed{s}" for s in (0, 1) for b in ("2e9", "4e9")
                                        for v in ("linear", "unet")]
    assert [(r.family, r.budget, r.seed) for r in runs[:3]] == [("linear", 2e9, 0), ("unet", 2e9, 0),
                                                                ("linear", 4e9, 0)]
    assert runs[1].variant == "unet-budget2e9"
    main(["--config", str(EQUAL), "--out", str(tmp_path), "--dry_run"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["1", "unet-budget2e9-seed0", "model.init_args.patcher=unet", "budget=2e+09", "seed=0"]
    assert out[-1].startswith("8 runs") and not list(tmp_path.iterdir())

    args = fit_args(sweep, runs[3], tmp_path)
    budget_arg = f'--trainer.callbacks+={{"class_path": "{BUDGET_CALLBACK}", "init_args": {{"flops": 4000000000.0}}}}'
    assert budget_arg in args and f"--trainer.callbacks+={FLOPS_CALLBACK}" in args
    assert not any(a.startswith("--trainer.max_steps") for a in args)
    # jsonargparse takes the appended mapping: the run's trainer gets both callbacks after the config's own
    callbacks = transfusion_parser().parse_args(args).fit.trainer.callbacks
    assert [c.class_path for c in callbacks][-2:] == [FLOPS_CALLBACK, BUDGET_CALLBACK]
    assert callbacks[-1].init_args.flops == 4e9 and callbacks[-1].init_args.probe_batches == 4


# ----------------------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def equal_sweep(tmp_path_factory) -> Path:
    """configs/sweeps/equal_flops_test.yaml with its data cache in a temporary directory, run once through the
    command line; returns the sweep directory."""
    base = tmp_path_factory.mktemp("equal_sweep")
    spec = yaml.safe_load(EQUAL.read_text())
    spec["overrides"]["data.init_args.data_dir"] = str(base / "cache")
    file = write_sweep(base / "equal_flops_test.yaml", **spec)
    proc = run_cli("sweep", "--config", str(file), "--out", str(base / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return base / "out" / "equal_flops_test"


def scalars(directory: Path, tag: str) -> dict[int, float]:
    """{global step: value} of a TensorBoard scalar of a run directory."""
    return sweep_results.tensorboard_scalars(directory)[tag]


@pytest.mark.slow
def test_budget_runs_end_at_the_planned_step_with_the_schedule_done(equal_sweep):
    runs = {d.name: d for d in (equal_sweep / "runs").iterdir()}
    assert len(runs) == 8
    # D of a step, from what training logged: the probe reads the same first 4 batches (a fresh loader)
    d_step = scalars(runs["linear-budget4e9-seed0"], "train/positions_seen")[4] / 4
    planned = {}
    for name, d in runs.items():
        flops = json.loads((d / "flops.json").read_text())
        budget = 2e9 if "budget2e9" in name else 4e9
        n = flops["params_active"]
        assert n == flops["params"] > 0  # a dense model: every parameter is active
        assert flops["budget"] == budget and flops["step"] == flops["planned_steps"]
        assert flops["planned_steps"] == math.ceil(budget / (6 * n * d_step)), name
        one_step = 6 * n * 4 * 128  # at most 4 rows × 128 positions
        assert abs(flops["flops_6nd"] - budget) < one_step, name
        assert flops["flops_6nd"] == 6 * n * flops["positions_seen"]
        steps = flops["planned_steps"]
        # The cosine ran over the planned steps, not the config's 4000: the last step ran at progress (P-1)/P and
        # the validation after it (FlopsBudget's, the only one: val_check_interval is 1000) at 1.
        progress = scalars(d, "train/schedule_progress")
        assert max(progress) == steps and progress[steps] == pytest.approx((steps - 1) / steps, abs=1e-6)
        history = json.loads((d / "metrics.json").read_text())["history"]
        assert [e["step"] for e in history] == [steps] and history[0]["val/schedule_progress"] == 1.0
        assert f"trainer.max_steps set to {steps}" in (d / "stderr.log").read_text() + (d / "stdout.log").read_text()
        planned[name] = steps
    # the U-Net patcher has about twice the parameters: about half the steps of the linear one per budget
    assert planned["unet-budget4e9-seed0"] < planned["linear-budget4e9-seed0"]
    assert planned["linear-budget2e9-seed0"] == planned["linear-budget2e9-seed1"]

    with open(equal_sweep / "results.csv", newline="") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    row = rows["unet-budget4e9-seed1"]
    assert float(row["budget"]) == 4e9 and row["family"] == "unet" and row["variant"] == "unet-budget4e9"
    assert row["model.init_args.patcher"] == "unet" and row["seed"] == "1"
    assert int(rows["unet-budget4e9-seed1"]["steps"]) == planned["unet-budget4e9-seed1"]


@pytest.mark.slow
def test_the_probe_does_not_change_what_training_sees(equal_sweep, tmp_path):
    """A plain fit of the same run at max_steps = the planned steps, without FlopsBudget: the same loss at every
    step and bit-identical final weights."""
    budgeted = equal_sweep / "runs" / "linear-budget2e9-seed0"
    steps = json.loads((budgeted / "flops.json").read_text())["planned_steps"]
    args = [a for a in json.loads((budgeted / "run.json").read_text())["args"] if BUDGET_CALLBACK not in a]
    assert len(args) == len(json.loads((budgeted / "run.json").read_text())["args"]) - 1
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path), "name": "plain", "version": "run"}}
    args = [a for a in args if not a.startswith("--trainer.logger=")]
    # The sweep's thread count too: a matmul split over other threads sums in another order
    threads = re.search(r"OMP_NUM_THREADS=(\d+)", (budgeted / "command.txt").read_text()).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = subprocess.run([sys.executable, "-m", "lit_transfusion", *args, f"--trainer.logger={json.dumps(logger)}",
                           f"--trainer.max_steps={steps}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = tmp_path / "plain" / "run"
    assert scalars(plain, "train/loss") == scalars(budgeted, "train/loss")
    assert len(scalars(plain, "train/loss")) == steps
    weights = [torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
               for d in (plain, budgeted)]
    assert weights[0]["global_step"] == weights[1]["global_step"] == steps
    assert weights[0]["state_dict"].keys() == weights[1]["state_dict"].keys()
    for key, value in weights[0]["state_dict"].items():
        assert torch.equal(value, weights[1]["state_dict"][key]), key


def markdown_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """A markdown file's table rows keyed by their first two cells."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| family", "| metric")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out[(cells[0], cells[1])] = cells
    return out


@pytest.mark.slow
def test_collect_writes_equal_flops_from_the_run_files(equal_sweep, capsys):
    before = (equal_sweep / "equal_flops.md").read_text()
    for name in ("equal_flops.md", "equal_flops.png"):
        (equal_sweep / name).unlink()
    main(["--collect", str(equal_sweep)])  # compare: read back from run.json
    assert (equal_sweep / "equal_flops.md").read_text() == before
    assert "## FLOP ratio to match `linear`" in capsys.readouterr().out
    assert (equal_sweep / "equal_flops.png").stat().st_size > 20_000

    rows = markdown_rows(before)
    points: dict[str, list[tuple[float, float]]] = {"linear": [], "unet": []}
    for family in ("linear", "unet"):
        for budget, label in ((2e9, "2e+09"), (4e9, "4e+09")):
            dirs = [equal_sweep / "runs" / f"{family}-budget{budget_label(budget)}-seed{s}" for s in (0, 1)]
            flops = [json.loads((d / "flops.json").read_text()) for d in dirs]
            latest = [json.loads((d / "metrics.json").read_text())["latest"] for d in dirs]
            cells = rows[(family, label)]
            assert cells[2] == "0, 1" and cells[3] == str(flops[0]["step"])
            assert cells[4] == statistics_cell([f["flops_6nd"] for f in flops])
            assert cells[5] == statistics_cell([f["flops_measured"] for f in flops])
            assert cells[6] == statistics_cell([m["val/loss"] for m in latest])
            assert cells[7] == statistics_cell([m["val/cond_gap"] for m in latest])
            points[family] += [(f["flops_6nd"], m["val/loss"]) for f, m in zip(flops, latest, strict=True)]
    # The ratio, recomputed here from flops.json and metrics.json alone
    (b_ref, a_ref), (b_unet, a_unet) = (np.polyfit(*np.log(np.array(points[f]).T), 1) for f in ("linear", "unet"))
    observed = [json.loads((equal_sweep / "runs" / f"linear-budget4e9-seed{s}" / "metrics.json").read_text())
                ["latest"]["val/loss"] for s in (0, 1)]
    target = math.log(sum(observed) / 2)  # the reference's observed mean at its largest budget
    cells = rows[("val/loss ↓", "unet")]
    assert cells[2:4] == [f"{a_unet:.4g}", f"{b_unet:.4g}"] and cells[5] == "4"
    if b_unet < -1e-3:  # an improving fit: a ratio, else n/a with the reason
        ratio = f"{math.exp((target - a_unet) / b_unet) / 4e9:.3g}"
        assert re.fullmatch(re.escape(ratio) + r"×( \[[^]]+\])?( ⚠)?", cells[7]), cells
    else:
        assert cells[7] == "n/a"
    assert rows[("val/loss ↓", "linear (reference)")][7].split("×")[0] != ""


def budget_label(budget: float) -> str:
    return {2e9: "2e9", 4e9: "4e9"}[budget]


def test_claims_and_floors_load_without_budgets_and_get_verdicts(tmp_path):
    """Claims need no budgets; a floor is a number, [low, high] or a JSON entry; the verdict follows stats.verdict,
    and an arm whose interval touches the floor leaves the claim not resolved."""
    (tmp_path / "floors.json").write_text(json.dumps({"loss": {"n96": {"mean": 5.0, "low": 4.0, "high": 6.0}},
                                                      "g": {"overall": 0.2, "overall_low": 0.1, "overall_high": 0.3}}))
    claim = {"metric": "val/loss", "arm": "unet", "reference": "linear", "direction": "lower", "paper": "p"}
    path = write_sweep(tmp_path / "s.yaml", name="s", base="configs/shapes/tiny.yaml", variants=VARIANTS,
                       compare={"claims": [claim], "floors": {"val/loss": f"{tmp_path / 'floors.json'}:loss.n96",
                                                                "val/g": f"{tmp_path / 'floors.json'}:g.overall",
                                                                "val/x": 0.5, "val/y": [0.1, 0.3]}})
    sweep = load_sweep(path)
    assert sweep.compare["claims"] == [claim] and sweep.compare["reference"] is None
    assert sweep.compare["floors"] == {"val/loss": [5.0, 4.0, 6.0], "val/g": [0.2, 0.1, 0.3], "val/x": [0.5] * 3,
                                       "val/y": [0.2, 0.1, 0.3]}
    runs = [{"family": f, "variant": f, "status": "finished", "budget": None, "final": {"val/loss": v}}
            for f, vs in (("unet", (1.0, 1.1, 1.2)), ("linear", (2.0, 2.1, 2.2))) for v in vs]
    assert [c.verdict for c in judge_all(runs, sweep.compare)] == ["holds"]
    reversed_claim = {**sweep.compare, "claims": [{**claim, "direction": "higher"}]}
    assert [c.verdict for c in judge_all(runs, reversed_claim)] == ["reversed"]
    near_floor = {**sweep.compare, "floors": {"val/loss": [2.0, 1.9, 3.0]}}
    assert [c.verdict for c in judge_all(runs, near_floor)] == ["not resolved"]


def test_parity_withholds_a_ratio_whose_target_touches_the_floor():
    family = fitted(power_law(10.0, -0.1))
    target = (1.0, 0.9, 1.1)
    assert parity_ratio(family, 1.0, 4e9, False, target_interval=target, floor=(1.05, 1.05, 1.05)).reason.startswith(
        "not resolved")
    resolved = parity_ratio(family, 1.0, 4e9, False, target_interval=target, floor=(0.5, 0.5, 0.5))
    assert resolved.ratio == pytest.approx(family.compute_at(1.0) / 4e9)
    assert resolved.ratio_interval == pytest.approx(sorted(family.compute_at(v) / 4e9 for v in (0.9, 1.1)))
