"""Several runs side by side on one metric, at every step of the band (``python -m lit_transfusion reference steps``):
when does each reach the band of the main job's seeds, and where does it stay."""

from __future__ import annotations

from pathlib import Path

from lit_transfusion.commands.reference.band import interval_text, read_band, series
from lit_transfusion.commands.reference.overlay import judged, position
from lit_transfusion.commands.reference.runs import fmt, load_run
from lit_transfusion.errors import SettingError


def steps_table(runs: list[str], metric: str, band: str) -> str:
    """A markdown table: per band step of ``metric``, the band (min – max, mean [95 %]) and each run's value with
    its position (inside, above or below, and whether that is better); "—" where a run has no value there."""
    rows, meta = read_band(band)
    rows = sorted((r for r in rows if r["tag"] == metric), key=lambda r: r["step"])
    if not rows:
        raise SettingError(f"--metric {metric}: not in {band}/band.csv (it has {', '.join(meta['tags'])})")
    loaded = [load_run(r) for r in runs]
    values = [series(run, metric, meta["window"]) for run in loaded]
    head = ["step", "band min – max", "band mean [95 %]", *(run.name for run in loaded)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" + "---|" * (len(head) - 1)]
    for row in rows:
        cells = [str(row["step"]), f"{fmt(row['min'])} – {fmt(row['max'])}", interval_text(row)]
        for points in values:
            value = points.get(row["step"])
            cells.append("—" if value is None else f"{fmt(value)} ({judged(metric, position(value, row))})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def steps(runs: list[str], metric: str, band: str, out: str | None) -> str:
    """Write (to ``out``) and print the table of :func:`steps_table` under a line saying how it was made."""
    command = (f"python -m lit_transfusion reference steps [{','.join(runs)}] --metric {metric} --band {band}"
               + (f" --out {out}" if out else ""))
    _, meta = read_band(band)
    text = (f"Made by `{command}`: `{metric}` of each run at every step of the band in {band} "
            f"({len(meta['runs'])} seeds: {', '.join(r['name'] for r in meta['runs'])}); a value is inside the band "
            "when it lies within the seeds' [min, max] at that step.\n\n" + steps_table(runs, metric, band))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text, end="")
    return text
