"""The tutorial notebooks (notebooks/*.ipynb) execute top to bottom without error.

Each runs in a fresh kernel with QUICK=1 in its environment (smaller sample counts, same code paths),
with notebooks/ as the working directory, against a per-notebook wall-clock deadline (default 300 s,
override with NOTEBOOK_TIMEOUT=<seconds>). The executed copy is discarded: the committed notebooks keep
the outputs of a full (QUICK unset) run, which `test_committed_outputs` checks without executing anything.
"""

import glob
import importlib
import os
import re
import subprocess
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


# -- the prose names only what exists ------------------------------------------------------------------------
# Markdown cells (and README.md) mention project names as `alias.name` and commands as `python <file> <word>`.
# Both drift when code moves; these tests resolve every mention against the code as it is.

ALIASES = {"lr": "layer_rope", "layer_rope": "layer_rope", "kv": "kv_retrieval", "kv_retrieval": "kv_retrieval",
           "harness": "harness", "baselines": "baselines", "ex": "extrapolation", "extrapolation": "extrapolation",
           "ref": "reference_numpy", "reference_numpy": "reference_numpy", "lim": "lost_in_the_middle",
           "lost_in_the_middle": "lost_in_the_middle", "length_scan": "length_scan"}
NAME = re.compile(r"(?<![\w./])(" + "|".join(sorted(ALIASES, key=len, reverse=True)) + r")\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
COMMAND = re.compile(r"\bpython3?\s+([\w./-]+\.py)((?:\s+[^\s`|]+)*)")
FILE_SUFFIXES = ("py", "md", "json", "jsonl", "png", "ipynb", "sh", "txt")


def _markdown_sources():
    """(label, text) of every notebook's markdown cells, and of README.md."""
    out = [(f"{os.path.basename(p)} cell {i}", c.source) for p in NOTEBOOKS
           for i, c in enumerate(nbformat.read(p, as_version=4).cells) if c.cell_type == "markdown"]
    with open(os.path.join(ROOT, "README.md")) as f:
        out.append(("README.md", f.read()))
    return out


def _module(name):
    sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
    try:
        return importlib.import_module(ALIASES[name])
    finally:
        del sys.path[:2]


def _positional_choices(path):
    """The first positional argument's choices of a script's CLI (its sub-commands), from its --help;
    None if it takes no positional argument."""
    out = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, f"{path} --help failed:\n{out.stderr[-2000:]}"
    section = out.stdout.split("positional arguments:", 1)
    if len(section) == 1:
        return None
    m = re.search(r"^\s+\{([^}]*)\}", section[1], re.M)
    return set(m.group(1).split(",")) if m else set()


def test_markdown_names_resolve():
    """Every `alias.name` in the markdown (lr.scaled, kv.kv_fitness, ex.paired_differences, ...) exists."""
    missing = []
    for label, text in _markdown_sources():
        for alias, dotted in set(NAME.findall(text)):
            if dotted.split(".")[0] in FILE_SUFFIXES:
                continue  # a file name (layer_rope.py), not an attribute
            obj = _module(alias)
            for part in dotted.split("."):
                if not hasattr(obj, part):
                    missing.append(f"{label}: {alias}.{dotted}")
                    break
                obj = getattr(obj, part)
    assert not missing, "markdown names that do not exist:\n" + "\n".join(sorted(missing))


def test_markdown_commands_exist():
    """Every `python <file> <word>` in the markdown names a file that exists and, where the word is not an
    option, one of that script's sub-commands (or positional choices)."""
    bad, choices = [], {}
    for label, text in _markdown_sources():
        for path, rest in COMMAND.findall(text):
            if not os.path.isfile(os.path.join(ROOT, path)):
                bad.append(f"{label}: python {path}: no such file")
                continue
            words = rest.split()
            if not words or words[0].startswith(("-", "<")):
                continue  # options only, or a placeholder (<task>)
            if path not in choices:
                choices[path] = _positional_choices(path)
            if choices[path] is None or words[0] not in choices[path]:
                bad.append(f"{label}: python {path} {words[0]}: not one of {sorted(choices[path] or [])}")
    assert not bad, "markdown commands that do not exist:\n" + "\n".join(sorted(set(bad)))


def test_markdown_links_exist():
    """Relative links in the notebooks' markdown and README.md ([text](path)) point at files that exist."""
    bad = []
    for label, text in _markdown_sources():
        base = ROOT if label == "README.md" else NB_DIR
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(base, target.split("#")[0]))):
                bad.append(f"{label}: {target}")
    assert not bad, "links to files that do not exist:\n" + "\n".join(bad)
