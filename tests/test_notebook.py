"""The tour notebook runs top to bottom on a real kernel, so it cannot rot."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dolly-tour.ipynb"


def test_the_tour_notebook_runs(client):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "N=8: cold" in text and text.rstrip().endswith("clean")
    assert any("image/png" in o.get("data", {}) for o in outputs), "the chart was not drawn"
