"""RESULTS.md is generated (``python -m lit_transfusion results``): the committed file equals the regenerated one,
and a number typed into it by hand makes the check fail."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from lit_transfusion.commands.results_md import ratios_table, render, results

ROOT = Path(__file__).resolve().parents[1]


def regenerated() -> str:
    return render(ROOT / "results" / "RESULTS.template.md", ROOT / "results", ROOT / "configs" / "sweeps")


def test_committed_results_md_equals_the_regenerated_one():
    assert (ROOT / "RESULTS.md").read_text() == regenerated(), "regenerate: python -m lit_transfusion results"


def test_a_hand_typed_number_fails_the_check(tmp_path, monkeypatch):
    copy = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "RESULTS.md", copy)
    monkeypatch.chdir(ROOT)  # the sweep files name their base configs relative to the repository
    assert results(out=str(copy), check=True) == 0
    text = copy.read_text()
    assert "| bidirectional | 2 | " in text
    copy.write_text(text.replace("| bidirectional | 2 | ", "| bidirectional | 2 | 0.0300 ± 0.001 ", 1))
    assert results(out=str(copy), check=True) == 1


def test_every_claim_prints_a_verdict_and_the_rule_is_written_once():
    text = regenerated()
    rows = [line for line in text.splitlines() if line.startswith("| ") and (" < " in line or " > " in line)]
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in rows if line.endswith("** |")]
    assert verdicts and set(verdicts) <= {"**holds**", "**reversed**", "**not resolved**"}
    assert text.count("Verdict rule:") == 1


def test_the_template_types_no_measured_number():
    """RESULTS.md's prose (the template) quotes only the paper: a decimal or a percentage outside the paragraphs
    that begin "Paper" would be a measurement typed by hand instead of a table written from results/ (the 95 %
    of the intervals is a setting)."""
    paragraphs = (ROOT / "results" / "RESULTS.template.md").read_text().split("\n\n")
    typed = [p for p in paragraphs if not p.startswith(("Paper", "#", "{{"))
             and re.search(r"(?<![\w.])~?\d+\.\d+(?![\w.])|\d+ ?%|~\d", p.replace("95 %", "the confidence"))]
    assert not typed, f"typed numbers in the template's prose: {typed}"


def test_ratios_wait_for_the_reference_and_another_family():
    """With only the reference finished (a sweep's first runs), the ratio table says why it is empty."""
    runs = [{"family": "chameleon", "budget": 1e13, "status": "finished", "seed": 0, "flops_6nd": 1e13,
             "final": {"val/fid": 100.0}}]
    assert ratios_table(runs, {"reference": "chameleon", "metrics": ["val/fid"], "floors": {}}) == \
        ["(no ratio yet: it needs finished runs of chameleon and of another family)"]
