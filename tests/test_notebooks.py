"""The notebooks execute end to end (small settings, UMTAM_QUICK=1) so they cannot rot.

Executed, every cell that draws a plot must show it (an ``image/png`` output) and every
cell that prints (the results tables) must print something: a notebook that forces a
non-interactive backend, or whose ``print`` is lost, fails here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from umtam_jax import merging

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# A plot cell calls pyplot, an Axes or a Figure (`plt.plot(...)`, `ax.bar(...)`, `fig.x(...)`);
# each `plt.figure(`/`plt.subplots(` in it is one figure it must display.
_PLOTS = re.compile(r"\b(plt|ax|fig)\.\w+\(")
_FIGURES = re.compile(r"\bplt\.(figure|subplots)\(")


def _code(notebook):
    return [(i, c) for i, c in enumerate(notebook.cells) if c.cell_type == "code"]


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if o.get("output_type") == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("UMTAM_QUICK", "1")
    # A non-interactive default backend, as on a headless machine: the notebooks must
    # still show their figures (`%matplotlib inline`).
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [o for _, c in _code(notebook) for o in _outputs(c, "error")]
    assert not errors

    plot_cells = [(i, c) for i, c in _code(notebook) if _PLOTS.search(c.source)]
    assert plot_cells, f"{path.name}: no plot cell found"
    for i, cell in plot_cells:
        images = [
            o
            for o in _outputs(cell, "display_data") + _outputs(cell, "execute_result")
            if "image/png" in o.get("data", {})
        ]
        expected = max(1, len(_FIGURES.findall(cell.source)))
        assert len(images) >= expected, (
            f"{path.name} cell {i} draws {expected} figure(s) but shows {len(images)}"
        )

    for i, cell in _code(notebook):
        if "print(" in cell.source:
            text = "".join(o["text"] for o in _outputs(cell, "stream") if o["name"] == "stdout")
            assert text.strip(), f"{path.name} cell {i} prints nothing"
            if "density" in text:
                _check_density_column(path.name, i, text)


def _is_value(token):
    try:
        float(token)
    except ValueError:
        return token == "-"
    return True


def _check_density_column(name, index, table):
    """A results table gives a chosen density exactly for the methods that take one."""
    lines = table.strip().splitlines()
    header = lines[0].split()
    column = header.index("density") - len(header)  # counted from the right
    checked = 0
    for line in lines[1:]:
        cells = line.split()
        first_value = next(j for j, c in enumerate(cells) if _is_value(c))
        method = "_".join(cells[:first_value]).lower()  # "task arithmetic" -> task_arithmetic
        if method not in merging.METHODS:
            continue
        takes_density = merging.METHODS[method].param("density") is not None
        assert (cells[column] != "-") == takes_density, f"{name} cell {index}: {line!r}"
        checked += 1
    assert checked, f"{name} cell {index}: no method row in {table!r}"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2, os.listdir(Path(__file__).parent.parent / "notebooks")
