"""Both Colab notebooks execute top to bottom on CPU at the test scale (any cell error fails)."""

import os

import nbclient
import nbformat
import pytest

from tests.support import REPO


@pytest.mark.parametrize("name,env", [
    ("quickstart", {"SOFTJAX_NOTEBOOK_CONFIG": "configs/tsfa.py:scale=test,rounds=2"}),
    ("sweep", {"SOFTJAX_NOTEBOOK_SCALE": "test", "SOFTJAX_NOTEBOOK_ROUNDS": "2"}),
])
@pytest.mark.slow
def test_notebook_executes(name, env, cache_dir, tmp_path, monkeypatch):
  for key, value in {**env, "SOFTJAX_NOTEBOOK_WORKDIR": str(tmp_path / "work"),
                     "SOFTJAX_CACHE_DIR": cache_dir, "JAX_PLATFORMS": "cpu"}.items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(os.path.join(REPO, "colab", f"{name}.ipynb"), as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  # The last cell displayed the plot as a PNG.
  assert "image/png" in notebook.cells[-1].outputs[-1].get("data", {})
  assert os.path.exists(tmp_path / "work")
