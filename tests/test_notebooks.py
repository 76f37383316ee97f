"""The notebooks in notebooks/: committed without outputs, and each one runs top to bottom.

Each notebook is executed in a fresh Jupyter kernel (nbclient, the library behind
`jupyter nbconvert --execute`) against the tiny models it builds itself; a cell that
raises, or a command that exits non-zero (the notebooks' `sh` helper raises), fails the
test. The kernel inherits this process's environment (PYTHONPATH, HF_HUB_OFFLINE), so
the notebooks run the Atlas under test. They take 20-90 s each on 2 CPU cores; the three
that train models run only with ATLAS_TEST_ALL_NOTEBOOKS=1 (the suite's time budget).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01_tokenizer",
        "02_training",
        "03_serving_rag",
        "04_evaluation",
        "05_posttraining",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    assert "widgets" not in nb.metadata


# The three that train and evaluate models (34-86 s each on 2 cores, about 160 s of the
# suite's 10 minutes) run when ATLAS_TEST_ALL_NOTEBOOKS=1; the default run keeps the two
# quick ones (about 20 s each), so every notebook's setup cell still runs in CI.
SLOW_NOTEBOOKS = {"02_training", "04_evaluation", "05_posttraining"}
ALL_NOTEBOOKS = os.environ.get("ATLAS_TEST_ALL_NOTEBOOKS") == "1"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            p,
            marks=pytest.mark.skipif(
                p.stem in SLOW_NOTEBOOKS and not ALL_NOTEBOOKS,
                reason="trains models: set ATLAS_TEST_ALL_NOTEBOOKS=1 to run it",
            ),
        )
        for p in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,  # per cell; the whole notebook takes about a minute on 2 cores
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the cell that failed
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    assert (tmp_path / "work").is_dir()  # the notebook wrote where it was told to
