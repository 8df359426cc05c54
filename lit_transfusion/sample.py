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
import importlib
import io
import json
import sys
from pathlib import Path
from typing import Literal

import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt

from lit_transfusion.data import MixedModalData
from lit_transfusion.generation import SamplingConfig
from lit_transfusion.images import images_to_tensor


class SampleError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_run(ckpt_path: str | Path, device: str = "cpu"):
    """(module in eval mode with its codec attached, tokenizer, codec, image size) from an export directory
    (``export.py``: no pickle load), or from a checkpoint written by ``fit`` and its run directory (loaded
    weights-only). The run's datamodule (a ``lit_transfusion.data.MixedModalData``) is rebuilt for its tokenizer,
    codec and image size."""
    from lit_transfusion.export import is_export, load_export
    from lit_transfusion.training import MixedModalModule

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise SampleError(f"--ckpt_path {str(ckpt_path)!r}: no such checkpoint file")
    if is_export(ckpt_path):
        return load_export(ckpt_path, device)
    config_path = ckpt_path.resolve().parent.parent / "config.yaml"
    if not config_path.is_file():
        raise SampleError(f"no config.yaml next to the checkpoint's run directory ({config_path}); "
                          "expected a checkpoint written by `python -m lit_transfusion fit`")
    config = yaml.safe_load(config_path.read_text())
    # The run's own module class: TransfusionModule, ChameleonModule, or another MixedModalModule.
    module_cls = _class(config, "model", "lit_transfusion.module.TransfusionModule", config_path)
    if not (isinstance(module_cls, type) and issubclass(module_cls, MixedModalModule)):
        raise SampleError(f"{config_path}: model.class_path {module_cls!r} is not a MixedModalModule (subclass)")
    try:
        source = _consolidated(ckpt_path) if ckpt_path.is_dir() else ckpt_path
        # weights_only: a Lightning checkpoint holds only tensors and plain containers (tested)
        module = module_cls.load_from_checkpoint(source, map_location=device, weights_only=True)
    except SampleError:
        raise
    except Exception as e:  # torch raises many kinds for a truncated / foreign file
        raise SampleError(f"--ckpt_path {str(ckpt_path)!r} is not a readable TransfusionModule checkpoint: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    init_args = dict(config["data"].get("init_args") or {})
    init_args["patch_size"] = module.hparams.patch_size
    dm: MixedModalData = _class(config, "data", None, config_path)(**init_args)
    module.attach_codec(dm.image_codec())
    return module.eval(), dm.tokenizer, module.codec, int(dm.image_size)


def _class(config: dict, key: str, default: str | None, config_path: Path) -> type:
    """The class named by ``config[key]["class_path"]`` (or ``default``) in a run's config.yaml."""
    path = (config.get(key) or {}).get("class_path") or default
    if not path:
        raise SampleError(f"{config_path}: no {key}.class_path")
    owner, _, name = path.rpartition(".")
    return getattr(importlib.import_module(owner), name)


def _consolidated(folder: Path) -> io.BytesIO:
    """A distributed checkpoint (the directory FSDP2 / ``ModelParallelStrategy`` writes) as one in-memory
    checkpoint file: every shard gathered into full tensors, Lightning's metadata (hparams) merged in."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    if not (folder / ".metadata").is_file():
        raise SampleError(f"--ckpt_path {str(folder)!r} is a directory but not a distributed checkpoint "
                          "(no .metadata file inside)")
    checkpoint = _load_distributed_checkpoint(folder)
    if "model" in checkpoint:  # the `fsdp` strategy's key; ModelParallelStrategy writes "state_dict"
        checkpoint["state_dict"] = checkpoint.pop("model")
    for key in [k for k in checkpoint if k.startswith("optimizer_")]:  # sampling needs the weights only
        del checkpoint[key]
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


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
    num_images: int = 4,
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
    """The ``sample`` command line: :func:`run`'s arguments, then every ``SamplingConfig`` field at its default."""
    p = ArgumentParser(prog="python -m lit_transfusion sample", description=__doc__, exit_on_error=True)
    p.add_argument("--ckpt_path", required=True,
                   help="a checkpoint written by fit (a file, or the directory FSDP2 writes), or an export directory")
    p.add_argument("--prompt", action="append", help="a caption, or a text prompt in --mode text (repeatable)")
    p.add_argument("--prompts_file", type=str | None, default=None, help="a text file, one prompt per line")
    p.add_argument("--image", type=str | None, default=None, help="caption this image file instead of generating")
    p.add_argument("--mode", type=Literal["image", "text"], default="image",
                   help="image: prompt = caption -> images; "
                   "text: continue the prompt, with an image wherever the model opens one")
    p.add_argument("--num_images", type=PositiveInt, default=4, help="images per prompt")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--out", default="samples", help="output directory (PNGs, grid.png, samples.json)")
    p.add_class_arguments(SamplingConfig, nested_key=None, as_group=True)
    return p


def sampling_config(ns: Namespace) -> SamplingConfig:
    """The ``SamplingConfig`` fields of a parsed namespace as the config itself (validated here)."""
    return SamplingConfig(**{f.name: ns[f.name] for f in dataclasses.fields(SamplingConfig)})


def main(argv: list[str]) -> None:
    from argparse import ArgumentError

    from lit_transfusion.cli import _one_line

    p = parser()
    p.exit_on_error = False  # a bad option: the one line below instead of the usage block
    try:
        ns = p.parse_args(argv)
    except ArgumentError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        result = run(
            ckpt_path=ns.ckpt_path, sampling=sampling_config(ns), prompt=ns.prompt, prompts_file=ns.prompts_file,
            image=ns.image, mode=ns.mode, num_images=ns.num_images, device=ns.device, out=ns.out,
        )
    except (SampleError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=2))
