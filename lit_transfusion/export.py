"""Weights that are safe to share: a checkpoint -> a directory that loads without unpickling anything.

    python -m lit_transfusion export --ckpt_path runs/shapes-tiny/version_0/checkpoints/last.ckpt --out model/
    python -m lit_transfusion sample --ckpt_path model/ --prompt "a blue square"

The directory holds ``model.safetensors`` (the network's weights: the EMA weights when the run averaged them,
since Lightning's ``EMAWeightAveraging`` stores those as the checkpoint's ``state_dict``), ``config.json`` (the
module's hyper-parameters and the image size), ``tokenizer.json`` and ``vae/`` (the diffusers autoencoder). A
Lightning checkpoint is a pickle, and unpickling a file from someone else can run their code; safetensors and
JSON cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FORMAT = "lit_transfusion-export/1"
WEIGHTS, CONFIG, TOKENIZER, VAE = "model.safetensors", "config.json", "tokenizer.json", "vae"


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def export(ckpt_path: str, out: str) -> Path:
    """Write the export of a checkpoint written by ``fit`` (a file, or the directory FSDP2 writes) to ``out``.

    Args:
        ckpt_path: the checkpoint.
        out: the directory to write (created; existing files of the export are replaced).
    """
    from safetensors.torch import save_file

    from lit_transfusion.module import TransfusionModule
    from lit_transfusion.sample import load_run

    module, tokenizer, codec, image_size = load_run(ckpt_path)
    if type(module) is not TransfusionModule:
        raise ValueError(f"--ckpt_path {ckpt_path!r} holds a {type(module).__name__}: export writes Transfusion "
                         "models (with their VAE); sample other models from their checkpoint")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in module.model.state_dict().items()}
    save_file(weights, out_dir / WEIGHTS, metadata={"format": FORMAT})
    hparams = json.loads(json.dumps(dict(module.hparams)))  # tuples -> lists; fails loudly on anything non-JSON
    (out_dir / CONFIG).write_text(json.dumps({"format": FORMAT, "module": hparams, "image_size": image_size},
                                             indent=2))
    tokenizer.tk.save(str(out_dir / TOKENIZER))
    if (out_dir / VAE).exists():
        shutil.rmtree(out_dir / VAE)
    codec.vae.save_pretrained(out_dir / VAE, safe_serialization=True)
    return out_dir


def load_export(path: str | Path, device: str = "cpu"):
    """(module in eval mode, tokenizer, codec, image size) from an export directory, with no pickle load."""
    from safetensors.torch import load_file

    from lit_transfusion.module import TransfusionModule
    from lit_transfusion.tokenizer import TextTokenizer
    from lit_transfusion.vae import LatentCodec

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
    hparams = config["module"]
    hparams["latent_shape"] = tuple(hparams["latent_shape"])
    hparams["empty_init"] = False  # one process, the weights loaded right below
    module = TransfusionModule(**hparams)
    module.model.load_state_dict(load_file(path / WEIGHTS, device="cpu"))
    module.to(device)
    tokenizer = TextTokenizer.from_file(path / TOKENIZER)
    codec = LatentCodec.from_dir(path / VAE).to(device)
    return module.eval(), tokenizer, codec, int(config["image_size"])


def main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    print(auto_cli(export, args=argv, as_positional=False))

