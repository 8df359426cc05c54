"""``python -m lit_transfusion sample``: images, text and captions from a trained checkpoint.

    python -m lit_transfusion sample --ckpt_path runs/shapes-tiny/version_0/checkpoints/last.ckpt \\
        --prompt "a red circle left of a blue square" --num_images 4 --guidance_scale 3 --steps 50 \\
        --scheduler ddim --out samples/
    python -m lit_transfusion sample --ckpt_path ... --image scene.png          # captioning
    python -m lit_transfusion sample --ckpt_path ... --prompt "there are" --mode text

The run directory (``<run>/config.yaml`` written by ``fit``, two levels above the checkpoint) says which
datamodule made the data; it is rebuilt (cheap: no images) to recover the tokenizer and the VAE.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import sys
from pathlib import Path

import torch
import yaml

from lit_transfusion.diffusion import SAMPLERS
from lit_transfusion.generation import SamplingConfig, TransfusionSampler


class SampleError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_run(ckpt_path: str | Path, device: str = "cpu"):
    """(module, tokenizer, codec) from a checkpoint and its run directory."""
    from lit_transfusion.module import TransfusionModule
    from lit_transfusion.vae import LatentCodec

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise SampleError(f"--ckpt_path {str(ckpt_path)!r}: no such checkpoint file")
    config_path = ckpt_path.resolve().parent.parent / "config.yaml"
    if not config_path.is_file():
        raise SampleError(f"no config.yaml next to the checkpoint's run directory ({config_path}); "
                          "expected a checkpoint written by `python -m lit_transfusion fit`")
    try:
        source = _consolidated(ckpt_path) if ckpt_path.is_dir() else ckpt_path
        module = TransfusionModule.load_from_checkpoint(source, map_location=device, weights_only=False)
    except SampleError:
        raise
    except Exception as e:  # torch raises many kinds for a truncated / foreign file
        raise SampleError(f"--ckpt_path {str(ckpt_path)!r} is not a readable TransfusionModule checkpoint: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    data_cfg = yaml.safe_load(config_path.read_text())["data"]
    module_name, _, cls_name = data_cfg["class_path"].rpartition(".")
    init_args = dict(data_cfg.get("init_args") or {})
    init_args["patch_size"] = module.hparams.patch_size
    dm = getattr(importlib.import_module(module_name), cls_name)(**init_args)
    codec = LatentCodec.from_dir(dm.hparams.vae_path).to(device)
    return module.eval(), dm.tokenizer, codec, dm.hparams.image_size


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
    return img[None].float() / 127.5 - 1


def run(args: argparse.Namespace) -> dict:
    from torchvision.utils import make_grid, save_image

    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval), seed=args.seed,
    )
    module, tok, codec, image_size = load_run(args.ckpt_path, args.device)
    sampler = TransfusionSampler(module.model, module.diffusion, tok.special)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.image:
        latents = codec.encode(_read_image(Path(args.image), image_size).to(args.device))
        ids = sampler.caption(latents, cfg)
        result["caption"] = tok.decode(ids[0])
    else:
        prompts = list(args.prompt or [])
        if args.prompts_file:
            prompts += [p.strip() for p in Path(args.prompts_file).read_text().splitlines() if p.strip()]
        if not prompts:
            raise SampleError("give --prompt TEXT (repeatable), --prompts_file FILE, or --image PATH")
        if args.mode == "text":
            result["text"] = []
            for i, p in enumerate(prompts):
                segments = sampler.generate(tok.encode(p), SamplingConfig(**{**vars(cfg), "seed": cfg.seed + i}))
                result["text"].append(_render_segments(segments, tok, codec, out / f"mixed_{i:03d}"))
        else:
            images = []
            for i, p in enumerate(prompts):
                ids = [tok.encode(p)] * args.num_images
                latents = sampler.generate_images(ids, SamplingConfig(**{**vars(cfg), "seed": cfg.seed + i}))
                pixels = (codec.decode(latents) + 1) / 2  # [n, 3, H, W] in [0, 1]
                for j, img in enumerate(pixels):
                    save_image(img, out / f"{i:03d}_{j}.png")
                images.append(pixels)
            grid = make_grid(torch.cat(images), nrow=args.num_images, padding=1)
            save_image(grid, out / "grid.png")
            result["prompts"] = prompts
            result["grid"] = str(out / "grid.png")
    (out / "samples.json").write_text(json.dumps(result, indent=2))
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lit_transfusion sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", "--ckpt-path", required=True,
                   help="a checkpoint written by fit (a file, or the directory FSDP2 writes)")
    p.add_argument("--prompt", action="append", help="a caption (repeat for several)")
    p.add_argument("--prompts_file", "--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--image", help="caption this image file instead of generating")
    p.add_argument("--mode", choices=["image", "text"], default="image",
                   help="image: prompt = caption -> images; text: continue the prompt, images where the model opens one")
    p.add_argument("--num_images", "--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--guidance_scale", "--guidance-scale", type=float, default=3.0)
    p.add_argument("--guidance_interval", "--guidance-interval", type=int, nargs=2, default=[0, 1000],
                   metavar=("LO", "HI"), help="guide only the steps with LO <= t < HI (default: all)")
    p.add_argument("--steps", type=int, default=250, help="denoising steps (paper: 250)")
    p.add_argument("--scheduler", default="ddpm", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", "--top-k", type=int, default=0)
    p.add_argument("--top_p", "--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples", help="output directory (PNGs, grid.png, samples.json)")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    try:
        result = run(args)
    except (SampleError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=2))
