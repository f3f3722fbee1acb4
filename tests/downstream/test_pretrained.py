"""Loading an encoder: parameters only, through the factory pretraining uses."""

import os

import jax
import numpy as np

from roi_mae_jax.devices import sharding
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.training import checkpoint as checkpoint_lib
from roi_mae_jax.training import train_step


def _full_state(workdir):
  config = pretrained_lib.read_config(workdir)
  config.mesh = sharding.mesh_config(data=1, fsdp=1, tensor=1)
  setup = train_step.TrainSetup.from_config(
      config, sharding.mesh_from_config(config.mesh, jax.devices()[:1]))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    state, _ = ckpt.restore(setup.abstract_state)
  finally:
    ckpt.close()
  return setup, state


def _equal(a, b, atol=0.0):
  """Same tree of arrays; `atol` for jitted against eager initialisation (fusion rounding)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)
                                    for x, y in zip(la, lb))


def test_load_reads_parameters_and_step_only(pretrained_dir, monkeypatch):
  asked = []
  restore = checkpoint_lib.Checkpointer.restore

  def spy(self, abstract_state, *args, **kwargs):
    asked.append((sorted(abstract_state), kwargs.get("partial")))
    return restore(self, abstract_state, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore", spy)
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  assert asked == [(["params", "step"], True)]  # no optimizer state, no rng
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore", restore)
  setup, state = _full_state(str(pretrained_dir))
  assert pre.step == int(state["step"]) == 6
  assert _equal(pre.params, state["params"])
  # The initial encoder is the run's own step 0, built by the same factory.
  assert _equal(pretrained_lib.random_init(pre).params, setup.init()["params"], atol=1e-6)
  assert not _equal(pretrained_lib.random_init(pre).params, pre.params, atol=1e-6)
