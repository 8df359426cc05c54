"""``reference add``: a finished main-job fit run -> an entry of results/main_job (small text files), and the
index of every entry there, runs.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from lit_transfusion.commands.reference.runs import (
    EVENTS,
    SAFE_NAME,
    config_differences,
    entries,
    fmt,
    has_events,
    read_json,
    read_yaml,
    summarize,
    write_scalars_csv,
)
from lit_transfusion.errors import SettingError


# ----------------------------------------------------------------------------------------------- add
def add(run_dir: str, name: str | None, into: str, config: str, allow_unfinished: bool) -> Path:
    """Copy a finished main-job fit run into ``<into>/<name>/`` and rewrite ``<into>/runs.md``."""
    from lit_transfusion.commands.sweep.results import tensorboard_scalars

    src = Path(run_dir)
    if not src.is_dir():
        raise SettingError(f"{run_dir}: no such directory")
    if not has_events(src):
        raise SettingError(f"{run_dir}: no TensorBoard event files ({EVENTS}): not a fit run directory "
                           "(runs/<name>/version_N)")
    for needed, what in (("metrics.json", "the evaluation callback writes it at every validation"),
                         ("config.yaml", "fit writes it at start")):
        if not (src / needed).is_file():
            raise SettingError(f"{run_dir}: no {needed} ({what}): not a finished fit run of the main job")
    if not Path(config).is_file():
        raise SettingError(f"--config {config}: no such file (the config the run was started with)")
    run_config = read_yaml(src / "config.yaml")
    differs = config_differences(yaml.safe_load(Path(config).read_text()) or {}, run_config, only_reference_keys=True)
    scalars = tensorboard_scalars(src)
    metrics = read_json(src / "metrics.json")
    summary = summarize(src, scalars, metrics, run_config, read_yaml(src / "hparams.yaml"), config_file=config,
                        config_differs=differs)
    if summary["finished"] is False and not allow_unfinished:
        raise SettingError(f"{run_dir}: unfinished: val/schedule_progress {summary['schedule_progress']:.3g} at step "
                           f"{summary['steps']} (a finished run's schedule reaches 1); wait for it to end, or pass "
                           "--allow_unfinished")
    name = name or default_name(summary, src)
    if not set(name) <= SAFE_NAME or name.startswith("."):
        raise SettingError(f"--name {name!r}: use letters, digits and . _ = + , -, not first a dot (it names a "
                           "directory)")
    dest = Path(into) / name
    previous = read_json(dest / "summary.json").get("source")
    if previous and previous != summary["source"]:
        raise SettingError(f"--name {name}: {dest} holds another run ({previous}); give this one another --name")
    summary["name"] = name
    dest.mkdir(parents=True, exist_ok=True)
    for file in ("metrics.json", "config.yaml", "hparams.yaml"):
        if (src / file).is_file():
            shutil.copyfile(src / file, dest / file)
    write_scalars_csv(scalars, dest / "scalars.csv")
    (dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    index = write_index(Path(into))
    rate = f"{summary['steps_per_s']:.2f} steps/s" if summary["steps_per_s"] else "steps/s unknown"
    print(f"added {dest}: {sum(len(p) for p in scalars.values())} scalars of {len(scalars)} tags, "
          f"{summary['steps']} steps, {rate}, {summary['cpu_class']} {summary['precision']}; index: {index}")
    if differs:
        shown = "; ".join(differs[:4]) + (f"; and {len(differs) - 4} more" if len(differs) > 4 else "")
        print(f"note: its config.yaml differs from {config} in {len(differs)} key(s): {shown}")
    if summary["finished"] is False:
        print(f"note: unfinished (val/schedule_progress {summary['schedule_progress']:.3g}), added as asked")
    return dest


def default_name(summary: dict, src: Path) -> str:
    """``<CPU class>-seed<seed_everything>``; without an integer seed, the run directory's names."""
    seed = summary.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return f"{summary['cpu_class']}-seed{seed}"
    return f"{summary['cpu_class']}-{src.parent.name}-{src.name}"


# ----------------------------------------------------------------------------------------------- runs.md
def with_interval(final: dict, key: str) -> str:
    """``value [low, high]`` where the run logged the key's interval, else the value."""
    low, high = final.get(f"{key}_low"), final.get(f"{key}_high")
    bounds = f" [{fmt(low, 3)}, {fmt(high, 3)}]" if low is not None and high is not None else ""
    return fmt(final.get(key)) + bounds


def write_index(directory: Path) -> Path:
    """``<directory>/runs.md``: one row per run entry, from the summary.json files alone."""
    lines = [
        "# Main-job runs",
        "",
        "Generated by `python -m lit_transfusion reference add RUN_DIR` (rewritten at every add) from each run's "
        "summary.json; the band over them: `python -m lit_transfusion reference band`. steps/s: steps over the "
        "wall seconds from the start of fit to its last validation (validations included). Final values: the run's "
        "last validation, [low, high] where it logged an interval; FID and KID at `val/fid_n` generated images.",
        "",
        "| run | CPU class | CPU | precision | steps | steps/s | finished | val/cond_gap ↑ | val/geneval/overall ↑ | "
        "val/fid ↓ (n) | val/kid ↓ | val/caption_f1 ↑ | config |",
        "|---|---|---|---|---:|---:|---|---|---|---|---|---|---|",
    ]
    for path in entries(directory):
        s = read_json(path / "summary.json")
        f = s.get("final", {})
        n = f" (n={f['val/fid_n']:.0f})" if "val/fid_n" in f else ""
        n_differs = len(s.get("config_differs") or [])
        differs = f" (differs in {n_differs} key{'s' if n_differs > 1 else ''})" if n_differs else ""
        finished = {True: "yes", False: "no", None: "?"}[s.get("finished")]
        lines.append(
            f"| {s.get('name', path.name)} | {s.get('cpu_class', '?')} | {(s.get('machine') or {}).get('cpu') or '?'} "
            f"| {s.get('precision')} | {s.get('steps')} | {fmt(s.get('steps_per_s'), 3)} | {finished} | "
            f"{with_interval(f, 'val/cond_gap')} | {with_interval(f, 'val/geneval/overall')} | "
            f"{fmt(f.get('val/fid'))}{n} | {fmt(f.get('val/kid'))} | {with_interval(f, 'val/caption_f1')} | "
            f"{s.get('config') or '?'}{differs} |")
    path = directory / "runs.md"
    path.write_text("\n".join(lines) + "\n")
    return path
