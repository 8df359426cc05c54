"""``python -m lit_transfusion sample``: images, text and captions from a trained checkpoint.

    python -m lit_transfusion sample --ckpt_path runs/shapes-tiny/version_0/checkpoints/last.ckpt \\
        --prompt "a red circle left of a blue square" --num_images 4 --guidance_scale 3 --steps 50 \\
        --scheduler ddim --out samples/
    python -m lit_transfusion sample --ckpt_path ... --image scene.png          # captioning
    python -m lit_transfusion sample --ckpt_path ... --prompt "there are" --mode text

The sampling options and their defaults are those of ``SamplingConfig`` (one source for this command, the
evaluation callback and Python users). The run directory (``<run>/config.yaml`` written by ``fit``, two levels
above the checkpoint) says which datamodule made the data; it is rebuilt (cheap: no images) to recover the
tokenizer and the codec (``MixedModalData.image_codec``: the VAE, or the VQ tokenizer of the token baseline),
which is attached to the module: generation goes through ``module.sampler()`` and ``module.codec``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from lit_transfusion.commands.errors import one_line_errors
from lit_transfusion.commands.load import SampleError, load_run
from lit_transfusion.generation import SamplingConfig
from lit_transfusion.images import images_to_tensor


def _read_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> [1, 3, size, size] in [-1, 1] (center-cropped and resized, as in the paper)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import center_crop, resize

    if not path.is_file():
        raise SampleError(f"--image {str(path)!r}: no such file")
    try:
        img = decode_image(str(path), mode=ImageReadMode.RGB)  # [3, H, W] uint8
    except Exception as e:
        raise SampleError(f"--image {str(path)!r} is not a readable image (PNG/JPEG): {e}") from e
    side = min(img.shape[-2:])
    img = resize(center_crop(img, [side, side]), [size, size], antialias=True)
    return images_to_tensor(img.permute(1, 2, 0)[None])  # [1, 3, size, size] in [-1, 1]


def run(
    ckpt_path: str,
    sampling: SamplingConfig,
    prompt: list[str] | None = None,
    prompts_file: str | None = None,
    image: str | None = None,
    mode: Literal["image", "text"] = "image",
    num_images: PositiveInt = 4,
    device: str = "auto",
    out: str = "samples",
) -> dict:
    """Sample from a checkpoint and write PNGs, ``grid.png`` and ``samples.json`` to ``out``.

    Args:
        ckpt_path: a checkpoint written by fit (a file, or the directory FSDP2 writes).
        sampling: how to sample (``SamplingConfig``).
        prompt: captions (image mode) or text prompts to continue (text mode).
        prompts_file: a text file, one prompt per line (added after ``prompt``).
        image: caption this image file instead of generating.
        mode: "image": each prompt is a caption -> ``num_images`` images; "text": continue the prompt, with an
            image wherever the model opens one.
        num_images: images per prompt.
        device: "auto" (CUDA if available), "cpu", "cuda", ...
        out: output directory.
    Returns:
        what ``samples.json`` holds: the caption, the mixed outputs, or the prompts and the grid's path.
    """
    from torchvision.utils import save_image

    from lit_transfusion.grid import labeled_grid

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module, tok, codec, image_size = load_run(ckpt_path, device)
    sampler = module.sampler()  # the model's own ids (a token baseline's incl. first_code)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if image:
        latents = codec.encode(_read_image(Path(image), image_size).to(device))
        ids = sampler.caption(latents, sampling)
        result["caption"] = tok.decode(ids[0])
    else:
        prompts = list(prompt or [])
        if prompts_file:
            prompts += [p.strip() for p in Path(prompts_file).read_text().splitlines() if p.strip()]
        if not prompts:
            raise SampleError("give --prompt TEXT (repeatable), --prompts_file FILE, or --image PATH")
        # Each prompt gets its own seed, so adding a prompt does not change the others' samples.
        seeded = [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(len(prompts))]
        if mode == "text":
            result["text"] = [
                _render_segments(sampler.generate(tok.encode(p), cfg), tok, codec, out_dir / f"mixed_{i:03d}")
                for i, (p, cfg) in enumerate(zip(prompts, seeded, strict=True))
            ]
        else:
            images = []
            for i, (p, cfg) in enumerate(zip(prompts, seeded, strict=True)):
                latents = sampler.generate_images([tok.encode(p)] * num_images, cfg)
                pixels = (codec.decode(latents) + 1) / 2  # [n, 3, H, W] in [0, 1]
                for j, img in enumerate(pixels):
                    save_image(img, out_dir / f"{i:03d}_{j}.png")
                images.append(pixels)
            save_image(labeled_grid(torch.cat(images).clamp(0, 1), prompts, num_images), out_dir / "grid.png")
            result["prompts"] = prompts
            result["grid"] = str(out_dir / "grid.png")
    (out_dir / "samples.json").write_text(json.dumps(result, indent=2))
    return result


def _render_segments(segments: list, tok, codec, stem: Path) -> str:
    """Mixed output -> text with ``<image k>`` markers; images saved as ``{stem}_k.png``."""
    from torchvision.utils import save_image

    parts = []
    for seg in segments:
        if isinstance(seg, torch.Tensor):
            path = f"{stem}_{len(parts)}.png"
            save_image((codec.decode(seg[None])[0] + 1) / 2, path)
            parts.append(f"<image {path}>")
        else:
            parts.append(tok.decode(seg))
    return " ".join(parts)


def parser() -> ArgumentParser:
    """The ``sample`` command line: :func:`run`'s arguments (help from its docstring), then every
    ``SamplingConfig`` field at its default."""
    p = ArgumentParser(prog="python -m lit_transfusion sample", description=__doc__, exit_on_error=False)
    p.add_function_arguments(run, skip={"sampling", "prompt"}, as_group=False)
    # --prompt repeats (--prompt "a red circle" --prompt "a blue square"); a list-typed option would keep the last.
    p.add_argument("--prompt", action="append", help="a caption, or a text prompt in --mode text (repeatable)")
    p.add_class_arguments(SamplingConfig, nested_key=None, as_group=True)
    return p


def main(argv: list[str]) -> None:
    """``python -m lit_transfusion sample ...``: prints what ``samples.json`` holds."""
    with one_line_errors(SampleError, ValueError, FileNotFoundError):
        ns = parser().parse_args(argv)
        sampling = SamplingConfig(**{f.name: ns[f.name] for f in dataclasses.fields(SamplingConfig)})
        result = run(ckpt_path=ns.ckpt_path, sampling=sampling, prompt=ns.prompt, prompts_file=ns.prompts_file,
                     image=ns.image, mode=ns.mode, num_images=ns.num_images, device=ns.device, out=ns.out)
    print(json.dumps(result, indent=2))
