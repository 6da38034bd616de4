"""The Colab quick-start notebook runs top to bottom (tiny settings on CPU, RLP_NOTEBOOK_TEST=1) and prints
what it promises: the device line, finite rewards, a decoded thought and an equal restored checkpoint."""

import math
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "colab_tpu_quickstart.ipynb"


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append(o["text"])
        elif o["output_type"] in ("execute_result", "display_data"):
            out.append(o["data"].get("text/plain", ""))
    return "".join(out)


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the tagged parameters cell"


def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("RLP_NOTEBOOK_TEST", "1")          # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError with the failing cell's traceback
    out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")

    assert re.search(r"^jax \S+ \| backend cpu \| \d+ x \S", out, re.M), out
    assert "WARNING: a TPU runtime was expected" not in out
    assert re.search(r"^mesh: \{'data': \d+, 'fsdp': 1, 'tensor': 1\}", out, re.M), out
    rewards = [float(x) for x in re.findall(r"^step \d+: reward/mean=(\S+)", out, re.M)]
    assert rewards and all(math.isfinite(r) for r in rewards), out
    assert math.isfinite(float(re.search(r"final reward/mean: (\S+)", out).group(1)))
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), "no plot"
    thoughts = re.findall(r"^\.\.\..* <think> .* </think> '.*'   log p = (-?\d+\.\d+)$", out, re.M)
    assert len(thoughts) >= 2 and all(float(lp) <= 0 for lp in thoughts), out
    assert "checkpoint restored: params equal" in out, out
    assert (tmp_path / "rlp_run" / "checkpoints").is_dir()
