"""The prepared-files path learns like the embedded path on the same images: the shapes world exported as an
image-caption folder, prepared and streamed, against ``ShapesDataModule`` on the same renders, same model, seed
and number of steps. "Like" means: text conditioning takes hold on both (val/cond_gap clearly above 0), and
the two gaps differ by no more than the embedded path differs from itself under another seed (with a floor:
two seeds can land close by chance)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

STEPS = 600  # nano model: ~1.5 min per run on 2 CPU cores


def _parity():
    spec = importlib.util.spec_from_file_location("data_parity", ROOT / "benchmarks" / "data_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepared_files_learn_like_the_embedded_world(tmp_path):
    results = _parity().run_parity(tmp_path, steps=STEPS, every=STEPS, images=4000, shapes_seeds=(0, 1),
                                   prepared_seeds=(0,))
    final = STEPS - 1
    shapes0, shapes1 = results["shapes"][0][final], results["shapes"][1][final]
    prepared = results["prepared"][0][final]
    assert min(shapes0, prepared) > 0.015, results  # conditioning took hold on both paths
    spread = abs(shapes0 - shapes1)
    assert abs(prepared - shapes0) <= max(2 * spread, 0.015), results
