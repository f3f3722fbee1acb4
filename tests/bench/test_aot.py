"""Compiling for accelerators from this host: TPU topologies and deviceless GPUs.

The tiny model's sharded step goes through `bench aot`'s own code path
(`aot.measure`) for a TPU v5e 2x2 slice with the Pallas kernel and for four
H100s with cuDNN's, and the kernel's call must be in the compiled program;
neither chip is needed (libtpu and the CUDA plugin compile for them).
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from roi_mae_jax import errors
from roi_mae_jax.bench import aot
from roi_mae_jax.bench import hlo_stats
from roi_mae_jax.bench import targets
from roi_mae_jax.devices import platforms


def _tiny(attention: str):
  config = load_config("pretrain_aal3", "test")
  config.batch_size = 4          # 2 windows per batch shard on a (2, 1, 2) mesh
  config.model.dtype = "bfloat16"
  config.model.attention = attention
  config.model.scan = True
  config.model.remat = "block"
  return config


@pytest.mark.parametrize("name,attention,kernel,call", [
    ("tpu:v5e:2x2", "pallas", "pallas", "tpu_custom_call"),
    ("gpu:h100:4", "auto", "cudnn", "__cudnn$fmha"),
])
@pytest.mark.slow
def test_the_tiny_step_compiles_for_an_accelerator_mesh(name, attention, kernel, call):
  target = targets.parse(name)
  figures = aot.measure(_tiny(attention), target, (2, 1, 2), encoder=name.startswith("tpu"))
  assert figures["platform"] == name.split(":")[0]
  assert figures["devices"] == 4 and not figures["cpu_paths"]
  assert figures["kernels"] == {"encoder": kernel, "decoder": kernel}
  step = figures["step"]
  # Memory grows with the windows; the fixed part (parameters, moments) is positive.
  assert 0 < step["windows_1"]["memory_bytes"] < step["windows_2"]["memory_bytes"]
  assert step["fixed_bytes"] > 0 and step["largest_windows_per_shard"] > 2
  # Heads over tensor, batch over data: the step all-reduces gradients and activations.
  table = figures["at_config_batch"]["collectives"]["by_kind"]
  assert table["all-reduce"]["count"] > 0 and table["all-reduce"]["bytes"] > 0
  assert figures["at_config_batch"]["collectives"]["trip_counts_known"]
  assert figures["roofline"]["estimate_s"] > 0
  # The kernel itself is in the compiled program, not a fallback.
  assert any(c.startswith(call) for c in figures["at_config_batch"]["custom_calls"])
  if "encoder" in figures:
    assert figures["encoder"]["memory_bytes"] > 0
  report = aot.describe(figures)
  assert f"attention encoder {kernel}" in report and "not measured" in report


def test_targets_parse_and_describe_gpus():
  assert targets.parse("tpu:v5p:4x4x4").chips() == 64
  assert targets.parse("gpu:a100:2x8").gpu_hosts() == (2, 8)
  proto = targets.gpu_target_config(targets.specs()["gpu"]["h100"])
  assert "core_count: 132" in proto and "major: 9" in proto
  for bad in ("tpu:v9:2x2", "gpu:h100", "gpu:h100:2x2x2", "cpu:x:1", "tpu:v5e:4y4"):
    with pytest.raises(errors.InputError, match="--target"):
      targets.parse(bad)


def test_collectives_in_loops_count_once_per_iteration():
  hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%cond (p.1: (s32[], f32[8])) -> pred[] {
  %p.1 = (s32[], f32[8]) parameter(0)
  %n = s32[] constant(12)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[32] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %ag = f32[32]{0} all-gather(%a), replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %r = f32[32]{0} copy(%ag)
}
"""
  table = hlo_stats.collectives(hlo, devices=8)
  assert table["trip_counts_known"]
  assert table["by_kind"]["all-reduce"]["count"] == 12
  assert table["by_kind"]["all-reduce"]["bytes"] == 12 * 32
  assert table["by_kind"]["all-reduce"]["wire_bytes"] == pytest.approx(12 * 32 * 2 * 3 / 4)
  assert table["by_kind"]["all-gather"] == {"count": 1, "bytes": 128.0,
                                            "wire_bytes": pytest.approx(96.0)}


def test_installed_accelerator_plugins_stay_quiet_on_a_cpu_host():
  """With libtpu and the CUDA plugin installed and no accelerator attached, a
  CPU run prints nothing of them."""
  if platforms.accelerators_attached():
    pytest.skip("this host has an accelerator")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  run = subprocess.run([sys.executable, "-c", "import roi_mae_jax, jax; print(jax.devices())"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                       check=True)
  assert run.stdout.strip() == "[CpuDevice(id=0)]"
  assert run.stderr == ""


def test_a_mesh_axis_can_split_a_torus_axis():
  """tensor=2 on a 4x4x4 v5p slice needs a physical axis split (it failed before)."""
  devices = targets.parse("tpu:v5p:4x4x4").devices()
  mesh = targets.make_mesh(devices, (32, 1, 2))
  assert dict(mesh.shape) == {"data": 32, "fsdp": 1, "tensor": 2}


@pytest.mark.slow
def test_an_fsdp_step_gathers_weights_rather_than_reducing_activations():
  """With parameters split over fsdp, each block's activations stay split by
  batch: the step all-gathers weights and reduce-scatters their gradients; it
  does not all-reduce partial products of activations (without the activation
  constraints it all-reduced about 100x the bytes)."""
  config = _tiny("xla")
  config.model.size = "small"
  config.batch_size = 8
  devices = targets.parse("gpu:h100:4").devices()
  figures = aot.compile_step(config, aot.build.parts(config), targets.make_mesh(devices, (1, 4, 1)),
                             8, hlo=True)
  table = figures["collectives"]["by_kind"]
  weights = table["all-gather"]["bytes"] + table["reduce-scatter"]["bytes"]
  assert table.get("all-reduce", {"bytes": 0})["bytes"] < 0.5 * weights
