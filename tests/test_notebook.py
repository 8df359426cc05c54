"""The notebook in notebooks/ runs top to bottom on a real (2-step) run."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT


def execute(name: str) -> tuple[list, str]:
    """Run ``notebooks/<name>`` in a fresh kernel; returns its code cells' outputs and their stream text
    (failing the test if any cell raised)."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    resources = {"metadata": {"path": str(ROOT / "notebooks")}}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs, "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.slow  # starts a Jupyter kernel and samples from a run
def test_inspect_run_notebook_executes(trained_run, monkeypatch):
    monkeypatch.setenv("LIT_TRANSFUSION_RUN", str(trained_run))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outputs, text = execute("inspect_run.ipynb")
    assert "val/geneval/overall" in text and "model:" in text and ("PASS" in text or "fail" in text)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the grid and samples were shown
    assert (trained_run / "notebook_samples.png").is_file()


@pytest.mark.slow  # runs the tiny sweep (about 2 minutes) unless tests/test_sweep.py already did
def test_sweep_results_notebook_executes(tmp_path_factory, monkeypatch):
    from tests.test_sweep import tiny_sweep

    _, sweep_dir, _ = tiny_sweep(tmp_path_factory)
    monkeypatch.setenv("LIT_TRANSFUSION_SWEEP", str(sweep_dir / "results.csv"))
    outputs, text = execute("sweep_results.ipynb")
    assert "sweep tiny_test: 6 runs (4 finished)" in text
    assert "lambda1-seed0" in text and "broken-seed1" in text and "failed" in text
    assert "val/loss             lambda5" in text  # a bar per variant and metric, with its mean ± std
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # metric vs FLOPs, final values
