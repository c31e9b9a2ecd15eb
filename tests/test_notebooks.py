"""The tutorial notebooks (notebooks/*.ipynb) execute top to bottom without error.

Each runs in a fresh kernel with QUICK=1 in its environment (smaller sample counts, same code paths),
with notebooks/ as the working directory, against a per-notebook wall-clock deadline (default 300 s,
override with NOTEBOOK_TIMEOUT=<seconds>). The executed copy is discarded: the committed notebooks keep
the outputs of a full (QUICK unset) run, which `test_committed_outputs` checks without executing anything.
"""

import glob
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))
TIMEOUT = float(os.environ.get("NOTEBOOK_TIMEOUT", "300"))
MAX_BYTES = 1_500_000
IDS = [os.path.basename(p) for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("QUICK", "1")
    # The kernelspec runs `python`: make that the interpreter running the tests.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + TIMEOUT

    def remaining(cell):  # every cell gets what is left of the notebook's budget
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{os.path.basename(path)} ran past its {TIMEOUT:.0f} s budget")
        return int(left) + 1

    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout_func=remaining,
                                     resources={"metadata": {"path": NB_DIR}})
    start = time.monotonic()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{os.path.basename(path)}: a cell raised\n{e}")
    except TimeoutError as e:  # nbclient raises a TimeoutError subclass when a cell runs out of time
        pytest.fail(f"{os.path.basename(path)} ran past its {TIMEOUT:.0f} s budget: {e}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{os.path.basename(path)}: error outputs {[(o.ename, o.evalue) for o in errors]}"
    print(f"{os.path.basename(path)}: {time.monotonic() - start:.1f} s with QUICK=1")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_outputs(path):
    """Committed notebooks carry the outputs of a full run: every code cell ran in order, none failed,
    none ran with QUICK=1, at least one plot is embedded, and the file stays small enough for GitHub."""
    assert os.path.getsize(path) < MAX_BYTES, f"{os.path.basename(path)} is over {MAX_BYTES} bytes"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), "some code cells were never executed"
    assert counts == list(range(1, len(code) + 1)), f"cells were not executed once, top to bottom: {counts}"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], "an output is an error"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "QUICK = False" in text and "QUICK = True" not in text, "outputs are not from a full (QUICK unset) run"
    assert any("image/png" in o.get("data", {}) for o in outputs), "no embedded PNG plot"
