"""``python -m lit_transfusion results``: RESULTS.md, its tables written from results/ (no number typed by hand).

    python -m lit_transfusion results                     # write RESULTS.md from results/RESULTS.template.md
    python -m lit_transfusion results --check             # exit 1 if RESULTS.md differs from what it would write

The template is RESULTS.md's prose with placeholders on lines of their own, each replaced by a table built from
``results/<name>/results.csv`` and the shipped sweep file ``configs/sweeps/<name>.yaml`` (its claims and floors):

    {{rule}}                   the verdict rule (``lit_transfusion.stats.RULE``)
    {{floors}}                 the tables of results/floors/floors.md (``python -m lit_transfusion floors``)
    {{tables:<path>}}          the tables (and the lines between them) of a generated Markdown file under results/,
                               e.g. ``{{tables:main_job/runs.md}}``
    {{setup:<name>}}           per variant: runs, parameters, steps, positions seen, 6·N·D, measured FLOPs, wall time
    {{variants:<name>}}        per variant: seeds, then mean [95 % interval] over seeds of the shared metrics, and
                               a *floor* row from the sweep file's ``compare.floors``
    {{claims:<name>}}          the sweep's claims: both intervals, the floor, the verdict
    {{families:<name>}}        per family and budget (a sweep with budgets): the metrics' intervals
    {{ratios:<name>}}          the FLOP ratio to match the reference, per metric and family
    {{draws:<name>}}           per family and budget whether every seed is clear of the floors on the sweep file's
                               ``compare.draws``, and the smallest budget at which every family draws
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lit_transfusion.commands.sweep.claims import claims_markdown, format_interval, judge_all, seed_interval
from lit_transfusion.commands.sweep.draws import DRAWS_RULE, compare_draws_markdown
from lit_transfusion.commands.sweep.equal_flops import Parity, equal_flops, ratio_cell
from lit_transfusion.commands.sweep.load import load_sweep
from lit_transfusion.commands.sweep.results import read_csv_runs, variants
from lit_transfusion.stats import RULE

PLACEHOLDER = re.compile(
    r"^\{\{(rule|floors|tables|setup|variants|claims|families|ratios|draws)(?::([A-Za-z0-9._=+,/-]+))?\}\}$")
# The columns of the variant and family tables: metric -> heading.
COLUMNS = {"val/cond_gap": "cond_gap ↑", "val/geneval/overall": "GenEval ↑", "val/fid": "FID ↓", "val/kid": "KID ↓",
           "val/caption_f1": "caption F1 ↑", "val/caption_acc": "caption acc ↑", "val/ppl_text": "text ppl ↓"}


class Sources:
    """A sweep's runs (from results/<name>/results.csv) and its sweep file's ``compare``, read once each."""

    def __init__(self, results: Path, sweeps: Path) -> None:
        self.results, self.sweeps = results, sweeps
        self._runs: dict[str, list[dict]] = {}
        self._compare: dict[str, dict | None] = {}

    def runs(self, name: str) -> list[dict]:
        if name not in self._runs:
            self._runs[name] = read_csv_runs(self.results / name / "results.csv")
        return self._runs[name]

    def compare(self, name: str) -> dict | None:
        if name not in self._compare:
            self._compare[name] = load_sweep(self.sweeps / f"{name}.yaml").compare
        return self._compare[name]


def _cell(values: list) -> str:
    return format_interval(seed_interval(values), digits=3)


def floor_row(floors: dict | None, lead: int) -> list[str]:
    """A *floor* row under a table of COLUMNS (after ``lead`` leading cells), if any column has a floor."""
    floors = floors or {}
    if not any(m in floors for m in COLUMNS):
        return []
    cells = [format_interval(tuple(floors[m]), digits=3, point=True) if m in floors else "" for m in COLUMNS]
    return ["| *floor* |" + " |" * (lead - 1) + " " + " | ".join(cells) + " |"]


def variants_table(runs: list[dict], floors: dict | None = None) -> list[str]:
    """Per variant: its finished seeds, each metric's mean [95 % interval]; then the floors of the metrics."""
    lines = ["| variant | seeds | " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for variant, rs in variants(runs).items():
        done = [r for r in rs if r["status"] == "finished"]
        cells = [_cell([r["final"].get(m) for r in done]) for m in COLUMNS]
        lines.append(f"| {variant} | {len(done)} | " + " | ".join(cells) + " |")
    return lines + floor_row(floors, 2)


def _range(values: list, fmt: str) -> str:
    known = sorted(float(v) for v in values if v is not None)
    if not known:
        return "—"
    low, high = format(known[0], fmt), format(known[-1], fmt)
    return low if low == high else f"{low}–{high}"


def setup_table(runs: list[dict]) -> list[str]:
    """Per variant (finished runs): how many, parameters, steps, positions seen, 6·N·D and measured FLOPs per run,
    wall-clock seconds per run (ranges where runs differ)."""
    lines = ["| variant | runs | parameters | steps | positions seen | 6·N·D per run | measured FLOPs per run "
             "| wall seconds per run |", "|" + "---|" * 8]
    for variant, rs in variants(runs).items():
        done = [r for r in rs if r["status"] == "finished"]
        lines.append(f"| {variant} | {len(done)} | {_range([r.get('params') for r in done], ',.0f')} "
                     f"| {_range([r['steps'] for r in done], '.0f')} "
                     f"| {_range([r.get('positions_seen') for r in done], ',.0f')} "
                     f"| {_range([r['flops_6nd'] for r in done], '.3g')} "
                     f"| {_range([r['flops_measured'] for r in done], '.3g')} "
                     f"| {_range([r['wall_seconds'] for r in done], '.0f')} |")
    return lines


def families_table(runs: list[dict], floors: dict | None = None) -> list[str]:
    """Per family and budget (finished runs): seeds and each metric's mean [95 % interval]; then the floors."""
    lines = ["| family | budget | seeds | " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * (len(COLUMNS) + 3)]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        if r["status"] == "finished" and r["budget"] is not None:
            groups.setdefault((r["family"], r["budget"]), []).append(r)
    for (family, budget), rs in groups.items():
        cells = [_cell([r["final"].get(m) for r in rs]) for m in COLUMNS]
        lines.append(f"| {family} | {budget:.3g} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines + floor_row(floors, 3)


def ratios_table(runs: list[dict], compare: dict) -> list[str]:
    """The FLOP ratio to match the reference: a row per metric, a column per other family."""
    analysis = equal_flops(runs, compare["reference"], compare["metrics"], compare.get("floors"))
    others = [f for f in analysis["families"] if f != compare["reference"]]
    if not others or compare["reference"] not in analysis["families"]:
        return [f"(no ratio yet: it needs finished runs of {compare['reference']} and of another family)"]
    lines = ["| metric | target (reference, observed) | " + " | ".join(others) + " |",
             "|" + "---|" * (len(others) + 2)]
    for metric in compare["metrics"]:
        parity = analysis["parity"][metric]
        target = next((p.target_interval for p in parity.values() if isinstance(p, Parity)), None)
        cells = [ratio_cell(parity[f]) if isinstance(parity[f], Parity) else "n/a" for f in others]
        lines.append(f"| {metric} | {format_interval(target, digits=3)} | " + " | ".join(cells) + " |")
    return lines


def expand_line(line: str, sources: Sources) -> list[str]:
    """A template line: itself, or the lines of the table its placeholder names."""
    match = PLACEHOLDER.match(line.strip())
    if not match:
        return [line]
    kind, name = match.groups()
    if kind == "rule":
        return [RULE]
    if kind == "floors":  # floors.md below its title, its sections one level down
        lines = (sources.results / "floors" / "floors.md").read_text().splitlines()[1:]
        return [f"#{line}" if line.startswith("## ") else line for line in lines]
    if name is None:
        raise ValueError(f"{line.strip()}: needs a sweep name ({{{{{kind}:<name>}}}})")
    if kind == "tables":  # from the first table to the last line of the file
        lines = (sources.results / name).read_text().splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
        return lines[first:]
    runs = sources.runs(name)
    if kind == "setup":
        return setup_table(runs)
    compare = sources.compare(name)
    floors = (compare or {}).get("floors")
    if kind == "variants":
        return variants_table(runs, floors)
    if kind == "families":
        return families_table(runs, floors)
    if kind == "claims":
        return claims_markdown(judge_all(runs, compare)) or ["(no claims in the sweep file)"]
    if kind == "draws":
        if not (compare or {}).get("draws"):
            raise ValueError(f"{line.strip()}: configs/sweeps/{name}.yaml has no compare.draws")
        return [DRAWS_RULE, ""] + compare_draws_markdown(runs, compare)
    return ratios_table(runs, compare)


def render(template: Path, results: Path, sweeps: Path) -> str:
    """RESULTS.md's text: the template with every placeholder replaced by its table."""
    sources = Sources(results, sweeps)
    lines = [out for line in template.read_text().splitlines() for out in expand_line(line, sources)]
    return "\n".join(lines) + "\n"


def results(out: str = "RESULTS.md", template: str = "results/RESULTS.template.md", results_dir: str = "results",
            sweeps: str = "configs/sweeps", check: bool = False) -> int:
    """Write ``out`` from ``template``, or with ``check`` report whether ``out`` equals it (0) or not (1)."""
    text = render(Path(template), Path(results_dir), Path(sweeps))
    if check:
        same = Path(out).is_file() and Path(out).read_text() == text
        print(f"{out}: " + ("up to date" if same else f"differs from what {template} and {results_dir}/ give; "
                                                       "regenerate: python -m lit_transfusion results"))
        return 0 if same else 1
    Path(out).write_text(text)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_transfusion results [--out F] [--template F] [--results_dir D] [--sweeps D] [--check]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lit_transfusion results", description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(results, as_group=False)
    action = parser._option_string_actions["--check"]
    action.nargs, action.const = "?", True  # --check alone means true
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    code = results(**{k: v for k, v in options.items() if k != "__default_config__"})
    if code:
        sys.exit(code)
