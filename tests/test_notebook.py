"""The Colab notebook runs headless, top to bottom, on a tiny checkpoint."""

import os

import nbclient
import nbformat

from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "probe_from_checkpoint.ipynb")


def _text(cell) -> str:
  parts = []
  for output in cell.get("outputs", []):
    parts.append(output.get("text", ""))
    parts.append(output.get("data", {}).get("text/markdown", ""))
  return "".join(parts)


def test_notebook_probes_and_ranks_regions(pretrained_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("ROI_MAE_CHECKPOINT", str(pretrained_dir))
  monkeypatch.setenv("ROI_MAE_SUBJECTS", "24")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel runs in tmp_path: import this checkout, not another installed copy.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get(
      "PYTHONPATH")])))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell, if any cell fails
  text = "\n".join(_text(c) for c in notebook.cells if c.cell_type == "code")
  assert "step 6, model tiny" in text
  assert "| encoder | kfold |" in text and "| region_stats | loso |" in text
  assert "completeness:" in text and "contrast" in text
  assert (tmp_path / "region_ranking.png").stat().st_size > 10_000
