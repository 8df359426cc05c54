"""A sweep's results, rebuilt from its run directories alone (``python -m lit_transfusion sweep --collect DIR``).

Each run directory (``<out>/<name>/runs/<run_id>/``) is read for ``run.json`` (its settings), ``done.json``
(status, seconds, error), ``flops.json`` (N, D, FLOPs; ``callbacks.flops``), ``metrics.json`` and the TensorBoard
event files. A metric's history is TensorBoard's ``val/*`` scalars overlaid with ``metrics.json``'s entries
(exact values; after a resume ``metrics.json`` holds only the validations since, TensorBoard all of them). Steps
are the trainer's global step (optimizer steps done; TensorBoard's step + 1). Into ``DIR``:

    results.csv   one row per run: run_id, variant, family, its grid/variant settings, seed, budget, status, steps,
                  positions seen, params, params_active, flops_6nd, flops_measured, wall seconds, error, then
                  final/<metric> and best/<metric> for every val/ metric found
    curves.csv    one row per run, validation step and metric: step, flops, value (for notebooks)
    results.md    per variant: mean [95 % interval] (Student's t) over the finished seeds of the sweep's chosen
                  metrics' final values, the best mean in bold, the seeds and the total compute; then each of
                  ``compare.claims`` with both intervals and its verdict (``claims.py``, ``stats.verdict``)
    curves.png    each chosen metric against step and against FLOPs: per variant the mean over seeds, with a
                  band from the lowest to the highest seed
    hparams/      one TensorBoard run per finished run with its settings + seed as hparams and its final metrics,
                  for TensorBoard's HPARAMS tab (``tensorboard --logdir DIR``)
    equal_flops.md, equal_flops.png
                  with a sweep's ``compare: {reference, metrics}`` (runs with ``budgets``): per family and budget the
                  final metrics and the compute (mean and seed min–max), a power law log(metric) = a + b·log(C) per
                  family through every seed's (6·N·D, final value) point, and the FLOP ratio at which each family
                  matches the reference (``equal_flops.py``, the paper's Table 3 "FLOP ratio to match")

6·N·D uses N = ``params_active`` from flops.json where it is there (the parameters one position uses: all of
them for a dense model, one modality's share for Mixture-of-Transformers), else ``params``.

Direction (best value, bold mean): ``direction.py`` (lower is better unless the name says cond_gap, geneval or
acc).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from lit_transfusion.commands.sweep.claims import claims_markdown, format_interval, judge_all, seed_interval
from lit_transfusion.commands.sweep.direction import arrow, higher_is_better
from lit_transfusion.commands.sweep.draws import compare_draws_markdown
from lit_transfusion.commands.sweep.equal_flops import equal_flops, write_equal_flops_figure, write_equal_flops_markdown
from lit_transfusion.commands.sweep.panel import finish_panel
from lit_transfusion.stats import RULE, t_quantile

RUN_COLUMNS = ("run_id", "variant", "family")
STAT_COLUMNS = ("seed", "budget", "status", "steps", "positions_seen", "params", "params_active", "flops_6nd",
                "flops_measured", "wall_seconds", "error")


# ----------------------------------------------------------------------------------------------- one run
def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the run directory's event files (all of them: a resumed run adds one), as
    {tag: {global step: value}}; a later file's value for a step wins."""
    if not list(directory.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        out[tag] = {e.step + 1: float(e.value) for e in acc.Scalars(tag)}  # logged at global step - 1
    return out


def histories(directory: Path, scalars: dict | None = None) -> dict[str, dict[int, float]]:
    """{val/ metric: {step: value}} from TensorBoard, overlaid with metrics.json's exact values."""
    scalars = tensorboard_scalars(directory) if scalars is None else scalars
    out = {tag: dict(points) for tag, points in scalars.items() if tag.startswith("val/")}
    for entry in _json(directory / "metrics.json").get("history", []):
        for key, value in entry.items():
            if key.startswith("val/") and isinstance(value, (int, float)):
                out.setdefault(key, {})[int(entry["step"])] = float(value)
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def final_metrics(directory: Path) -> dict[str, float]:
    """The last value of every val/ metric: metrics.json's latest entry, completed from the history."""
    return read_run(directory)["final"]


def read_run(directory: Path) -> dict[str, Any]:
    """Everything results need about one run directory (see the module docstring)."""
    directory = Path(directory)
    info, done, flops = _json(directory / "run.json"), _json(directory / "done.json"), _json(directory / "flops.json")
    scalars = tensorboard_scalars(directory)
    history = histories(directory, scalars)
    positions = scalars.get("train/positions_seen", {})
    steps = max([flops.get("step") or 0, max(positions, default=0), *(max(h) for h in history.values() if h)])
    params = flops.get("params")
    active = flops.get("params_active") or params  # flops.json from before params_active: a dense model's N
    d = flops.get("positions_seen") if flops.get("step") == steps else None
    d = d if d is not None else (round(positions[max(positions)]) if positions else None)
    per_step = flops.get("flops_per_step")
    if done:
        status = done.get("status", "unknown")
    else:
        status = "interrupted" if (directory / "checkpoints" / "last.ckpt").is_file() else "pending"
    finals = {k: v[max(v)] for k, v in history.items() if v}
    finals.update({k: float(v) for k, v in _json(directory / "metrics.json").get("latest", {}).items()
                   if k.startswith("val/") and isinstance(v, (int, float))})  # exact, where it has them
    best = {k: (max if higher_is_better(k) else min)(v.values()) for k, v in history.items() if v}
    return {
        "dir": directory, "run_id": info.get("run_id", directory.name), "variant": info.get("variant", directory.name),
        "family": info.get("family") or info.get("variant", directory.name), "budget": info.get("budget"),
        "settings": info.get("settings", {}), "seed": info.get("seed"), "metrics": info.get("metrics", []),
        "compare": info.get("compare"), "status": status, "steps": steps, "positions_seen": d, "params": params,
        "params_active": active, "flops_per_step": per_step,
        "flops_6nd": 6 * active * d if active and d is not None else None,
        "flops_measured": per_step * steps if per_step else None, "wall_seconds": done.get("seconds"),
        "error": "\n".join(done.get("error", [])), "final": finals, "best": best, "history": history,
        "positions": positions, "index": info.get("index", 0),
    }


def flops_at(run: dict, step: int) -> float | None:
    """Training FLOPs after ``step`` steps: measured (per step × step) where known, else 6·N·D(step)."""
    if run["flops_per_step"]:
        return float(run["flops_per_step"] * step)
    positions = run["positions"]
    if run["params_active"] and positions:
        d = positions.get(step) or positions[max([s for s in positions if s <= step], default=min(positions))]
        return 6.0 * run["params_active"] * d
    return None


# ----------------------------------------------------------------------------------------------- the sweep
def read_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every run directory under ``<sweep_dir>/runs`` (those with a run.json), in run order."""
    runs = [read_run(d) for d in sorted((Path(sweep_dir) / "runs").glob("*")) if (d / "run.json").is_file()]
    return sorted(runs, key=lambda r: (r["index"], r["run_id"]))


def collect(sweep_dir: str | Path, metrics: list[str] | None = None, verbose: bool = False,
            compare: dict | None = None, seeds: list[int] | None = None) -> list[dict]:
    """Write results.csv, curves.csv, results.md, curves.png and hparams/ from the run directories, and with
    ``compare`` ({reference, metrics, claims, floors}; default: the one the runs' run.json recorded)
    equal_flops.md/.png. A directory without runs/ but with a results.csv (what results/ keeps of a sweep) gets
    results.md (and equal_flops.md/.png) again from that file alone. ``seeds``: the seeds the sweep file asks for
    (results.md notes when the runs have fewer)."""
    sweep_dir = Path(sweep_dir)
    from_csv = not (sweep_dir / "runs").is_dir() and (sweep_dir / "results.csv").is_file()
    runs = read_csv_runs(sweep_dir / "results.csv") if from_csv else read_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no run directories (runs/*/run.json)")
    metrics = metrics or next((r["metrics"] for r in runs if r["metrics"]), ["val/loss"])
    compare = compare or next((r["compare"] for r in runs if r["compare"]), None)
    written = ["results.md"]
    if not from_csv:
        write_csv(runs, sweep_dir / "results.csv")
        write_curves_csv(runs, sweep_dir / "curves.csv")
        write_curves(runs, metrics, sweep_dir / "curves.png")
        write_hparams(runs, sweep_dir / "hparams")
        written = ["results.csv", "results.md", "curves.png", "curves.csv"]
    write_markdown(runs, metrics, sweep_dir / "results.md", title=sweep_dir.name, compare=compare, seeds=seeds)
    if compare and compare.get("reference"):
        analysis = equal_flops(runs, compare["reference"], compare["metrics"], compare.get("floors"))
        draws = compare_draws_markdown(runs, compare) if compare.get("draws") else None
        write_equal_flops_markdown(analysis, sweep_dir / "equal_flops.md", title=sweep_dir.name,
                                   claims=judge_all(runs, compare), draws=draws)
        write_equal_flops_figure(analysis, sweep_dir / "equal_flops.png")
        written += ["equal_flops.md", "equal_flops.png"]
    if verbose:
        for name in written:
            if name.endswith(".md"):
                print((sweep_dir / name).read_text())
        print(f"wrote {sweep_dir}/" + ", ".join(written) + ("" if from_csv else f"; HPARAMS: tensorboard --logdir "
                                                                                 f"{sweep_dir}"))
    return runs


def _number(text: str) -> float | None:
    return float(text) if text not in ("", "None") else None


def read_csv_runs(path: str | Path) -> list[dict[str, Any]]:
    """The runs of a results.csv, as :func:`read_run` gives them, less what only the run directory has (histories,
    settings, the sweep's metrics and compare): enough for results.md and the equal-compute analysis."""
    runs = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            finals = {k[len("final/"):]: _number(v) for k, v in row.items() if k.startswith("final/")}
            runs.append({
                "run_id": row["run_id"], "variant": row["variant"], "family": row.get("family") or row["variant"],
                "budget": _number(row.get("budget", "")), "seed": int(row["seed"]), "status": row["status"],
                "steps": int(row["steps"]) if row.get("steps") else 0,
                "flops_6nd": _number(row.get("flops_6nd", "")), "params": _number(row.get("params", "")),
                "positions_seen": _number(row.get("positions_seen", "")),
                "flops_measured": _number(row.get("flops_measured", "")),
                "wall_seconds": _number(row.get("wall_seconds", "")), "error": row.get("error", ""),
                "final": {k: v for k, v in finals.items() if v is not None}, "best": {}, "history": {},
                "settings": {}, "metrics": [], "compare": None, "index": i,
            })
    return runs


def _cell(value: Any) -> Any:
    return "" if value is None else repr(value) if isinstance(value, float) else value


def write_csv(runs: list[dict], path: Path) -> None:
    settings = list(dict.fromkeys(k for r in runs for k in r["settings"]))
    names = sorted({k for r in runs for k in (*r["final"], *r["best"])})
    columns = [*RUN_COLUMNS, *settings, *STAT_COLUMNS, *(f"final/{m}" for m in names), *(f"best/{m}" for m in names)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in runs:
            row = [*(r[c] for c in RUN_COLUMNS), *(json.dumps(r["settings"][k]) if isinstance(r["settings"].get(k),
                   (list, dict)) else r["settings"].get(k) for k in settings)]
            row += [r[c] for c in STAT_COLUMNS]
            row += [r["final"].get(m) for m in names] + [r["best"].get(m) for m in names]
            writer.writerow([_cell(v) for v in row])


def write_curves_csv(runs: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "variant", "seed", "status", "metric", "step", "flops", "value"])
        for r in runs:
            for metric, points in r["history"].items():
                for step, value in points.items():
                    writer.writerow([_cell(v) for v in (r["run_id"], r["variant"], r["seed"], r["status"], metric,
                                                        step, flops_at(r, step), value)])


def variants(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by variant, in run order."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["variant"], []).append(r)
    return out


def summarize(values: list[float]) -> tuple[float, float] | None:
    """(mean, sample std; 0 for one value) of the finite values, None if there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _seed_note(counts: set[int], seeds: list[int] | None) -> str:
    """What the intervals rest on: the seeds per variant, the t quantile, and a sweep file that now asks for more."""
    note = ""
    if counts and min(counts) >= 2:
        least = min(counts)
        note = (f" With {least} seeds the interval is mean ± t·s/√{least}, t = {t_quantile(least - 1):.4g} "
                f"({least - 1} degree{'s' if least > 2 else ''} of freedom).")
    if seeds is not None and counts and max(counts) < len(seeds):
        note += (f" The sweep file now asks for seeds {seeds}; these runs have {max(counts)} per variant, so the "
                 "intervals are wider than a rerun's.")
    return note


def write_markdown(runs: list[dict], metrics: list[str], path: Path, title: str = "sweep",
                   compare: dict | None = None, seeds: list[int] | None = None) -> None:
    """results.md: per variant each metric's mean [95 % interval] over the finished seeds, a *floor* row with the
    chance level of each metric that has one (``compare.floors``), then the claims' verdicts (``compare.claims``)."""
    groups = variants(runs)
    stats = {v: {m: seed_interval([r["final"].get(m) for r in rs if r["status"] == "finished"]) for m in metrics}
             for v, rs in groups.items()}
    best = {}
    for m in metrics:
        means = [s[m][0] for s in stats.values() if s[m] is not None]
        best[m] = (max if higher_is_better(m) else min)(means) if means else None
    finished = sum(r["status"] == "finished" for r in runs)
    failed = [r for r in runs if r["status"] == "failed"]
    counts = {sum(r["status"] == "finished" for r in rs) for rs in groups.values()} - {0}
    lines = [f"# Sweep {title}", "",
             f"{len(runs)} runs: {finished} finished, {len(failed)} failed, {len(runs) - finished - len(failed)} "
             "other. Final validation values, mean [95 % interval] over the finished seeds (Student's t); best "
             "mean in **bold** (↓ lower is better, ↑ higher)." + _seed_note(counts, seeds) + " Compute: total over "
             "the variant's runs, 6·N·D (N: the parameters a position uses, all of them in a dense model) and "
             "measured (FlopCounterMode).", ""]
    lines.append("| variant | " + " | ".join(f"{m} {arrow(m)}" for m in metrics)
                 + " | seeds | steps | compute 6·N·D | compute measured |")
    lines.append("|" + "---|" * (len(metrics) + 5))
    for v, rs in groups.items():
        cells = []
        done = [r for r in rs if r["status"] == "finished"]
        for m in metrics:
            s = stats[v][m]
            text = format_interval(s).replace(" (one seed: no interval)", "")
            cells.append(f"**{text}**" if s is not None and s[0] == best[m] else text)
        seeds_text = ", ".join(str(r["seed"]) + ("" if r["status"] == "finished" else f" ({r['status']})")
                               for r in rs)
        steps = "/".join(sorted({str(r["steps"]) for r in done})) or "—"
        compute = [_total([r[k] for r in rs]) for k in ("flops_6nd", "flops_measured")]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {seeds_text} | {steps} | {compute[0]} | {compute[1]} |")
    floors = (compare or {}).get("floors") or {}
    if any(m in floors for m in metrics):  # the chance level beside every score that has one (compare.floors)
        cells = [format_interval(tuple(floors[m]), point=True) if m in floors else "" for m in metrics]
        lines.append("| *floor* | " + " | ".join(cells) + " | | | | |")
    claims = judge_all(runs, compare)
    if claims:
        lines += ["", "## The paper's claims", "", RULE, ""] + claims_markdown(claims)
    if failed:
        lines += ["", "Failed runs (last line of stderr; all of it in the run's stderr.log):", ""]
        lines += [f"- `{r['run_id']}`: {r['error'].splitlines()[-1] if r['error'] else '(no output)'}" for r in failed]
    path.write_text("\n".join(lines) + "\n")


def _total(values: list) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known):.3g}" if known else "—"


def _curve(rs: list[dict], metric: str, x: str) -> tuple[list, list, list, list]:
    """A variant's curve: at each step any seed reached, the mean x, the mean, lowest and highest value."""
    steps = sorted({s for r in rs for s in r["history"].get(metric, {})})
    xs, mean, low, high = [], [], [], []
    for step in steps:
        values = [r["history"][metric][step] for r in rs if step in r["history"].get(metric, {})]
        where = [float(step)] if x == "step" else [flops_at(r, step) for r in rs if step in r["history"][metric]]
        where = [w for w in where if w is not None]
        if not where:
            continue
        xs.append(statistics.fmean(where))
        mean.append(statistics.fmean(values))
        low.append(min(values))
        high.append(max(values))
    return xs, mean, low, high


def write_curves(runs: list[dict], metrics: list[str], path: Path) -> None:
    """metrics × (step, FLOPs) panels; one line per variant (mean over its finished seeds), a min-max band."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    finished = {v: [r for r in rs if r["status"] == "finished"] for v, rs in variants(runs).items()}
    measured = all(r["flops_per_step"] for rs in finished.values() for r in rs)
    fig = Figure(figsize=(11, 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    for row, metric in zip(axes, metrics, strict=True):
        for ax, x in zip(row, ("step", "flops"), strict=True):
            for i, (v, rs) in enumerate(finished.items()):
                xs, mean, low, high = _curve(rs, metric, x)
                if xs:
                    ax.plot(xs, mean, marker="o", ms=3, color=f"C{i % 10}", label=v)
                    ax.fill_between(xs, low, high, color=f"C{i % 10}", alpha=0.2, linewidth=0)
            finish_panel(ax, "step" if x == "step" else f"training FLOPs ({'measured' if measured else '6·N·D'})",
                         f"{metric} {arrow(metric)}", bool(ax.lines), f"no {metric} in any finished run")
    fig.suptitle(f"{path.parent.name}: mean over seeds, band = seed min..max")
    fig.savefig(path, dpi=100)


def write_hparams(runs: list[dict], directory: Path) -> None:
    """One TensorBoard run per finished run, hparams = its settings + seed + variant, metrics = its final
    val/ metrics (rewritten from scratch: the directory is ours)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    shutil.rmtree(directory, ignore_errors=True)
    for r in runs:
        if r["status"] != "finished" or not r["final"]:
            continue
        values = {"variant": r["variant"], "seed": r["seed"]}
        for k, v in r["settings"].items():
            values[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        finals = {k: v for k, v in r["final"].items() if math.isfinite(v)}
        with SummaryWriter(log_dir=str(directory / r["run_id"])) as writer:
            # What SummaryWriter.add_hparams does, without its second writer (and events file) per run.
            for summary in hparams(values, finals):
                writer.file_writer.add_summary(summary)
            for k, v in finals.items():
                writer.add_scalar(k, v, r["steps"])
