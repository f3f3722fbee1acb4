"""The Colab notebook runs headless, top to bottom, on a demo checkpoint it makes itself;
its install cell refuses to guess where the package comes from."""

import os
import subprocess
import sys

import nbclient
import nbformat
import pytest

from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "probe_from_checkpoint.ipynb")


def _text(cell) -> str:
  parts = []
  for output in cell.get("outputs", []):
    parts.append(output.get("text", ""))
    parts.append(output.get("data", {}).get("text/markdown", ""))
  return "".join(parts)


@pytest.mark.slow
def test_notebook_makes_a_demo_checkpoint_probes_and_ranks_regions(tmp_path, monkeypatch):
  monkeypatch.delenv("ROI_MAE_CHECKPOINT", raising=False)  # the notebook pretrains a demo
  monkeypatch.setenv("ROI_MAE_DEMO_STEPS", "6")
  monkeypatch.setenv("ROI_MAE_SUBJECTS", "24")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel inherits the suite's compilation cache (conftest.py sets it in the
  # environment), so the demo's programs compile once per machine.
  # The kernel runs in tmp_path: import this checkout, not another installed copy.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get(
      "PYTHONPATH")])))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell, if any cell fails
  text = "\n".join(_text(c) for c in notebook.cells if c.cell_type == "code")
  assert "roi_mae_jax is importable; nothing to install" in text
  assert "no checkpoint given: pretraining a 6-step demo" in text
  assert (tmp_path / "demo_checkpoint" / "checkpoints").is_dir()
  assert "step 6, model tiny" in text
  assert "| encoder | kfold |" in text and "| region_stats | loso |" in text
  for readout in ("encoder@1", "recon", "init@1", "init_recon"):  # read-outs and twins
    assert f"| {readout} | kfold |" in text
  assert "completeness:" in text and "contrast" in text
  assert (tmp_path / "region_ranking.png").stat().st_size > 10_000


def _install_cell(package):
  """The first code cell run where roi_mae_jax is not importable (no site-packages)."""
  source = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells
                if c.cell_type == "code").source
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROI_MAE_PACKAGE")}
  if package is not None:
    env["ROI_MAE_PACKAGE"] = package
  return subprocess.run([sys.executable, "-S", "-c", source], capture_output=True, text=True,
                        env=env, cwd="/", timeout=60)


@pytest.mark.parametrize("package,message", [
    (None, "roi_mae_jax is not installed: set PACKAGE"),
    ("roi_mae_jax", "is neither a URL nor an existing wheel or folder")])
def test_install_cell_needs_a_source_and_refuses_a_bare_name(package, message):
  done = _install_cell(package)
  assert done.returncode != 0 and message in done.stderr, done.stderr
  assert "pip" not in done.stdout
