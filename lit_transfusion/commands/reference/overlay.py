"""One run read against the reference band (``python -m lit_transfusion reference overlay``): at every band step the
run has, is its value inside the seeds' [min, max], above or below; and a reading of the final step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lit_transfusion.commands.reference.band import interval_text, read_band, series
from lit_transfusion.commands.reference.runs import Run, config_differences, fmt, load_run
from lit_transfusion.commands.sweep.direction import higher_is_better


def position(value: float, row: dict[str, Any]) -> str:
    """"inside" the band's [min, max] (bounds included), "above" or "below" it; "not finite" for nan/inf."""
    if not math.isfinite(value):
        return "not finite"
    return "below" if value < row["min"] else "above" if value > row["max"] else "inside"


def judged(tag: str, where: str) -> str:
    """A position with what it means for ``tag``: e.g. "below (worse: higher is better)"."""
    if where not in ("above", "below"):
        return where
    higher = higher_is_better(tag)
    better = (where == "above") == higher
    return f"{where} ({'better' if better else 'worse'}: {'higher' if higher else 'lower'} is better)"


def compare(run: Run, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The run's value and position at every band step it has, the steps it lacks, and its final reading."""
    tags = meta["tags"]
    values = {tag: series(run, tag, meta["window"]) for tag in tags}
    points: list[dict[str, Any]] = []
    skipped: dict[str, list[int]] = {}  # band steps without a value of the run
    for row in sorted(rows, key=lambda r: (tags.index(r["tag"]), r["step"])):
        value = values[row["tag"]].get(row["step"])
        if value is None:
            skipped.setdefault(row["tag"], []).append(row["step"])
        else:
            points.append({**row, "value": value, "position": position(value, row)})
    val_steps = [p["step"] for p in points if p["tag"].startswith("val/")]
    final_step = max(val_steps or [p["step"] for p in points] or [0])
    finals: dict[str, dict[str, Any]] = {}
    for p in points:
        if p["step"] <= final_step and (p["tag"] not in finals or p["step"] > finals[p["tag"]]["step"]):
            finals[p["tag"]] = p
    reached = max((max(p) for p in run.scalars.values() if p), default=0)
    ahead = {t: [s for s in steps if s > reached] for t, steps in skipped.items()}
    missing = {t: [s for s in steps if s <= reached] for t, steps in skipped.items()}
    return {"values": values, "points": points, "reached": reached, "final_step": final_step, "finals": finals,
            "ahead": {t: s for t, s in ahead.items() if s}, "missing": {t: s for t, s in missing.items() if s}}


def reading(name: str, result: dict[str, Any], tags: list[str]) -> str:
    """One line: within the band at the final step for k of m metrics, and which are outside, which way."""
    finals, step = result["finals"], result["final_step"]
    if not finals:
        return f"{name}: no value at any step of the band (its steps: see band.csv)"
    inside = [t for t in tags if t in finals and finals[t]["position"] == "inside"]
    text = f"{name}: within the reference band at step {step} for {len(inside)} of {len(finals)} metrics"
    outside = [f"{t} {judged(t, finals[t]['position'])}" for t in tags if t in finals and t not in inside]
    earlier = [f"{t} at step {finals[t]['step']}" for t in tags if t in finals and finals[t]["step"] != step]
    missing = [t for t in tags if t not in finals]
    for label, items in (("outside", outside), ("judged earlier", earlier), ("no value", missing)):
        if items:
            text += f"; {label}: " + ", ".join(items)
    return text


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{len(steps)} steps, {steps[0]}–{steps[-1]}"


def markdown(run: Run, band_dir: str, command: str, result: dict[str, Any], meta: dict[str, Any]) -> tuple[str, str]:
    """overlay.md, and the part of it printed (everything before the per-step table)."""
    tags = meta["tags"]
    names = ", ".join(r["name"] for r in meta["runs"])
    lines = [
        f"# {run.name} against the reference band",
        "",
        f"Made by `{command}`: the run at {run.path} ({run.summary.get('cpu_class')}, "
        f"{run.summary.get('precision')}, {run.summary.get('steps')} steps) against {band_dir}/band.csv "
        f"({len(meta['runs'])} seeds: {names}). A value is inside the band when it lies within the seeds' "
        f"[min, max] at that step; train/ losses are averaged over windows of {meta['window']} steps as in the band.",
        "",
        "**" + reading(run.name, result, tags) + ".**",
        "",
    ]
    ahead, missing = result["ahead"], result["missing"]
    if missing:
        lines += [f"Skipped: {sum(map(len, missing.values()))} band step(s) the run has passed without a value there: "
                  + "; ".join(f"{t}: {_steps(s)}" for t, s in missing.items()) + ".", ""]
    if ahead:
        lines += [f"Skipped: {sum(map(len, ahead.values()))} band step(s) past the run's last logged step "
                  f"({result['reached']}): " + "; ".join(f"{t}: {_steps(s)}" for t, s in ahead.items()) + ".", ""]
    notes = _fid_notes(run, meta) + _config_notes(run, meta)
    lines += [*(f"Note: {n}" for n in notes), *([""] if notes else [])]
    lines += ["## Final step", "", "| metric | better | step | run | band min – max | band mean [95 %] | position |",
              "|---|---|---:|---|---|---|---|"]
    for tag in tags:
        p = result["finals"].get(tag)
        better = "higher ↑" if higher_is_better(tag) else "lower ↓"
        if p is None:
            lines.append(f"| {tag} | {better} | — | — | | | no value at a band step |")
        else:
            lines.append(f"| {tag} | {better} | {p['step']} | {fmt(p['value'])} | {fmt(p['min'])} – {fmt(p['max'])} "
                         f"| {interval_text(p)} | {judged(tag, p['position'])} |")
    printed = "\n".join(lines) + "\n"
    lines += ["", "## Every band step the run has", "", "| metric | step | 6·N·D | run | band min – max | position |",
              "|---|---:|---:|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['tag']} | {p['step']} | {fmt(p['flops'], 3)} | {fmt(p['value'])} | {fmt(p['min'])} – "
                     f"{fmt(p['max'])} | {judged(p['tag'], p['position'])} |")
    lines += ["", "The curves: overlay.png (the band shaded, the run on top).", ""]
    return "\n".join(lines), printed


def _fid_notes(run: Run, meta: dict[str, Any]) -> list[str]:
    """Steps where the run's FID was measured on another number of images than the band's."""
    notes = []
    for step, ns in meta.get("fid_n", {}).items():
        mine = run.scalars.get("val/fid_n", {}).get(int(step))
        if mine is not None and ns and mine not in ns:
            notes.append(f"at step {step} the run's FID/KID used n = {mine:.0f} images, the band's "
                         f"{'/'.join(f'{n:.0f}' for n in ns)}: FID depends on n, compare with care.")
    return notes


def _config_notes(run: Run, meta: dict[str, Any]) -> list[str]:
    if not run.config:
        return ["the run has no config.yaml: not compared with the band's config."]
    differs = config_differences(meta["config"], run.config)
    if not differs:
        return []
    shown = "; ".join(differs[:5]) + (f"; and {len(differs) - 5} more" if len(differs) > 5 else "")
    return [f"the run's config differs from the band's (band -> run) in {len(differs)} key(s): {shown}."]


def overlay(run: str, band: str, out: str | None) -> Path:
    """Write overlay.md and overlay.png of ``run`` against the band in ``band`` into ``out`` (default: the run's
    directory); print the reading."""
    from lit_transfusion.commands.reference.plot import draw

    target = load_run(run)
    rows, meta = read_band(band)
    directory = Path(out) if out else target.path
    command = f"python -m lit_transfusion reference overlay {run} --band {band}" + (f" --out {out}" if out else "")
    result = compare(target, rows, meta)
    text, printed = markdown(target, band, command, result, meta)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "overlay.md").write_text(text)
    draw(directory / "overlay.png", rows, meta["tags"], f"{target.name} on the reference band "
         f"({len(meta['runs'])} seeds)", run=result["values"], run_label=target.name)
    print(printed, end="")
    print(f"wrote {directory}/overlay.md, overlay.png")
    return directory
