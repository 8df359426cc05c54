"""One run of the main job, read from a fit run directory (event files, metrics.json, config.yaml) or from an entry
of results/main_job (scalars.csv, summary.json, ...; made by ``add.py``)."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import yaml

from lit_transfusion.errors import SettingError

# The metrics of the band, in the order of its panels; which way each improves: sweep/direction.py.
BAND_TAGS = ("val/cond_gap", "val/geneval/overall", "val/caption_f1", "val/fid", "val/kid", "val/loss_text",
             "val/loss_image", "train/loss_text", "train/loss_image")
# summary.json's final values: the band's metrics, the intervals the run logged for them, what qualifies them.
FINAL_KEYS = (*BAND_TAGS, "val/cond_gap_low", "val/cond_gap_high", "val/geneval/overall_low",
              "val/geneval/overall_high", "val/caption_f1_low", "val/caption_f1_high", "val/fid_n", "val/kid_std",
              "val/schedule_progress", "train/positions_seen")
# The config.yaml keys in which the seeds of one config may differ.
PER_RUN_KEYS = ("seed_everything", "model.init_args.seed", "trainer.logger.init_args.name",
                "trainer.logger.init_args.save_dir", "trainer.logger.init_args.version")
NO_EFFECT_KEYS = ("trainer.enable_progress_bar",)  # what a run shows, not what it computes
MEASURING_CALLBACKS = ("callbacks.flops.FlopsCounter",)  # count and log FLOPs (a sweep adds it), change nothing
SAFE_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=+,-")
EVENTS = "events.out.tfevents.*"


@dataclasses.dataclass
class Run:
    """What the band and the overlay read of one run: scalars as {tag: {global step: value}}."""

    name: str
    path: Path
    scalars: dict[str, dict[int, float]]
    metrics: dict[str, Any]
    config: dict[str, Any]
    hparams: dict[str, Any]
    summary: dict[str, Any]

    def params(self) -> int | None:
        """N of 6·N·D: summary.json's, else counted from the run's config.yaml and hparams.yaml (None: unknown)."""
        if self.summary.get("params") is None:
            self.summary["params"] = parameter_count(self.config, self.hparams)
        return self.summary["params"]


# ----------------------------------------------------------------------------------------------- reading
def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class _HparamsLoader(yaml.SafeLoader):
    """hparams.yaml as Lightning writes it: safe YAML plus ``!!python/tuple`` (a latent shape)."""


_HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node:
                               tuple(loader.construct_sequence(node)))


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    loaded = yaml.load(path.read_text(), Loader=_HparamsLoader)  # noqa: S506 - a SafeLoader with tuples added
    return loaded if isinstance(loaded, dict) else {}


def read_scalars_csv(path: Path) -> dict[str, dict[int, float]]:
    """scalars.csv (tag, step, value) as {tag: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["tag"], {})[int(row["step"])] = float(row["value"])
    return out


def write_scalars_csv(scalars: dict[str, dict[int, float]], path: Path) -> None:
    """Every scalar, one row each, sorted by tag and step; ``repr`` writes a float that reads back to itself."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag", "step", "value"])
        for tag in sorted(scalars):
            for step, value in sorted(scalars[tag].items()):
                writer.writerow([tag, step, repr(float(value))])


def has_events(path: Path) -> bool:
    return any(path.glob(EVENTS))


def load_run(path: str | Path) -> Run:
    """An entry of results/main_job (it has scalars.csv) or a fit run directory (it has event files)."""
    from lit_transfusion.commands.sweep.results import tensorboard_scalars

    path = Path(path)
    if not path.is_dir():
        raise SettingError(f"{path}: no such directory")
    if (path / "scalars.csv").is_file():
        scalars = read_scalars_csv(path / "scalars.csv")
    elif has_events(path):
        scalars = tensorboard_scalars(path)
    else:
        raise SettingError(f"{path}: neither TensorBoard event files ({EVENTS}) nor scalars.csv: not a fit run "
                           "directory (runs/<name>/version_N) or an entry of results/main_job")
    metrics, config = read_json(path / "metrics.json"), read_yaml(path / "config.yaml")
    hparams = read_yaml(path / "hparams.yaml")
    summary = read_json(path / "summary.json")
    if not summary:
        summary = summarize(path, scalars, metrics, config, hparams, count_params=False)
    name = summary.get("name") or (f"{path.parent.name}/{path.name}" if path.name.startswith("version_")
                                   else path.name)
    return Run(name, path, scalars, metrics, config, hparams, summary)


# ----------------------------------------------------------------------------------------------- one run's facts
def cpu_class(machine: dict) -> str:
    """The hardware class that decides the precision and speed of a run: gpu, avx512bf16 (AVX512-BF16 or AMX),
    armbf16, avx512 (no bf16 units), avx2, cpu; unknown without a record of the machine (no metrics.json yet)."""
    if not machine:
        return "unknown"
    if machine.get("gpu"):
        return "gpu"
    flags = set(machine.get("cpu_flags") or ())
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "avx512bf16"
    for flag, name in (("bf16", "armbf16"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return name
    return "cpu"


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value}; list items are keyed ``key[i]``."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list) and any(isinstance(v, (dict, list)) for v in config):
        items = ((f"[{i}]", v) for i, v in enumerate(config))
    else:
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in items:
        sub = f"{prefix}{key}" if str(key).startswith("[") else (f"{prefix}.{key}" if prefix else str(key))
        out.update(flatten(value, sub))
    return out


def config_identity(config: dict, steps: int | None = None) -> str:
    """What runs of one config share, as text: config.yaml less what does not change what a run computes:
    ``PER_RUN_KEYS``, ``NO_EFFECT_KEYS``, the ``MEASURING_CALLBACKS`` and, for a run that ended by its steps
    (``steps`` reached ``trainer.max_steps``), ``trainer.max_time``, a cap it never reached (a sweep's run without a
    time limit and a main-job run under its cap computed the same schedule)."""
    trainer = dict(config.get("trainer") or {})
    callbacks = trainer.get("callbacks")
    if isinstance(callbacks, list):
        trainer["callbacks"] = [c for c in callbacks
                                if not (isinstance(c, dict) and c.get("class_path") in MEASURING_CALLBACKS)]
    max_steps = trainer.get("max_steps")
    if steps is not None and isinstance(max_steps, int) and 0 < max_steps <= steps:
        trainer.pop("max_time", None)
    flat = {k: v for k, v in flatten({**config, "trainer": trainer}).items()
            if k not in PER_RUN_KEYS and k not in NO_EFFECT_KEYS}
    return json.dumps(flat, sort_keys=True, default=str)


def config_differences(reference: dict, other: dict, only_reference_keys: bool = False) -> list[str]:
    """``key: reference value -> other value`` for every key (less ``PER_RUN_KEYS``) where they differ;
    ``only_reference_keys``: only the keys ``reference`` sets (a config file against a run's full config), where a
    null in ``reference`` is a value resolved at start (``trainer.precision``) and not compared."""
    a, b = flatten(reference), flatten(other)
    keys = a if only_reference_keys else sorted(a.keys() | b.keys())
    out = []
    for key in keys:
        if key in PER_RUN_KEYS or (only_reference_keys and a.get(key) is None):
            continue
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            out.append(f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return out


def parameter_count(config: dict, hparams: dict) -> int | None:
    """N: ``callbacks.flops.active_parameters`` of the model config.yaml's ``model`` section builds (the
    arguments linked from the data, e.g. ``vocab_size``, from hparams.yaml), on the meta device where the class
    takes ``empty_init`` (no memory, no weights). None where it cannot be built."""
    model = config.get("model") or {}
    if not isinstance(model, dict) or "class_path" not in model:
        return None
    try:
        from callbacks.flops import active_parameters

        module_name, _, class_name = model["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        accepted = inspect.signature(cls).parameters
        args = dict(model.get("init_args") or {})
        args.update({k: v for k, v in hparams.items() if k in accepted and k not in args})
        if "empty_init" in accepted:
            args["empty_init"] = True
        return int(active_parameters(cls(**args)))
    except Exception:  # noqa: BLE001 - FLOPs are then left out, and said so
        return None


def last(points: dict[int, float] | None) -> float | None:
    return points[max(points)] if points else None


def summarize(path: Path, scalars: dict, metrics: dict, config: dict, hparams: dict, name: str | None = None,
              config_file: str | None = None, config_differs: list[str] | None = None,
              count_params: bool = True) -> dict[str, Any]:
    """summary.json of a run: its final key metrics, steps, time, machine, precision and parameters."""
    run = metrics.get("run") or {}
    machine = run.get("machine") or {}
    latest = metrics.get("latest") or {}
    steps = run.get("steps") or max((max(p) for p in scalars.values() if p), default=0)
    wall = run.get("wall_seconds")
    final = {}
    for key in FINAL_KEYS:
        value = latest.get(key, last(scalars.get(key)))
        if value is not None:
            final[key] = float(value)
    progress = final.get("val/schedule_progress", last(scalars.get("train/schedule_progress")))
    params = parameter_count(config, hparams) if count_params else None
    positions = (scalars.get("train/positions_seen") or {}).get(steps, final.get("train/positions_seen"))
    return {
        "name": name, "source": str(path.resolve()), "config": config_file, "config_differs": config_differs or [],
        "seed": config.get("seed_everything"), "cpu_class": cpu_class(machine), "machine": machine,
        "precision": run.get("precision") or (config.get("trainer") or {}).get("precision"),
        "torch": machine.get("torch"), "steps": steps, "wall_seconds": wall,
        "steps_per_s": steps / wall if wall else None, "schedule_progress": progress,
        "finished": None if progress is None else bool(progress >= 0.999), "params": params,
        "flops_6nd": 6 * params * positions if params and positions else None, "final": final,
    }


# ----------------------------------------------------------------------------------------------- entries
def entries(directory: Path) -> list[Path]:
    """The run entries under ``directory`` (subdirectories with a summary.json), by name."""
    return sorted(p for p in directory.glob("*") if (p / "summary.json").is_file()) if directory.is_dir() else []


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"
