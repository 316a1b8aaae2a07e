"""The Colab notebooks: stored without outputs, linked from the README, and run top to bottom.

Each notebook runs in a fresh Jupyter kernel (nbclient) with ``QUICK=1``, which shrinks its
training runs to seconds; the notebooks assert their own properties (1 vs 8 device parity
of the prototyped loss, its order against CLIP's, confusion-matrix totals), so a failing
assertion fails the test.
"""

import base64
import os
import re

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient)")
pytest.importorskip("ipykernel", reason="pip install -e '.[test]' (ipykernel)")
pytest.importorskip("matplotlib", reason="pip install -e '.[test]' (matplotlib)")

NOTEBOOKS = REPO / "notebooks"
REPOSITORY = "https://github.com/contrastive-jax/contrastive_jax"
COLAB = "https://colab.research.google.com/github/contrastive-jax/contrastive_jax/blob/main/"
# Lines each notebook must print: evidence that its cells did what they say.
EXPECTED = {
    "prototype_a_loss.ipynb": [r"values and gradients agree",
                               r"d/dx: max \|difference\| = ",
                               r"'tau': 1\.0, 'uniformity'",
                               r"decoupled_clip: zero-shot acc1 [01]\.\d+",
                               r"clip: zero-shot acc1 [01]\.\d+"],
    "zero_shot.ipynb": [r"restored step 60 from ",
                        r"64 classes; templates: \['a red circle'",
                        r"zero-shot top-1 accuracy on \d+ test images: [01]\.\d+"],
}
# Plots each notebook draws (one PNG per figure).
FIGURES = {"prototype_a_loss.ipynb": 3, "zero_shot.ipynb": 3}


def _notebooks():
  return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_is_tested_and_linked_from_the_readme():
  assert _notebooks() == sorted(EXPECTED)
  readme = (REPO / "README.md").read_text()
  for name in _notebooks():
    badge = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"({COLAB}notebooks/{name})")
    assert badge in readme, name
    assert badge in (NOTEBOOKS / name).read_text(), name
  assert f'Repository = "{REPOSITORY}"' in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_top_to_bottom(name, monkeypatch, tmp_path):
  monkeypatch.setenv("QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.delenv("CHECKPOINT_DIR", raising=False)
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' training workdirs
  before = sorted(os.listdir(NOTEBOOKS))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

  text, figures = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        text.append(out.text)
      elif "image/png" in out.get("data", {}):
        assert base64.b64decode(out.data["image/png"])[:4] == b"\x89PNG"
        figures += 1
  text = "".join(text)
  for pattern in EXPECTED[name]:
    assert re.search(pattern, text), (pattern, text[-3000:])
  assert figures == FIGURES[name], figures
  assert sorted(os.listdir(NOTEBOOKS)) == before, "the notebook wrote into notebooks/"
  assert os.listdir(tmp_path)  # the runs used the temporary directory
