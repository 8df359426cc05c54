"""Weights that are safe to share: a checkpoint -> a directory that loads without unpickling anything.

    python -m lit_transfusion export --ckpt_path runs/shapes-tiny/version_0/checkpoints/last.ckpt --out model/
    python -m lit_transfusion sample --ckpt_path model/ --prompt "a blue square"

The directory holds ``model.safetensors`` (the network's weights: the EMA weights when the run averaged them,
since Lightning's ``EMAWeightAveraging`` stores those as the checkpoint's ``state_dict``), ``config.json`` (the
module's class, hyper-parameters and image size), ``tokenizer.json`` and the frozen codec as a diffusers
directory: ``vae/`` (the autoencoder of a ``TransfusionModule``) or ``vq/`` (the VQ tokenizer of a
``ChameleonModule``). A Lightning checkpoint is a pickle, and unpickling a file from someone else can run their
code; safetensors and JSON cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lit_transfusion.commands.load import CONFIG, FORMAT, TOKENIZER, WEIGHTS, codecs, load_run, modules


def export(ckpt_path: str, out: str) -> Path:
    """Write the export of a checkpoint written by ``fit`` (a file, or the directory FSDP2 writes) to ``out``.

    Args:
        ckpt_path: the checkpoint (any shipped module: TransfusionModule, ChameleonModule).
        out: the directory to write (created; existing files of the export are replaced).
    """
    from safetensors.torch import save_model

    module, tokenizer, codec, image_size = load_run(ckpt_path)
    kind = next((k for k, cls in modules().items() if type(module) is cls), None)
    codec_dir = next((k for k, cls in codecs().items() if type(codec) is cls), None)
    if kind is None or codec_dir is None:
        raise ValueError(f"--ckpt_path {ckpt_path!r} holds a {type(module).__name__} with a {type(codec).__name__}: "
                         f"export writes {', '.join(c.__name__ for c in modules().values())}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_model, not save_file: it writes a tensor that two names share once (the U-Net's diffusers Downsample2D
    # keeps its conv under two names), and load_model restores both
    save_model(module.model.cpu(), str(out_dir / WEIGHTS), metadata={"format": FORMAT})
    hparams = json.loads(json.dumps(dict(module.hparams)))  # tuples -> lists; fails loudly on anything non-JSON
    (out_dir / CONFIG).write_text(json.dumps({"format": FORMAT, "module_class": kind, "module": hparams,
                                              "codec": codec_dir, "image_size": image_size}, indent=2))
    tokenizer.tk.save(str(out_dir / TOKENIZER))
    for name in codecs():  # one codec directory: an earlier export's other kind would be misleading
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
    codec.save(out_dir / codec_dir)
    return out_dir


def main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    print(auto_cli(export, args=argv, as_positional=False))

