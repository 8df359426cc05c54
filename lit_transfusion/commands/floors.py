"""Floors and ceilings of the shapes world's evaluation scores, each at the n the evaluation uses.

    python -m lit_transfusion floors                          # n = 96, 384, 1000 -> results/floors/
    python -m lit_transfusion floors --n [16] --out /tmp/f    # a quick look

A score means little without the value a model gets for free (a floor) and the best value the pipeline allows (a
ceiling), measured the same way at the same n: FID's finite-sample bias alone moves it by tens at n = 96. This
command measures, exactly as ``callbacks.evaluation.ShapesEvaluation`` does (same real set: the split's first
``fid_real`` renders; same feature net; the GenEval prompts of the split, ``images_per_prompt`` images each, which
are also FID/KID's fake set), these image controls:

    prompt_renders   renders of a fresh scene drawn from each GenEval prompt: a perfect model (GenEval ceiling)
    vae_recon        those renders through the shapes VAE (encode, decode): the ceiling of a latent model
    vq_recon         those renders through the shapes VQ tokenizer: the ceiling of the discrete-token baseline
    real_heldout     disjoint held-out renders of the split (real vs real: FID/KID's own floor; prompt-ignoring)
    prompt_ignoring  the prompt renders shuffled among prompts: the right images for the wrong prompt
    random_latents   standard normal latents (the standardized latent space) decoded by the VAE
    random_codes     uniform random codes decoded by the VQ tokenizer

and these caption controls, scored by ``scoring.caption_scores`` against the split's first n scenes:

    own_caption      the scene's own full caption (ceiling)
    other_caption    the full caption of another held-out scene (a model that ignores the image)
    generic_caption  one fixed full caption for every image
    vague_caption    "a circle" for every image: often true, says almost nothing (high precision, low recall: why
                     captions are judged by F1, not by precision alone)

Writes ``<out>/floors.json`` (every number, the settings, the seconds taken) and ``<out>/floors.md`` (tables).
GenEval rates come with Wilson 95 % intervals, caption scores with bootstrap 95 % intervals over captions.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

GENERIC_CAPTION = "a medium red circle in the center and a medium blue square on the left"
VAGUE_CAPTION = "a circle"
IMAGE_CONTROLS: dict[str, str] = {
    "prompt_renders": "renders of each GenEval prompt's own scene (ceiling)",
    "vae_recon": "those renders through the VAE (latent-model ceiling)",
    "vq_recon": "those renders through the VQ tokenizer (code-model ceiling)",
    "real_heldout": "disjoint held-out renders (real vs real)",
    "prompt_ignoring": "prompt renders shuffled among prompts",
    "random_latents": "N(0, 1) standardized latents, VAE-decoded",
    "random_codes": "uniform random codes, VQ-decoded",
}
CAPTION_CONTROLS: dict[str, str] = {
    "own_caption": "the scene's own full caption (ceiling)",
    "other_caption": "another held-out scene's full caption",
    "generic_caption": f'always "{GENERIC_CAPTION}"',
    "vague_caption": f'always "{VAGUE_CAPTION}"',
}


def floors(
    n: list[int] | None = None,
    out: str = "results/floors",
    split: str = "val",
    seed: int = 0,
    fid_real: int = 512,
    images_per_prompt: int = 2,
    kid_subsets: int = 100,
    vae_path: str = "datamodules/shapes/pretrained_vae",
    vq_path: str = "datamodules/shapes/pretrained_vq",
) -> Path:
    """Measure the floors and ceilings (see the module docstring) and write ``floors.json`` and ``floors.md``.

    Args:
        n: the evaluation sizes (generated images; captions); default [96, 384, 1000]. Images are rounded up to
            whole prompts per family, as the evaluation does (1000 -> 1008; the JSON records the n used).
        out: the directory to write.
        split: the held-out split ("val": what fit's validations score; "test").
        seed: the shapes world's seed (``data.seed``; the evaluation's real set and prompts depend on it).
        fid_real: held-out renders forming FID/KID's real set (``ShapesEvaluation.fid_real``).
        images_per_prompt: images per GenEval prompt (``ShapesEvaluation.images_per_prompt``).
        kid_subsets: KID's subsets (``ShapesEvaluation.kid_subsets``).
        vae_path: the shapes VAE (``data.vae_path``).
        vq_path: the shapes VQ tokenizer (``data.vq_path``).
    """
    from callbacks.fid import ImageDistances
    from datamodules.shapes.world import ShapesWorld
    from lit_transfusion.vae import LatentCodec
    from lit_transfusion.vq import CodeCodec

    start = time.perf_counter()
    sizes = list(n or [96, 384, 1000])
    world = ShapesWorld(seed)
    vae, vq = LatentCodec.from_dir(vae_path), CodeCodec.from_dir(vq_path)
    metric = ImageDistances("shapes", kid_subsets=kid_subsets)
    # The evaluation's real set: the split's first fid_real renders (ShapesDataModule.heldout_images).
    metric.update(_nchw(np.stack([world.sample(split, i).image for i in range(fid_real)])), real=True)
    images, captions = {}, {}
    for size in sizes:
        images[str(size)] = _image_controls(world, split, size, fid_real, images_per_prompt, vae, vq, metric, seed)
        captions[str(size)] = _caption_controls(world, split, size, seed)
    settings = {"split": split, "seed": seed, "fid_real": fid_real, "images_per_prompt": images_per_prompt,
                "kid_subsets": kid_subsets, "feature": "shapes", "vae_path": vae_path, "vq_path": vq_path,
                "generic_caption": GENERIC_CAPTION, "vague_caption": VAGUE_CAPTION, "n": sizes}
    result = {"settings": settings, "image_controls": IMAGE_CONTROLS, "caption_controls": CAPTION_CONTROLS,
              "images": images, "captions": captions, "seconds": round(time.perf_counter() - start, 1)}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "floors.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "floors.md").write_text(markdown(result))
    return out_dir


# ----------------------------------------------------------------------------------------------- images

def _nchw(images) -> torch.Tensor:
    from callbacks.fid import to_uint8_nchw

    return to_uint8_nchw(images)


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output [N, 3, H, W] in [-1, 1] -> uint8 [N, 3, H, W] (as ``callbacks.common.generate_uint8``)."""
    return ((pixels + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)


def _prompts(world, split: str, size: int, images_per_prompt: int) -> list:
    """The evaluation's GenEval prompts for about ``size`` images, one entry per image (``ShapesEvaluation``)."""
    from callbacks.evaluation import geneval_prompts, prompts_per_family_for

    per_family = prompts_per_family_for(size, images_per_prompt, len(world.families))
    stream = (world.sample(split, i).prompt for i in itertools.count())  # the split's samples, in order
    return [p for p in geneval_prompts(stream, per_family, world.families) for _ in range(images_per_prompt)]


def _controls(world, split: str, prompts: list, fid_real: int, vae, vq, seed: int) -> dict[str, Callable]:
    """Each image control as a thunk -> uint8 [m, 3, H, W], m = len(prompts), image j for prompts[j]."""
    from datamodules.shapes.world import render, sample_scene
    from lit_transfusion.images import images_to_tensor

    m = len(prompts)
    renders = _nchw(np.stack([render(sample_scene(p, np.random.default_rng([seed, 11, j]), world.image_size))
                              for j, p in enumerate(prompts)]))
    pixels = images_to_tensor(renders.permute(0, 2, 3, 1))  # [-1, 1]
    gen = torch.Generator().manual_seed(seed)
    latent_shape = vae.latent_shape(world.image_size)
    code_shape = vq.code_shape(world.image_size)
    return {
        "prompt_renders": lambda: renders,
        "vae_recon": lambda: _to_uint8(vae.decode(vae.encode(pixels))),
        "vq_recon": lambda: _to_uint8(vq.decode(vq.encode(pixels))),
        # Past the real set's indices: disjoint from it.
        "real_heldout": lambda: _nchw(np.stack([world.sample(split, fid_real + j).image for j in range(m)])),
        "prompt_ignoring": lambda: renders[torch.randperm(m, generator=torch.Generator().manual_seed(seed + 1))],
        "random_latents": lambda: _to_uint8(vae.decode(torch.randn(m, *latent_shape, generator=gen))),
        "random_codes": lambda: _to_uint8(vq.decode(torch.randint(0, vq.codebook_size, (m, *code_shape),
                                                                  generator=gen))),
    }


@torch.no_grad()
def _image_controls(world, split: str, size: int, fid_real: int, images_per_prompt: int, vae, vq, metric,
                    seed: int) -> dict[str, dict]:
    """{control: {fid, kid, kid_std, fid_n, fid_real_n, geneval: {...with Wilson intervals}}} at ``size``."""
    from callbacks.evaluation import geneval_with_intervals

    prompts = _prompts(world, split, size, images_per_prompt)
    out = {}
    for name, make in _controls(world, split, prompts, fid_real, vae, vq, seed).items():
        images = make()
        metric.reset()  # the fake set only; the real features stay
        metric.update(images, real=False)
        scores = metric.compute()
        scores["geneval"] = geneval_with_intervals(prompts, list(images.permute(0, 2, 3, 1).numpy()))
        out[name] = scores
    return out


# ---------------------------------------------------------------------------------------------- captions

def _caption_controls(world, split: str, size: int, seed: int) -> dict[str, dict]:
    """{control: {precision, recall, f1 and their _low/_high}} over the split's first ``size`` scenes."""
    from callbacks.evaluation import caption_scores_with_intervals
    from datamodules.shapes.world import scene_caption

    scenes = [world.sample(split, i).scene for i in range(size)]
    rng = np.random.default_rng([seed, 6])  # the phrasing stream ShapesDataModule.heldout_captions uses
    own = [scene_caption(s, rng) for s in scenes]
    texts = {"own_caption": own, "other_caption": own[1:] + own[:1], "generic_caption": [GENERIC_CAPTION] * size,
             "vague_caption": [VAGUE_CAPTION] * size}
    return {name: caption_scores_with_intervals(t, scenes) for name, t in texts.items()}


# ---------------------------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    """The tables of ``floors.md``: per n, the image controls, then the caption controls."""
    s = result["settings"]
    lines = [
        "# Floors and ceilings of the shapes-world evaluation",
        "",
        f"Written by `python -m lit_transfusion floors --n {json.dumps(s['n']).replace(' ', '')}` in "
        f"{result['seconds']:.0f} s (split `{s['split']}`, world seed {s['seed']}, real set: the split's first "
        f"{s['fid_real']} renders, shapes feature net, KID over {s['kid_subsets']} subsets, "
        f"{s['images_per_prompt']} images per GenEval prompt). Compare a run's `val/fid`, `val/kid`, "
        "`val/geneval/*` with the rows at its `val/fid_n`; FID and KID depend on n, GenEval and captions do not "
        "(only their intervals narrow). GenEval: overall [Wilson 95 % interval]; captions: mean [bootstrap 95 %].",
        "",
        "Reading them: the GenEval prompts are drawn from the same split whose first renders form the real set, so "
        "a model that follows its prompts shares counts and shapes with real images it is compared to: from n = 384 "
        "on, the prompt renders (and at n = 1000 their VAE/VQ reconstructions too) score *below* real vs real, and "
        "their KID goes negative (closer than an independent sample). KID is unbiased, so at n = 96 its spread "
        "(± std over subsets) says how little FID/KID can separate there. A GenEval score is only above chance if "
        "its interval clears the prompt-ignoring rows; a caption's precision alone is no evidence (the vague "
        "caption's).",
        "",
    ]
    for size, controls in result["images"].items():
        n_used = int(next(iter(controls.values()))["fid_n"])
        lines += [f"## n = {size} ({n_used} images)", "",
                  "| control | what | FID | KID ± std | GenEval overall |", "|---|---|---:|---:|---|"]
        for name, v in controls.items():
            g = v["geneval"]
            lines.append(f"| {name} | {result['image_controls'][name]} | {v['fid']:.1f} | "
                         f"{v['kid']:.2f} ± {v['kid_std']:.2f} | "
                         f"{g['overall']:.3f} [{g['overall_low']:.3f}, {g['overall_high']:.3f}] |")
        lines += ["", "| caption control | what | precision | recall | F1 |", "|---|---|---|---|---|"]
        for name, v in result["captions"][size].items():
            cells = [f"{v[k]:.3f} [{v[k + '_low']:.3f}, {v[k + '_high']:.3f}]" for k in ("precision", "recall", "f1")]
            lines.append(f"| {name} | {result['caption_controls'][name]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    print(auto_cli(floors, args=argv, as_positional=False))
