"""Pretraining: overfitting, sharded == single device, exact resume after SIGKILL,
checkpoints, non-finite losses, and the files a run leaves behind."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config
from roi_mae_jax import errors
from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax import tasks
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import synthetic
from roi_mae_jax.devices import sharding
from roi_mae_jax.training import checkpoint as checkpoint_lib
from roi_mae_jax.training import train_step


def _setup(config, devices):
  mesh = sharding.mesh_from_config(config.mesh, devices)
  return train_step.TrainSetup.from_config(config, mesh), mesh


def _fixed_batch(config, size, seed=0):
  data = synthetic.SyntheticFMRI.from_config(config, multiple_of=config.patches.size)
  source = pipeline.SyntheticWindows(data, config.frames)
  rng = np.random.default_rng(seed)
  return np.stack([source.draw(i, rng)["windows"] for i in range(size)])


def test_tiny_model_overfits_one_fixed_batch():
  config = load_config("pretrain_aal3", "test")
  config.batch_size = 2
  config.model.pos_embedding = "learned"
  config.optim.update(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0)
  config.total_steps = 1000
  setup, mesh = _setup(config, jax.devices()[:1])
  batch = sharding.global_batch({"windows": _fixed_batch(config, 2)}, mesh)
  state, losses = setup.init(), []
  for _ in range(100):
    state["step"] = jnp.zeros_like(state["step"])  # same masks every step
    state, metrics = setup.step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.1 * losses[0], losses[::10]


@pytest.mark.slow
def test_compiled_step_equals_jitted_step_and_init_repeats():
  """setup.compile (ahead of time; jit's traces and init's executable let go)
  runs the same step as setup.step, and init still builds the same state after it."""
  config = load_config("pretrain_aal3", "test")
  setup, mesh = _setup(config, jax.devices()[:1])
  batch = sharding.global_batch({"windows": _fixed_batch(config, config.batch_size)}, mesh)
  first = setup.init()
  compiled, facts = setup.compile(first, batch)
  second = setup.init()
  def values(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(values(a), values(b))
  assert facts["flops"] > 0 and facts["memory"].temp_size_in_bytes > 0
  _, want = setup.step(first, batch)
  _, got = compiled(second, batch)
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)


@pytest.mark.slow
def test_sharded_step_matches_single_device():
  config = load_config("pretrain_aal3", "test")
  config.model.size = "tiny"  # 2 heads: tensor axis 2 splits them
  windows = _fixed_batch(config, config.batch_size)
  params = {}
  for name, devices, axes in (("single", jax.devices()[:1], (1, 1, 1)),
                              ("sharded", jax.devices()[:8], (2, 2, 2))):
    config.mesh.update(data=axes[0], fsdp=axes[1], tensor=axes[2])
    setup, mesh = _setup(config, devices)
    state = setup.init()
    batch = sharding.global_batch({"windows": windows}, mesh)
    losses = []
    for _ in range(3):
      state, metrics = setup.step(state, batch)
      losses.append(float(metrics["loss"]))
    if name == "sharded":
      kernel = state["params"]["encoder"]["blocks"][0]["up"]["kernel"]
      assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
      assert len(kernel.addressable_shards) == 8
    params[name] = (jax.device_get(state["params"]), losses)
  np.testing.assert_allclose(params["single"][1], params["sharded"][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params["single"][0]), jax.tree.leaves(params["sharded"][0])):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def _run_cli(workdir, *overrides):
  cmd = [sys.executable, "-m", "roi_mae_jax.main", "--config=configs/pretrain_aal3.py:test",
         f"--workdir={workdir}", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _final_params(workdir):
  config = load_config("pretrain_aal3", "test")
  setup, _ = _setup(config, jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, _ = ckpt.restore(setup.abstract_state)
  data_state = ckpt.data_state(ckpt.latest_step())
  ckpt.close()
  return jax.device_get(state), data_state


@pytest.mark.slow
def test_sigkill_then_restart_reaches_the_same_parameters(tmp_path, prepared_dir):
  # On prepared ADHD-200-layout files, several windows per scan; the synthetic
  # source is killed and resumed in tests/devices/test_distributed.py (two processes).
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  source = [f"--config.data.shards={prepared_dir}", "--config.data.windows_per_subject=3"]
  done = _run_cli(straight, "--config.log_every=1", *source)
  assert done.returncode == 0, done.stderr[-2000:]
  crashed = _run_cli(killed, "--config.fault_kill_after_step=3", "--config.checkpoint_every=1",
                     "--config.log_every=1", *source)
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
  assert not (killed / "loss_curve.png").exists()
  assert checkpoint_lib.Checkpointer(str(killed / "checkpoints")).latest_step() == 3
  resumed = _run_cli(killed, "--config.checkpoint_every=1", "--config.log_every=1", *source)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stderr
  a, data_a = _final_params(straight)
  b, data_b = _final_params(killed)
  assert int(a["step"]) == int(b["step"]) == 6
  assert data_a == data_b and data_a is not None
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-7)
  # One line per step, none duplicated by the replay after the crash.
  records = {w: metrics_lib.read_metrics(str(w)) for w in (straight, killed)}
  assert [r["step"] for r in records[killed]] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([r["loss"] for r in records[straight]],
                             [r["loss"] for r in records[killed]], rtol=1e-6)
  for name in ("loss_curve.png", "reconstruction.png", "pretrain_summary.json", "config.json"):
    assert (killed / name).stat().st_size > 0
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(killed / "tensorboard"))


def test_checkpoints_round_trip_rng_keys_and_skip_cut_off_saves(tmp_path):
  mesh = sharding.mesh_from_config(sharding.mesh_config(data=2, fsdp=2, tensor=2))
  repl = sharding.replicated(mesh)
  key = jax.device_put(jax.random.fold_in(jax.random.key(42), 7), repl)
  state = {"rng": key, "w": jax.device_put(jnp.arange(16.0).reshape(4, 4),
                                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
  numbers = grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset()
  iterator = iter(numbers)
  for step in (1, 2, 3):
    next(iterator)
    ckpt.save(step, state, data_iterator=iterator)
  ckpt.wait()
  expected = [next(iterator) for _ in range(3)]
  assert ckpt.all_steps() == [2, 3]  # keep=2
  # A save cut off mid-write leaves only a temporary folder: never listed.
  shutil.copytree(tmp_path / "3", tmp_path / "4.orbax-checkpoint-tmp-99")
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
  assert ckpt.latest_step() == 3
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  fresh = iter(numbers)
  restored, resumed_data = ckpt.restore(abstract, data_iterator=fresh)
  ckpt.close()
  assert resumed_data and [next(fresh) for _ in range(3)] == expected
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(key))
  np.testing.assert_array_equal(jax.random.uniform(jax.random.fold_in(restored["rng"], 3), (4,)),
                                jax.random.uniform(jax.random.fold_in(key, 3), (4,)))
  assert restored["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")


def test_a_checkpoint_of_unrolled_layers_names_the_layout_when_restored_scanned(tmp_path):
  config = load_config("pretrain_aal3", "test")
  config.model.size = "tiny"
  unrolled, _ = _setup(config, jax.devices()[:1])
  config.model.scan = True
  scanned, _ = _setup(config, jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, unrolled.init())
  restored, _ = ckpt.restore(unrolled.abstract_state)  # the same layout loads
  assert restored["params"]["encoder"]["blocks"][1]["up"]["kernel"].shape == (64, 256)
  with pytest.raises(errors.InputError, match="laid out differently.*model.scan"):
    ckpt.restore(scanned.abstract_state)
  ckpt.close()


def test_a_checkpoint_of_another_patch_count_is_named_as_such_not_as_damage(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, {"space": jnp.zeros((656, 8)), "step": jnp.int32(1)})
  other = {"space": jax.ShapeDtypeStruct((655, 8), jnp.float32),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  with pytest.raises(errors.InputError, match=r"shape \(656, 8\) where this model has "
                     r"\(655, 8\).*atlas on the grid"):
    ckpt.restore(other)
  ckpt.close()
  assert (tmp_path / "1").is_dir() and not ckpt.rejected  # nothing set aside
  reader = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)  # as an encoder loads
  with pytest.raises(errors.InputError, match=r"\['space'\] of shape \(656, 8\) where this "
                     r"model has \(655, 8\).*atlas on the grid"):
    reader.restore(other, partial=True)
  reader.close()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = load_config("pretrain_aal3", "test")
  config.optim.learning_rate = 1e30
  config.checkpoint_every = 1
  config.log_every = 1
  with pytest.raises(errors.TrainingError, match=r"not finite at step (\d+)") as info:
    tasks.run_task(config, str(tmp_path))
  bad = int(re.search(r"not finite at step (\d+)", str(info.value)).group(1))
  steps = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps()
  assert steps and max(steps) < bad
  assert f"checkpoint step {max(steps)}" in str(info.value)


def _tensorboard_scalars(folder):
  """{tag: [(step, value)]} from TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for name in sorted(os.listdir(folder)):
    raw = (folder / name).read_bytes()
    pos = 0
    while pos < len(raw):
      length = int.from_bytes(raw[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 16 + length
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.mark.slow
def test_resume_refuses_a_workdir_of_another_run(tmp_path):
  config = load_config("pretrain_aal3", "test")
  config.total_steps = 2
  tasks.run_task(config, str(tmp_path))
  summary = json.loads((tmp_path / "pretrain_summary.json").read_text())
  assert summary["steps"] == 2 and summary["tokens_per_window"] > 0
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [2]
  assert set(records[0]) >= {"loss", "grad_norm", "param_norm", "learning_rate", "step_time",
                             "masked_loss", "target_power", "explained",
                             "tokens_per_s"}
  assert _tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == [
      (2, pytest.approx(records[0]["loss"]))]
  config.mask.ratio = 0.75
  with pytest.raises(errors.InputError, match="mask"):
    tasks.run_task(config, str(tmp_path))


def test_shards_and_bad_mesh_are_input_errors(tmp_path):
  config = load_config("pretrain_aal3", "test")
  config.data.shards = "/nowhere"
  with pytest.raises(errors.InputError, match="/nowhere is not a prepared dataset"):
    tasks.run_task(config, str(tmp_path / "a"))
  config = load_config("pretrain_aal3", "test")
  config.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(errors.InputError, match="batch_size 8 must be a multiple"):
    tasks.run_task(config, str(tmp_path / "b"))


def test_random_config_differs_only_in_strategy():
  roi, rnd = load_config("pretrain_aal3"), load_config("pretrain_random")
  assert rnd.mask.strategy == "random" and roi.mask.strategy == "roi"
  rnd.mask.strategy = "roi"
  assert rnd.to_dict() == roi.to_dict()
  paper = load_config("pretrain_aal3", "adhd200")
  assert paper.grid.shape == (96, 96, 96) and paper.grid.voxel_size_mm == 2.0
  assert paper.frames == 20 and paper.patches.size == 6 and paper.patches.frames == 1
