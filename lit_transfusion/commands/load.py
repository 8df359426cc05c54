"""Loading what ``fit`` and ``export`` wrote: a module with its codec attached, its tokenizer and image size.

``load_run`` reads a checkpoint written by ``fit`` (weights only) and rebuilds the run's datamodule from the run's
``config.yaml`` (cheap: no images) for its tokenizer and codec; ``load_export`` reads an export directory (safetensors
and JSON: no pickle). ``sample`` and ``export`` load through here.
"""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import torch
import yaml

from lit_transfusion.data import MixedModalData

FORMAT = "lit_transfusion-export/2"
READABLE = ("lit_transfusion-export/1", FORMAT)  # /1: Transfusion only, codec in vae/
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
VAE = "vae"  # the codec's directory in format /1


def modules() -> dict[str, type]:
    """The module classes an export may name (by key, never by import path: loading an export runs no code that
    the export chose)."""
    from lit_transfusion.chameleon import ChameleonModule
    from lit_transfusion.module import TransfusionModule

    return {"transfusion": TransfusionModule, "chameleon": ChameleonModule}


def codecs() -> dict[str, type]:
    """The codec classes an export may hold, by the name of their directory."""
    from lit_transfusion.vae import LatentCodec
    from lit_transfusion.vq import CodeCodec

    return {"vae": LatentCodec, "vq": CodeCodec}


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


class SampleError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_run(ckpt_path: str | Path, device: str = "cpu"):
    """(module in eval mode with its codec attached, tokenizer, codec, image size) from an export directory
    (``export.py``: no pickle load), or from a checkpoint written by ``fit`` and its run directory (loaded
    weights-only). The run's datamodule (a ``lit_transfusion.data.MixedModalData``) is rebuilt for its tokenizer,
    codec and image size."""
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


def load_export(path: str | Path, device: str = "cpu"):
    """(module in eval mode with its codec attached, tokenizer, codec, image size) from an export directory, with
    no pickle load."""
    from safetensors.torch import load_model

    from lit_transfusion.tokenizer import TextTokenizer

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") not in READABLE:
        raise ValueError(f"{path / CONFIG}: format {config.get('format')!r}, expected one of {READABLE}")
    kind, codec_dir = config.get("module_class", "transfusion"), config.get("codec", VAE)
    if kind not in modules() or codec_dir not in codecs():
        raise ValueError(f"{path / CONFIG}: module_class {kind!r} / codec {codec_dir!r}: expected one of "
                         f"{sorted(modules())} / {sorted(codecs())}")
    hparams = config["module"]
    hparams["latent_shape"] = tuple(hparams["latent_shape"])
    hparams["empty_init"] = False  # one process, the weights loaded right below
    module = modules()[kind](**hparams)
    load_model(module.model, path / WEIGHTS, device="cpu")  # strict; names sharing one tensor are filled in
    module.to(device)
    module.attach_codec(codecs()[codec_dir].from_dir(path / codec_dir))
    tokenizer = TextTokenizer.from_file(path / TOKENIZER)
    return module.eval(), tokenizer, module.codec, int(config["image_size"])
