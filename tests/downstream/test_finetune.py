"""Fine-tuning: frozen keeps the encoder, full changes it; splits, metrics, checkpoint."""

import json

import jax
import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import tasks
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.training import checkpoint as checkpoint_lib


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_finetune_trains_the_right_parameters(pretrained_dir, tmp_path, mode):
  config = load_config("finetune", "test")
  config.update(checkpoint=str(pretrained_dir), mode=mode, schemes="kfold")
  tasks.run_task(config, str(tmp_path))
  results = json.loads((tmp_path / "finetune_results.json").read_text())
  assert results["kfold"]["roc_auc"]["n"] == 3 and results["meta"]["subjects"] == 24
  assert f"| {mode} (region_std) | kfold |" in (tmp_path / "finetune_table.md").read_text()
  meta = json.loads((tmp_path / "classifier.json").read_text())
  assert meta["pool"] == "region_std" and len(meta["calibration"]) == 2
  dim = meta["features"]
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "classifier"), async_save=False)
  assert ckpt.latest_step() == config.steps
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  abstract = {"params": {
      "encoder": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pre.params),
      "head": {"weight": jax.ShapeDtypeStruct((dim,), np.float32),
               "bias": jax.ShapeDtypeStruct((), np.float32)},
      "norm": {"mean": jax.ShapeDtypeStruct((dim,), np.float32),
               "scale": jax.ShapeDtypeStruct((dim,), np.float32)}}}
  state, _ = ckpt.restore(abstract)
  ckpt.close()
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(state["params"]["encoder"]), jax.tree.leaves(pre.params)))
  assert (moved == 0.0) == (mode == "frozen"), moved
  if mode == "full":  # the saved classifier is what attribute explains
    attribute = load_config("attribute", "test")
    attribute.update(checkpoint=str(pretrained_dir), classifier=str(tmp_path),
                     reconstruction_windows=0, max_windows=3, ig_steps=8)
    attribute.data.synthetic_subjects = 24
    tasks.run_task(attribute, str(tmp_path / "attribution"))
    summary = json.loads((tmp_path / "attribution" / "attribution_summary.json").read_text())
    assert summary["classifier"]["kind"] == "fine-tuned" and summary["subjects"] == 24
    assert summary["completeness"]["relative_median"] < 0.05
