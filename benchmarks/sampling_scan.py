"""The same checkpoint scored with different sampling settings: what guidance and denoising steps are worth.

    python benchmarks/sampling_scan.py --ckpt runs/shapes-tiny/version_0/checkpoints/last.ckpt \
        --guidance_scales [1.5,3,5,7.5] [--steps [25]] [--images 384] [--out results/sampling_scan/scan.json]

Training decides what the model knows; the sampler decides how much of it the images show. Every setting is scored
as the main job's final evaluation scores a run (``ShapesEvaluation`` of ``configs/shapes/tiny.yaml``, ``final``:
GenEval-style accuracy with Wilson intervals over ``--images`` generated images, FID and KID of the same images
against the held-out renders), with the same prompts and the same sampling seed, so settings differ only in the
setting. The run's ``config.yaml`` rebuilds its datamodule. Writes the JSON (settings, machine, one record per
setting) and a markdown table beside it (``.md``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from callbacks.evaluation import ShapesEvaluation  # noqa: E402
from lit_transfusion.commands.load import _class, load_run  # noqa: E402
from lit_transfusion.generation import SamplingConfig  # noqa: E402
from lit_transfusion.hardware import machine  # noqa: E402

KEYS = ("geneval/overall", "geneval/overall_low", "geneval/overall_high", "fid", "kid", "kid_std", "fid_n")


def datamodule(ckpt: str):
    """The run's datamodule, set up for validation (``config.yaml`` beside the checkpoint's run directory)."""
    config_path = Path(ckpt).resolve().parent.parent / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    dm = _class(config, "data", None, config_path)(**dict(config["data"].get("init_args") or {}))
    dm.prepare_data()
    dm.setup("validate")
    return dm


def table(records: list[dict]) -> str:
    head = ["scheduler", "steps", "guidance", "GenEval-style [95 %]", "FID", "KID", "images", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        lines.append(f"| {r['scheduler']} | {r['steps']} | {r['guidance_scale']:g} | {m['geneval/overall']:.3f} "
                     f"[{m['geneval/overall_low']:.3f}, {m['geneval/overall_high']:.3f}] | {m['fid']:.1f} | "
                     f"{m['kid']:.1f} | {int(m['fid_n'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(ckpt: str, guidance_scales: list[float] | None = None, steps: list[int] | None = None,
         scheduler: str = "ddim", images: int = 384, threads: int | None = None,
         out: str = "results/sampling_scan/scan.json") -> list[dict]:
    """Score ``ckpt`` at every (steps, guidance scale).

    Args:
        ckpt: a ``fit`` checkpoint (its run directory holds config.yaml)
        guidance_scales: classifier-free guidance scales (default [1.5, 3, 5, 7.5]; the main job samples with 3)
        steps: denoising steps (default [25], the main job's)
        scheduler: ddim, ddpm or dpm++
        images: generated images per setting (GenEval-style prompts x 2; also FID/KID's fake set)
        threads: torch intra-op threads (default: torch's)
        out: the JSON written (and the markdown table beside it)
    """
    if threads:
        torch.set_num_threads(threads)
    module = load_run(ckpt)[0]
    dm = datamodule(ckpt)
    records = []
    for n_steps in steps or [25]:
        for scale in guidance_scales or [1.5, 3.0, 5.0, 7.5]:
            sampling = SamplingConfig(scheduler=scheduler, steps=n_steps, guidance_scale=scale)
            evaluation = ShapesEvaluation(final_fid_images=images, num_captions=0, ppl_documents=0, sampling=sampling)
            t0 = time.perf_counter()
            with torch.no_grad():
                metrics = evaluation.compute(module, dm, "val", stage="val", final=True)
            seconds = time.perf_counter() - t0
            record = {"scheduler": scheduler, "steps": n_steps, "guidance_scale": scale, "seconds": seconds,
                      "metrics": {k: float(metrics[f"val/{k}"]) for k in KEYS if f"val/{k}" in metrics}}
            print(json.dumps(record), flush=True)
            records.append(record)
    result = {"settings": {"ckpt": ckpt, "images": images, "scheduler": scheduler},
              "machine": machine(), "records": records}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    md = Path(out).with_suffix(".md")
    md.write_text(f"Written by `python benchmarks/sampling_scan.py --ckpt {ckpt} --out {out}` "
                  f"(step {load_step(ckpt)}).\n\n" + table(records))
    print(md.read_text())
    return records


def load_step(ckpt: str) -> int | None:
    """The checkpoint's global step."""
    return torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")


if __name__ == "__main__":
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_function_arguments(main, as_group=False, as_positional=False)
    main(**parser.parse_args().as_dict())
