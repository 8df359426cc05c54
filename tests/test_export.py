"""`export` writes safetensors + JSON; `sample` runs from it without a single pickle load."""

from __future__ import annotations

import pickle

import torch

from lit_transfusion.commands.export import export
from lit_transfusion.commands.load import is_export, load_run
from lit_transfusion.commands.sample import run
from lit_transfusion.generation import SamplingConfig


def test_sample_runs_from_the_export_without_unpickling(trained_run, tmp_path, monkeypatch):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = export(str(ckpt), str(tmp_path / "export"))
    assert is_export(out) and {p.name for p in out.iterdir()} == {"model.safetensors", "config.json",
                                                                   "tokenizer.json", "vae"}
    reference = torch.load(ckpt, weights_only=True)["state_dict"]

    def refuse(*args, **kwargs):
        raise AssertionError("an export must load without unpickling")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    module, tokenizer, codec, image_size = load_run(out)
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, reference[f"model.{name}"]), name
    assert image_size == 32 and tokenizer.special.boi == module.special["boi"]
    result = run(str(out), SamplingConfig(steps=2, scheduler="ddim"), prompt=["a red circle"], num_images=2,
                 out=str(tmp_path / "samples"))
    assert (tmp_path / "samples" / "grid.png").is_file() and result["prompts"] == ["a red circle"]
