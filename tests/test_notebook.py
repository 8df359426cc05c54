"""The notebook in notebooks/ runs top to bottom on a real (2-step) run."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT


@pytest.mark.slow  # starts a Jupyter kernel and samples from a run
def test_inspect_run_notebook_executes(trained_run, monkeypatch):
    monkeypatch.setenv("LIT_TRANSFUSION_RUN", str(trained_run))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    resources = {"metadata": {"path": str(ROOT / "notebooks")}}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "val/geneval/overall" in text and "model:" in text and ("PASS" in text or "fail" in text)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the grid and samples were shown
    assert (trained_run / "notebook_samples.png").is_file()
