"""The notebooks run top to bottom (they assert their own results), and the outputs committed with
them are real results: executed, free of errors, each with at least one inline PNG plot.
`make notebooks` (notebooks/run_all.py) regenerates the committed outputs."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["quickstart.ipynb", "endpoints.ipynb", "batch_job.ipynb", "realtime_parity.ipynb"]


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert errors == []
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb)), f"{name} drew no inline PNG plot"


@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs_are_executed_with_plots(name):
    """What a reader sees on a code host: every code cell ran (in order), none failed, and at least
    one matplotlib figure is embedded as PNG."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{name} has cells that were never run: run `make notebooks` and commit"
    assert counts == sorted(counts), f"{name} was run out of order: run `make notebooks` and commit"
    assert not [o for o in _outputs(nb) if o.get("output_type") == "error"], f"{name} carries an error output"
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb)), f"{name} has no PNG plot in its outputs"
