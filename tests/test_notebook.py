"""The tour notebook runs top to bottom on a real kernel, so it cannot rot: from any folder, and
without matplotlib (a text chart instead of the figure)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dolly-tour.ipynb"
# Run first in the kernel: `import matplotlib` then raises ImportError, as where it is not installed.
NO_MATPLOTLIB = "import sys\nsys.modules['matplotlib'] = None\nsys.modules['matplotlib.pyplot'] = None"


@pytest.mark.parametrize("matplotlib", [True, False], ids=["with-matplotlib", "without-matplotlib"])
def test_the_tour_notebook_runs(client, tmp_path, matplotlib):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    if not matplotlib:
        nb.cells.insert(0, nbformat.v4.new_code_cell(NO_MATPLOTLIB))
    # Its kernel's working folder is an empty one, not notebooks/: it must find what it needs itself.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "N=8: cold" in text and text.rstrip().endswith("clean")
    charts = [o for o in outputs if "image/png" in o.get("data", {})]
    if matplotlib:
        assert charts, "the chart was not drawn"
    else:
        assert not charts and "N=8 clone " in text, "the text chart was not printed"
    assert list(tmp_path.iterdir()) == []
