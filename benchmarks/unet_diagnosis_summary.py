"""One markdown table of several ``benchmarks/unet_diagnosis.py`` results (before / after a fix, short / long runs).

    python benchmarks/unet_diagnosis_summary.py results/unet_diagnosis/before.json \
        results/unet_diagnosis/skip_dropout.json ... --out results/unet_diagnosis/summary.md

One row per diagnosed model, in the order given: where it comes from (the JSON file and the model's run), its
patcher with the training overrides it was trained with, its step, ``val/cond_gap`` (the mean of the per-t gaps
over t = 250, 500, 750, as the module logs it), the gap at every measured t, and at t = 500: the share of the
prediction the transformer path carries (``zero_ablation.change``), the caption's share (``swap_ablation.change``),
the gradient reaching the transformer's outputs (``grad.hidden``) and the MSE with the true caption.
RESULTS.md includes the table (``{{tables:unet_diagnosis/summary.md}}``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

VAL_TIMESTEPS = (250, 500, 750)  # LatentDiffusion.cond_gap_timesteps: val/cond_gap averages the gap over these
PROBE_T = 500


def _fmt(x, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _overrides(result: dict, model: dict) -> str:
    """The model's training overrides beyond its patcher (from --override of a trained run), e.g. unet_readout=true."""
    trained = (result.get("settings") or {}).get("trained") or {}
    if not model.get("ckpt", "").startswith(str(trained.get("save_dir") or "\0")):
        return ""
    items = [o.removeprefix("--").removeprefix("model.init_args.") for o in trained.get("override") or []]
    return ", ".join(items)


def rows(result: dict, source: str) -> list[dict]:
    """Per model of a diagnosis JSON: the table's values (None where a t was not measured)."""
    out = []
    for m in result["models"]:
        by_t = {r["t"]: r for r in m["by_t"]}
        val = [by_t[t]["cond_gap"] for t in VAL_TIMESTEPS if t in by_t]
        probe = by_t.get(PROBE_T)
        extra = _overrides(result, m)
        out.append({
            "source": source,
            "run": m["name"],
            "model": m["patcher"] + (f" ({extra})" if extra else ""),
            "step": m.get("step"),
            "val_cond_gap": sum(val) / len(val) if len(val) == len(VAL_TIMESTEPS) else None,
            "cond_gap_by_t": {t: by_t[t]["cond_gap"] for t in sorted(by_t)},
            "transformer_share": probe["zero_ablation"]["change"] if probe else None,
            "caption_share": probe["swap_ablation"]["change"] if probe else None,
            "grad_hidden": probe["grad"]["hidden"] if probe else None,
            "mse": probe["mse"]["true"] if probe else None,
        })
    return out


def table(all_rows: list[dict]) -> str:
    ts = sorted({t for r in all_rows for t in r["cond_gap_by_t"]})
    head = (["source", "model", "step", "val/cond_gap"] + [f"gap t={t}" for t in ts]
            + [f"transformer share t={PROBE_T}", f"caption share t={PROBE_T}", f"grad to transformer t={PROBE_T}",
               f"MSE t={PROBE_T}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in all_rows:
        cells = [r["source"], r["model"], _fmt(r["step"], "d"), _fmt(r["val_cond_gap"], ".3f")]
        cells += [_fmt(r["cond_gap_by_t"].get(t), ".3f") for t in ts]
        cells += [_fmt(r["transformer_share"], ".2f"), _fmt(r["caption_share"], ".3f"),
                  _fmt(r["grad_hidden"], ".2e"), _fmt(r["mse"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(files: list[str], out: str = "results/unet_diagnosis/summary.md") -> str:
    """Write the table of ``files`` (diagnosis JSONs) to ``out`` and return it.

    Args:
        files: JSON files written by benchmarks/unet_diagnosis.py, in the order of the rows
        out: the markdown file written
    """
    all_rows = [r for f in files for r in rows(json.loads(Path(f).read_text()), Path(f).stem)]
    text = (f"Written by `python benchmarks/unet_diagnosis_summary.py {' '.join(files)} --out {out}`. "
            f"val/cond_gap: mean gap over t = {', '.join(map(str, VAL_TIMESTEPS))}; shares are "
            "||prediction change|| / ||prediction|| when the transformer's patch outputs are zeroed (transformer) or "
            "taken from another caption (caption); the gradient is ||dMSE/d(transformer outputs)||.\n\n"
            + table(all_rows))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="diagnosis JSON files, in the order of the rows")
    parser.add_argument("--out", default="results/unet_diagnosis/summary.md", help="the markdown file written")
    main(**vars(parser.parse_args()))
