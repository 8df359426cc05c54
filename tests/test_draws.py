"""Where each family draws (``sweep/draws.py``, a sweep's ``compare.draws``): a run is clear of a floor only when
its own interval lies wholly on the better side, a family draws at a budget only when every seed does, and the
smallest budget at which every family draws is computed from hand-built runs whose answer is known."""

from __future__ import annotations

import pytest
import yaml

from lit_transfusion.commands.sweep.claims import claims_markdown, judge_all
from lit_transfusion.commands.sweep.draws import clear_of, draws, draws_markdown, run_interval, smallest_common_budget
from lit_transfusion.commands.sweep.load import load_sweep
from lit_transfusion.commands.sweep.schema import SweepError
from lit_transfusion.stats import normal_quantile
from tests.conftest import ROOT

FLOORS = {"val/geneval/overall": [0.14, 0.11, 0.18], "val/kid": [497.0, 497.0, 497.0]}
METRICS = ["val/geneval/overall", "val/kid"]


def run(family: str, budget: float, seed: int, geneval: tuple[float, float, float], kid: float, kid_std: float,
        status: str = "finished") -> dict:
    value, low, high = geneval
    return {"family": family, "budget": budget, "seed": seed, "status": status,
            "final": {"val/geneval/overall": value, "val/geneval/overall_low": low, "val/geneval/overall_high": high,
                      "val/kid": kid, "val/kid_std": kid_std}}


def test_a_run_interval_comes_from_its_bounds_else_its_spread_else_the_point():
    assert run_interval({"m": 0.3, "m_low": 0.2, "m_high": 0.4, "m_std": 9.0}, "m") == (0.3, 0.2, 0.4)
    value, low, high = run_interval({"m": 50.0, "m_std": 10.0}, "m")
    assert (value, low, high) == pytest.approx((50.0, 50.0 - normal_quantile() * 10, 50.0 + normal_quantile() * 10))
    assert run_interval({"m": 2.0}, "m") == (2.0, 2.0, 2.0)
    assert run_interval({"m": float("nan")}, "m") is None and run_interval({}, "m") is None


def test_clear_means_wholly_on_the_better_side():
    floor = (0.14, 0.11, 0.18)
    assert clear_of((0.3, 0.19, 0.4), floor, higher=True)
    assert not clear_of((0.3, 0.18, 0.4), floor, higher=True)  # touching is not clear
    assert not clear_of((0.05, 0.01, 0.09), floor, higher=True)  # below the floor: worse, not clear
    assert clear_of((0.05, 0.01, 0.09), floor, higher=False)
    assert clear_of((100.0, 80.0, 120.0), (497.0, 497.0, 497.0), higher=False)
    assert not clear_of((480.0, 460.0, 500.0), (497.0, 497.0, 497.0), higher=False)


def test_a_family_draws_where_every_seed_clears_every_floor():
    runs = [
        # a: at 1e13 seed 1's GenEval interval touches the floor; at 1e14 both seeds clear both floors
        run("a", 1e13, 0, (0.30, 0.25, 0.35), 50.0, 5.0), run("a", 1e13, 1, (0.15, 0.12, 0.19), 50.0, 5.0),
        run("a", 1e14, 0, (0.40, 0.35, 0.45), 20.0, 3.0), run("a", 1e14, 1, (0.38, 0.33, 0.43), 22.0, 3.0),
        # b: GenEval clears at 1e13 but KID's spread reaches the floor (480 + 1.96 * 10 > 497); at 1e14 clear
        run("b", 1e13, 0, (0.25, 0.20, 0.30), 480.0, 10.0),
        run("b", 1e14, 0, (0.30, 0.25, 0.35), 100.0, 10.0), run("b", 1e14, 1, (0.31, 0.26, 0.36), 90.0, 10.0),
        run("b", 1e14, 2, (0.9, 0.8, 1.0), 1.0, 1.0, status="failed"),  # a failed run does not count
    ]
    table = draws(runs, METRICS, FLOORS)
    assert {f: {b: c["draws"] for b, c in bb.items()} for f, bb in table.items()} == \
        {"a": {1e13: False, 1e14: True}, "b": {1e13: False, 1e14: True}}
    assert table["a"][1e13]["why"] == "on the floor: seed 1: val/geneval/overall"
    assert table["b"][1e13]["why"] == "on the floor: seed 0: val/kid"
    assert sorted(table["b"][1e14]["seeds"]) == [0, 1]
    assert smallest_common_budget(table) == 1e14
    assert draws_markdown(runs, METRICS, FLOORS)[-1] == "Smallest budget at which every family draws: **1e+14**."
    # c never draws: no budget at which every family does, and the answer says where each one draws
    table = draws(runs + [run("c", 1e14, 0, (0.1, 0.05, 0.15), 30.0, 3.0)], METRICS, FLOORS)
    assert smallest_common_budget(table) is None
    answer = draws_markdown(runs + [run("c", 1e14, 0, (0.1, 0.05, 0.15), 30.0, 3.0)], METRICS, FLOORS)[-1]
    assert "none of the budgets run" in answer and "a 1e+14; b 1e+14; c none" in answer


def test_a_claim_says_whether_both_its_families_draw_at_its_budget():
    """Pairs are judged on their own: a and b draw together from 1e14 while c (never drawing) keeps every family
    from drawing; a claim of a against b at 1e14 is marked as read where both draw, one of c against a is not."""
    runs = [run("a", 1e13, 0, (0.15, 0.12, 0.19), 50.0, 5.0),
            run("a", 1e14, 0, (0.40, 0.35, 0.45), 20.0, 3.0), run("a", 1e14, 1, (0.38, 0.33, 0.43), 20.5, 3.0),
            run("b", 1e13, 0, (0.30, 0.25, 0.35), 40.0, 5.0),
            run("b", 1e14, 0, (0.30, 0.25, 0.35), 40.0, 3.0), run("b", 1e14, 1, (0.31, 0.26, 0.36), 40.5, 3.0),
            run("c", 1e13, 0, (0.10, 0.05, 0.15), 60.0, 3.0), run("c", 1e14, 0, (0.1, 0.05, 0.15), 30.0, 3.0)]
    claims = [{"metric": "val/kid", "arm": "a", "reference": "b", "direction": "lower", "paper": "p"},
              {"metric": "val/kid", "arm": "c", "reference": "a", "direction": "lower", "paper": "q"}]
    compare = {"claims": claims, "floors": FLOORS, "draws": METRICS}
    answer = draws_markdown(runs, METRICS, FLOORS, pairs=[(c["arm"], c["reference"]) for c in claims])[-1]
    assert answer.startswith("Smallest budget at which every family draws: **none of the budgets run**")
    assert answer.endswith("both families of a claim draw: a and b: **1e+14**; c and a: **none of the budgets run**.")
    judged = judge_all(runs, compare)
    assert [(c.budget, c.both_draw) for c in judged] == [(1e14, True), (1e14, False)]
    assert [c.verdict for c in judged] == ["holds", "not resolved"]  # c's one seed has no interval
    table = claims_markdown(judged)
    assert "| both draw there |" in table[0] and table[1].count("---") == 8
    assert [row.split(" | ")[-2] for row in table[2:]] == ["yes", "no"]
    assert all(c.both_draw is None for c in judge_all(runs, {"claims": claims, "floors": FLOORS}))
    assert "both draw" not in claims_markdown(judge_all(runs, {"claims": claims, "floors": FLOORS}))[0]


def test_every_draws_metric_needs_a_floor(tmp_path):
    shipped = load_sweep(ROOT / "configs" / "sweeps" / "central.yaml").compare
    assert shipped["draws"] == METRICS and all(m in shipped["floors"] for m in shipped["draws"])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "base": "configs/shapes/tiny.yaml", "budgets": [1e13, 1e14],
        "variants": [{"name": "a", "model.init_args.patcher": "linear"}],
        "compare": {"reference": "a", "floors": {"val/kid": 497.0}, "draws": ["val/kid", "val/geneval/overall"]}}))
    with pytest.raises(SweepError, match=r"compare.draws: val/geneval/overall has no floor"):
        load_sweep(path)
