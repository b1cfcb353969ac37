"""The Colab notebooks: each ``.py`` runs top to bottom (tiny settings), and its paired
``.ipynb`` holds the same cells (fix a mismatch with ``jupytext --sync notebooks/NAME.py``)."""

import json
import os
import re
import subprocess
import sys

import jupytext
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("quickstart",)


def _cells(notebook) -> list[tuple[str, str, list]]:
  return [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in notebook.cells]


def test_every_notebook_is_listed():
  found = sorted(n[:-3] for n in os.listdir(NOTEBOOKS) if n.endswith(".py"))
  assert found == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_and_py_hold_the_same_cells(name):
  py = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.py"))
  nb = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"))
  want, got = _cells(py), _cells(nb)
  fix = f"run: jupytext --sync notebooks/{name}.py"
  for i, (w, g) in enumerate(zip(want, got)):
    assert g == w, f"cell {i} differs between {name}.py and {name}.ipynb ({fix}):\n{w}\n---\n{g}"
  assert len(got) == len(want), f"{name}.ipynb has {len(got)} cells, {name}.py {len(want)} ({fix})"
  for i, c in enumerate(nb.cells):  # outputs belong to a Colab session, not to the repository
    if c.cell_type == "code":
      assert not c.get("outputs") and c.get("execution_count") is None, f"cell {i} has outputs"


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path):
  steps = 3
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "MPLBACKEND": "Agg",
      "QUICKSTART_STEPS": str(steps),
      "QUICKSTART_ROOT": str(tmp_path),
  }
  proc = subprocess.run(
      [sys.executable, os.path.join(NOTEBOOKS, "quickstart.py")],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The answer to the held-out question, then the two free questions (few steps: any text).
  assert re.search(r"^Q: .+\nA: .*\(ground truth: \w+\)$", proc.stdout, re.M), proc.stdout[-2000:]
  assert len(re.findall(r"^A: ", proc.stdout, re.M)) == 3, proc.stdout[-2000:]
  assert re.search(
      r"^held-out VQA exact match at stage-2 step 3: \d+\.\d% of 600 questions$", proc.stdout, re.M
  ), proc.stdout[-2000:]
  for stage in ("stage1", "stage2"):
    with open(tmp_path / stage / "metrics.jsonl") as f:
      rows = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), stage
    assert all(0 < r["loss"] < 20 for r in rows), rows
    assert f"{stage} loss by step: 1: " in proc.stdout
