"""The numbers a refactor must not change: each main config's losses and gradient norm on a fixed seed, batch and
initialisation equal the committed ``results/fixed_seed_losses.json`` (written by
``python benchmarks/fixed_seed_losses.py --out results/fixed_seed_losses.json``)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT


def test_fixed_seed_losses_are_unchanged():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fixed_seed_losses", ROOT / "benchmarks" / "fixed_seed_losses.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    expected = json.loads((ROOT / "results" / "fixed_seed_losses.json").read_text())
    got = script.main()
    assert got.keys() == expected.keys()
    for config, values in expected.items():
        for key, value in values.items():
            # fp32 kernels differ between CPU classes in the last bits; a changed computation moves far more
            assert got[config][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (config, key)
