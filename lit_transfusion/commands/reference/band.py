"""The reference band: per metric and step, the mean over the seeds of one config, its Student t 95 % interval and
the seeds' min and max (``python -m lit_transfusion reference band``)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from lit_transfusion.commands.reference.runs import (
    BAND_TAGS,
    Run,
    config_differences,
    config_identity,
    entries,
    fmt,
    load_run,
)
from lit_transfusion.commands.sweep.direction import arrow
from lit_transfusion.errors import SettingError
from lit_transfusion.stats import mean_interval

COLUMNS = ("tag", "step", "flops", "n", "mean", "low", "high", "min", "max")


# ----------------------------------------------------------------------------------------------- series
def binned(points: dict[int, float], window: int) -> dict[int, float]:
    """The mean of the points in each window of ``window`` steps, (k·window - window, k·window], keyed k·window;
    only the windows the points cover to their end (a run still training, or stopped by time, leaves its last
    window out)."""
    groups: dict[int, list[float]] = {}
    for step, value in points.items():
        groups.setdefault(-(-step // window) * window, []).append(value)
    end = max(points, default=0)
    return {k: statistics.fmean(values) for k, values in sorted(groups.items()) if k <= end}


def series(run: Run, tag: str, window: int) -> dict[int, float]:
    """A run's values of ``tag`` by step: validation metrics as logged, train/ ones averaged per window."""
    points = run.scalars.get(tag, {})
    return binned(points, window) if tag.startswith("train/") else dict(sorted(points.items()))


def flops_at(run: Run, step: int) -> float | None:
    """6·N·D after ``step`` steps, D interpolated between the logged ``train/positions_seen`` (None: unknown)."""
    positions = run.scalars.get("train/positions_seen")
    params = run.params()
    if not positions or not params or not min(positions) <= step <= max(positions):
        return None
    steps = sorted(positions)
    return 6.0 * params * float(np.interp(step, steps, [positions[s] for s in steps]))


# ----------------------------------------------------------------------------------------------- grouping
def choose_group(runs: list[Run], runs_dir: str, min_runs: int) -> tuple[list[Run], list[dict], str]:
    """The runs of the largest config group, the others (each with how its config differs) and a sentence saying
    which was chosen. Fewer than ``min_runs`` in it, or two largest groups: a ``SettingError``."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_identity(run.config, run.summary.get("steps")), []).append(run)
    ordered = sorted(groups.values(), key=len, reverse=True)
    chosen = ordered[0]
    others = [r for g in ordered[1:] for r in g]
    names = ", ".join(r.name for r in chosen)
    if len(chosen) < min_runs:
        more = f" (and {len(others)} of {len(ordered) - 1} other config(s))" if others else ""
        raise SettingError(f"--min_runs {min_runs}: {runs_dir} holds {len(chosen)} run(s) of one config "
                           f"({names}){more}; add seeds with python -m lit_transfusion reference add RUN_DIR")
    if len(ordered) > 1 and len(ordered[1]) == len(chosen):
        tied = "; ".join(", ".join(r.name for r in g) for g in ordered if len(g) == len(chosen))
        raise SettingError(f"--runs {runs_dir}: {len(ordered)} configs, the largest tied at {len(chosen)} runs "
                           f"({tied}); choose one with --names [a,b,...]")
    excluded = [{"name": r.name, "differs": config_differences(chosen[0].config, r.config)} for r in others]
    if excluded:
        note = (f"{runs_dir} holds runs of {len(ordered)} configs: the band is the largest group, {len(chosen)} runs "
                f"({names}); left out: " + "; ".join(f"{e['name']} ({(e['differs'] or ['?'])[0]})" for e in excluded))
    else:
        note = f"All {len(chosen)} runs under {runs_dir} share one config ({names})."
    return chosen, excluded, note


# ----------------------------------------------------------------------------------------------- the band
def band_rows(runs: list[Run], window: int, tags: tuple[str, ...] = BAND_TAGS) -> list[dict[str, Any]]:
    """One row per tag and step every run has: n, mean, Student t 95 % interval, min, max, mean 6·N·D."""
    rows = []
    for tag in tags:
        per_run = [series(run, tag, window) for run in runs]
        for step in sorted(set.intersection(*(set(s) for s in per_run))):
            values = [s[step] for s in per_run]
            mean, low, high = mean_interval(values)
            flops = [flops_at(run, step) for run in runs]
            rows.append({"tag": tag, "step": step, "flops": statistics.fmean(flops) if None not in flops else None,
                         "n": len(values), "mean": mean, "low": low, "high": high, "min": min(values),
                         "max": max(values)})
    return rows


def read_band(directory: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """band.csv's rows (numbers as numbers) and band.json of a band directory."""
    directory = Path(directory)
    if not (directory / "band.csv").is_file() or not (directory / "band.json").is_file():
        raise SettingError(f"--band {directory}: no band.csv and band.json there; make them with python -m "
                           "lit_transfusion reference band --out DIR")
    rows = []
    with open(directory / "band.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.append({"tag": row["tag"], "step": int(row["step"]), "n": int(row["n"]),
                         **{k: float(row[k]) if row[k] else None
                            for k in ("flops", "mean", "low", "high", "min", "max")}})
    return rows, json.loads((directory / "band.json").read_text())


def band(runs: str, out: str, min_runs: int, window: int, names: list[str] | None) -> Path:
    """Write band.csv, band.json, band.md and band.png of the runs under ``runs`` into ``out``."""
    paths = entries(Path(runs))
    if names:
        unknown = sorted(set(names) - {p.name for p in paths})
        if unknown:
            raise SettingError(f"--names: {', '.join(unknown)}: not under {runs} (it holds "
                               f"{', '.join(p.name for p in paths) or 'no runs'})")
        paths = [p for p in paths if p.name in names]
    if not paths:
        raise SettingError(f"--runs {runs}: no runs there; add some with python -m lit_transfusion reference add "
                           "RUN_DIR --into " + runs)
    chosen, excluded, note = choose_group([load_run(p) for p in paths], runs, min_runs)
    command = (f"python -m lit_transfusion reference band --runs {runs} --out {out} --min_runs {min_runs} "
               f"--window {window}" + (f" --names [{','.join(names)}]" if names else ""))
    rows = band_rows(chosen, window)
    fid_n = {str(step): sorted({v for r in chosen if (v := r.scalars.get("val/fid_n", {}).get(step)) is not None})
             for step in sorted({row["step"] for row in rows if row["tag"] == "val/fid"})}
    meta = {"command": command, "window": window, "tags": list(BAND_TAGS), "note": note, "excluded": excluded,
            "params": chosen[0].params(), "fid_n": fid_n, "config": chosen[0].config,
            "runs": [{"name": r.name, "seed": r.summary.get("seed"), "cpu_class": r.summary.get("cpu_class"),
                      "cpu": (r.summary.get("machine") or {}).get("cpu"), "precision": r.summary.get("precision"),
                      "torch": r.summary.get("torch"), "steps": r.summary.get("steps"),
                      "wall_seconds": r.summary.get("wall_seconds"), "steps_per_s": r.summary.get("steps_per_s"),
                      "config": r.summary.get("config")} for r in chosen]}
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "band.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                          for k, v in row.items()} for row in rows)
    (directory / "band.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (directory / "band.md").write_text(markdown(rows, meta))
    from lit_transfusion.commands.reference.plot import draw

    draw(directory / "band.png", rows, BAND_TAGS, f"Reference band: {len(chosen)} seeds of the main job "
         f"({meta['runs'][0]['precision']}, {meta['runs'][0]['cpu_class']})")
    print(note)
    print(f"wrote {directory}/band.csv, band.json, band.md, band.png: {len(rows)} rows over {len(chosen)} runs")
    return directory


def final_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tag's row at its last step."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["tag"] not in out or row["step"] > out[row["tag"]]["step"]:
            out[row["tag"]] = row
    return out


def interval_text(row: dict[str, Any]) -> str:
    if row["low"] is None or math.isnan(row["low"]):
        return f"{fmt(row['mean'])} (one seed: no interval)"
    return f"{fmt(row['mean'])} [{fmt(row['low'])}, {fmt(row['high'])}]"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    runs = meta["runs"]
    params = meta["params"]
    compute = (f"FLOPs: 6·N·D with N = {params:,} parameters (the model of the runs' config.yaml, built without "
               "weights) and D = `train/positions_seen` at the step (interpolated between logged steps, mean over "
               "the runs)." if params else "FLOPs: not given (the model's parameter count could not be found).")
    lines = [
        "# Reference band of the main job",
        "",
        f"Made by `{meta['command']}` from the runs' scalars.csv (every TensorBoard scalar of each run). "
        + meta["note"],
        "",
        "Per metric, at every step all the runs have (validation steps; train/ losses averaged over windows of "
        f"{meta['window']} steps, each labelled by its last step, complete windows only): the mean over seeds, its "
        "Student t 95 % interval (`lit_transfusion.stats.mean_interval`, t with n - 1 degrees of freedom) and the "
        "seeds' min and max, the "
        "band `python -m lit_transfusion reference overlay RUN_DIR` reads a run against. Steps are the trainer's "
        "global step. " + compute,
        "",
        "## Runs",
        "",
        "| run | seed | CPU class | CPU | precision | torch | steps | steps/s | wall-clock |",
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in runs:
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r["wall_seconds"] else "—"
        lines.append(f"| {r['name']} | {r['seed']} | {r['cpu_class']} | {r['cpu'] or '?'} | {r['precision']} | "
                     f"{r['torch'] or '?'} | {r['steps']} | {fmt(r['steps_per_s'], 3)} | {wall} |")
    lines += ["", "## Final values", "",
              "| metric | better | step | n | mean [95 % interval] | seed min – max | 6·N·D |",
              "|---|---|---:|---:|---|---|---:|"]
    finals = final_rows(rows)
    for tag in meta["tags"]:
        row = finals.get(tag)
        if row is None:
            lines.append(f"| {tag} | {arrow(tag)} | — | 0 | not at a step every run has | | |")
            continue
        better = "higher" if arrow(tag) == "↑" else "lower"
        lines.append(f"| {tag} | {better} {arrow(tag)} | {row['step']} | {row['n']} | {interval_text(row)} | "
                     f"{fmt(row['min'])} – {fmt(row['max'])} | {fmt(row['flops'], 3)} |")
    if meta["fid_n"]:
        at = ", ".join(f"{step}: {'/'.join(f'{n:.0f}' for n in ns) or '?'}" for step, ns in meta["fid_n"].items())
        lines += ["", f"FID and KID depend on the number of generated images (`val/fid_n` by step: {at}): compare a "
                      "run's values only at the same n."]
    lines += ["", "Every step: band.csv (tag, step, flops, n, mean, low, high, min, max); the curves: band.png; the "
                  "settings and the runs: band.json.", ""]
    return "\n".join(lines)
