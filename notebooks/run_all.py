"""Execute the notebooks in place, so the outputs committed beside their code are real results.

`make notebooks` runs this. Each notebook runs in a fresh kernel in its own temporary directory
(nothing is written beside the notebooks but the notebooks), and is written back only if no cell
failed: a notebook that errors keeps its last good outputs and the command exits non-zero.
`tests/integration/test_notebooks.py` runs the same notebooks in CI and checks the committed
outputs carry their plots.

    python notebooks/run_all.py                 # all four
    python notebooks/run_all.py endpoints.ipynb  # one
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ("quickstart.ipynb", "endpoints.ipynb", "batch_job.ipynb", "realtime_parity.ipynb")


def execute(path: pathlib.Path, timeout_s: int = 900) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a fresh ``python3`` kernel; return the notebook with its outputs."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="aiq-nb-") as cwd:
        NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    return nb


def main(argv: list[str]) -> int:
    names = argv or list(NOTEBOOKS)
    failed = []
    for name in names:
        path = HERE / name
        print(f"running {name} ...", flush=True)
        try:
            nb = execute(path)
        except CellExecutionError as e:
            failed.append(name)
            print(f"{name} failed; its committed outputs are left as they were:\n{e}", file=sys.stderr)
            continue
        nbformat.write(nb, path)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
