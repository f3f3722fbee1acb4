"""config.validation: every config rule, each refusing one bad value, and where tasks check."""

import glob
import importlib
import os
import re

import ml_collections
import pytest

from conftest import REPO, load_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.config import validation

WHOLE_1 = "must be a whole number >= 1"
WHOLE_0 = "must be a whole number >= 0"

# rule (a VALUES key, a BLOCKS name or a REMOVED key), config (configs/NAME.py:test),
# settings that break it, a part of the message. Every rule has a row; a rule that
# reads a list has one per way of getting the list wrong.
TABLE = [
    # Counts, steps, rates
    ("total_steps", "pretrain_aal3", {"total_steps": 0}, f"config.total_steps = 0 {WHOLE_1}"),
    ("frames", "pretrain_aal3", {"frames": 0}, f"config.frames = 0 {WHOLE_1}"),
    ("log_every", "pretrain_aal3", {"log_every": 0}, f"config.log_every = 0 {WHOLE_1}"),
    ("checkpoint_every", "pretrain_aal3", {"checkpoint_every": 0},
     f"config.checkpoint_every = 0 {WHOLE_1}"),
    ("keep_checkpoints", "pretrain_aal3", {"keep_checkpoints": 0},
     f"config.keep_checkpoints = 0 {WHOLE_1}"),
    ("steps", "finetune", {"steps": 0}, f"config.steps = 0 {WHOLE_1}"),
    ("patches.size", "pretrain_aal3", {"patches.size": 0}, f"config.patches.size = 0 {WHOLE_1}"),
    ("data.windows_per_subject", "pretrain_aal3", {"data.windows_per_subject": 0},
     f"config.data.windows_per_subject = 0 {WHOLE_1}"),
    ("synthetic.num_subjects", "pretrain_aal3", {"data.synthetic.num_subjects": 0},
     f"config.data.synthetic.num_subjects = 0 {WHOLE_1}"),
    ("synthetic.run_frames", "pretrain_aal3", {"data.synthetic.run_frames": 0},
     f"config.data.synthetic.run_frames = 0 {WHOLE_1}"),
    ("optim.warmup_steps", "pretrain_aal3", {"optim.warmup_steps": -1},
     f"config.optim.warmup_steps = -1 {WHOLE_0}"),
    ("workers", "prepare", {"workers": -1}, f"config.workers = -1 {WHOLE_0}"),
    ("registration.min_inside", "prepare", {"registration.min_inside": 1.0},
     "config.registration.min_inside = 1.0 must be between 0 and 1 (exclusive)"),
    ("registration.min_dice", "prepare", {"registration.min_dice": 0},
     "config.registration.min_dice = 0 must be between 0 and 1"),
    ("registration.brain_threshold", "prepare", {"registration.brain_threshold": 2.0},
     "config.registration.brain_threshold = 2.0 must be between 0 and 1"),
    ("registration.warn_margin", "prepare", {"registration.warn_margin": -0.1},
     "config.registration.warn_margin = -0.1 must be a finite number >= 0 (0: none)"),
    ("data.read_threads", "pretrain_aal3", {"data.read_threads": -1},
     f"config.data.read_threads = -1 {WHOLE_0}"),
    ("data.prefetch", "pretrain_aal3", {"data.prefetch": -1}, f"config.data.prefetch = -1 {WHOLE_0}"),
    ("data.prefetch_workers", "pretrain_aal3", {"data.prefetch_workers": -1},
     f"config.data.prefetch_workers = -1 {WHOLE_0}"),
    ("data.streams", "pretrain_aal3", {"data.streams": -1}, f"config.data.streams = -1 {WHOLE_0}"),
    ("fault_kill_after_step", "pretrain_aal3", {"fault_kill_after_step": -1},
     f"config.fault_kill_after_step = -1 {WHOLE_0}"),
    ("fault_kill_after_scans", "prepare", {"fault_kill_after_scans": 1.5},
     f"config.fault_kill_after_scans = 1.5 {WHOLE_0}"),
    ("stride", "probe", {"stride": -1}, f"config.stride = -1 {WHOLE_0}"),
    ("max_windows", "probe", {"max_windows": -1}, f"config.max_windows = -1 {WHOLE_0}"),
    ("clip_windows", "finetune", {"clip_windows": 0}, f"config.clip_windows = 0 {WHOLE_1}"),
    ("folds", "probe", {"folds": 1}, "config.folds = 1 must be a whole number >= 2"),
    ("repeats", "probe", {"repeats": 0}, f"config.repeats = 0 {WHOLE_1}"),
    ("inner_folds", "probe", {"inner_folds": 1}, "config.inner_folds = 1 must be a whole number >= 2"),
    ("ig_steps", "attribute", {"ig_steps": 0}, f"config.ig_steps = 0 {WHOLE_1}"),
    ("ig_chunk", "attribute", {"ig_chunk": 0}, f"config.ig_chunk = 0 {WHOLE_1}"),
    ("recon_rounds", "probe", {"recon_rounds": 0}, f"config.recon_rounds = 0 {WHOLE_1}"),
    ("learning_rate", "pretrain_aal3", {"optim.learning_rate": -1e-3},
     "config.optim.learning_rate = -0.001 must be a finite number > 0"),
    ("batch_size", "pretrain_aal3", {"batch_size": -1}, f"config.batch_size = -1 {WHOLE_1}"),
    ("tr", "prepare", {"tr": 0.0}, "config.tr = 0.0 must be a finite number > 0"),
    # Grid, patches, data
    ("grid.voxel_size_mm", "pretrain_aal3", {"grid.voxel_size_mm": float("nan")},
     "config.grid.voxel_size_mm = nan must be a finite number > 0"),
    ("grid.orientation", "pretrain_aal3", {"grid.orientation": "lpi"},
     "config.grid.orientation = 'lpi' must be 'RAS' or 'LAS' (either case)"),
    ("a", "pair_probes", {"a": " "}, "config.a = ' ' must be a probe workdir, optionally "
     "with ':FEATURE', e.g. 'runs/probe:recon_power'"),
    ("b", "pair_probes", {"b": "runs/probe:"}, "config.b = 'runs/probe:' must be a probe "
     "workdir, optionally with ':FEATURE'"),
    ("orientation", "synthesize", {"orientation": "LAX"},
     "config.orientation = 'LAX' must be three axis letters, one of L/R, A/P and S/I each, "
     "e.g. 'LAS'"),
    ("grid.shape", "prepare", {"grid.shape": (40, 48)},
     "grid.shape must be three positive integers, got (40, 48)"),
    ("patches.assignment", "pretrain_aal3", {"patches.assignment": "median"},
     "patches.assignment must be one of ('majority', 'pure', 'any'), got 'median'"),
    ("patches.brain_threshold", "pretrain_aal3", {"patches.brain_threshold": 1.0},
     "patches.brain_threshold must be in [0, 1), got 1.0"),
    ("synthetic.num_sites", "pretrain_aal3", {"data.synthetic.num_sites": 0},
     "data.synthetic.num_sites must be 1.."),
    ("synthetic_preset", "probe", {"data.synthetic_preset": "loud"},
     "unknown synthetic preset 'loud'; known: "),
    ("distributed.mode", "pretrain_aal3", {"distributed.mode": "mpi"},
     "distributed.mode='mpi'; expected one of auto, cluster, off"),
    ("mesh", "pretrain_aal3", {"mesh.data": -1, "mesh.fsdp": -1},
     "config.mesh {'data': -1, 'fsdp': -1, 'tensor': 1}: sizes must be >= 1, with at most one -1"),
    ("synthetic_frames", "pretrain_aal3", {"frames": 40},
     "config.frames = 40 is longer than every synthetic run"),
    ("frames_per_token", "pretrain_aal3", {"frames": 5},
     "frames=5 is not a multiple of patches.frames=2"),
    # Prepare
    ("denoise.apply", "prepare", {"denoise.apply": "always"},
     "config.denoise.apply = 'always' must be one of 'auto', 'on', 'off'"),
    ("denoise.strategy", "prepare", {"denoise.strategy": "ica_aroma"},
     "config.denoise.strategy = 'ica_aroma' must be one of nilearn's"),
    ("denoise.detrend", "prepare", {"denoise.detrend": "yes"},
     "config.denoise.detrend = 'yes' must be True or False"),
    ("denoise.high_pass", "prepare", {"denoise.high_pass": -0.01},
     "config.denoise.high_pass = -0.01 must be a finite number >= 0"),
    ("denoise.low_pass", "prepare", {"denoise.low_pass": float("inf")},
     "config.denoise.low_pass = inf must be a finite number >= 0"),
    ("denoise_band", "prepare", {"denoise.high_pass": 0.2, "denoise.low_pass": 0.1},
     "config.denoise.high_pass = 0.2 must be below config.denoise.low_pass = 0.1"),
    ("space", "prepare", {"space": "space-MNI152NLin6Asym"},
     "config.space = 'space-MNI152NLin6Asym' must be a template name"),
    ("normalise", "prepare", {"normalise": "zscore"},
     "config.normalise must be one of ('global', 'voxel'), got 'zscore'"),
    ("source", "prepare", {"source": "openneuro"},
     "config.source must be one of adhd200, nilearn_adhd, fmriprep, manifest, got 'openneuro'"),
    ("manifest", "prepare", {"source": "manifest", "manifest": ""},
     "source 'manifest' needs --config.manifest=CSV"),
    ("label_values", "prepare", {"label_values": "0=0,ADHD=2"},
     "config.label_values: 'ADHD=2' is not VALUE=0 or VALUE=1"),
    # Model
    ("model.size", "pretrain_aal3", {"model.size": "huge"},
     "model.size must be one of tiny, small, base, got 'huge'"),
    ("model.dtype", "pretrain_aal3", {"model.dtype": "float16"},
     "model.dtype must be one of float32, bfloat16, got 'float16'"),
    ("model.remat", "pretrain_aal3", {"model.remat": "everything"},
     "model.remat must be one of none, block, dots, projections, got 'everything'"),
    ("model.centre_target", "pretrain_aal3", {"model.centre_target": "yes"},
     "model.centre_target must be True or False, got 'yes'"),
    ("model.scan", "pretrain_aal3", {"model.scan": 1}, "model.scan must be True or False, got 1"),
    ("model.attention", "pretrain_aal3", {"model.attention": "flash"},
     "model.attention must be one of auto, reference, dense, xla, cudnn, pallas, chunked, got "
     "'flash'"),
    ("model.attention_block", "pretrain_aal3", {"model.attention_block": 0},
     "model.attention_block must be a positive token count, got 0"),
    ("model.mlp_chunk", "pretrain_aal3", {"model.mlp_chunk": -1},
     "model.mlp_chunk must be 0 (off) or a token count, got -1"),
    ("model.pos_embedding", "pretrain_aal3", {"model.pos_embedding": "rope"},
     "model.pos_embedding must be 'sincos' or 'learned', got 'rope'"),
    # Masks and losses
    ("mask.ratio", "pretrain_aal3", {"mask.ratio": 1.0},
     "config.mask.ratio = 1.0 must be between 0 and 1 (exclusive)"),
    ("mask.strategy", "pretrain_aal3", {"mask.strategy": "blocks"},
     "mask.strategy must be one of ('random', 'tube', 'roi', 'roi_time'), got 'blocks'"),
    ("show.strategies", "show_masks", {"show.strategies": "roi,blocks"},
     "mask.strategy must be one of ('random', 'tube', 'roi', 'roi_time'), got 'blocks'"),
    ("adaptive_regions", "pretrain_aal3",
     {"mask.strategy": "random", "mask.adaptive": True, "mask.adaptive_decay": 1.0},
     "mask.adaptive draws regions: it needs mask.strategy roi or roi_time, not 'random'; "
     "mask.adaptive_decay must be in [0, 1), got 1.0"),
    ("region_weights", "pretrain_aal3", {"loss.region_weights": "Hippocampus_L"},
     "loss.region_weights: expected NAME=WEIGHT, got 'Hippocampus_L'"),
    ("visible_weight", "pretrain_aal3", {"loss.visible_weight": -1.0},
     "loss.visible_weight must be >= 0, got -1.0"),
    # Probe, fine-tune, attribute
    ("pool", "probe", {"pool": "region+max"},
     "pool must be one of mean, region, region_std, region_corr (or several joined by '+'), "
     "got 'region+max'"),
    ("pool", "finetune", {"pool": ""}, "pool must be one of"),
    ("pool", "attribute", {"pool": "cls"}, "pool 'cls' needs a class token; this encoder has "
     "none: use one of mean, region, region_std, region_corr"),
    ("baselines", "probe", {"baselines": "fc,glm"},
     "config.baselines must list region_stats, fc, init without repeats, got 'fc,glm'"),
    ("layers", "attribute", {"layers": "1,1"},
     "config.layers must list encoder blocks 0..depth (0: the embedded tokens) without "
     "repeats, or 'all', got '1,1'"),
    ("layers", "probe", {"layers": "x"}, "config.layers must list encoder blocks 0..depth"),
    ("layers", "probe", {"layers": "-1"}, "config.layers must list encoder blocks 0..depth"),
    ("readouts", "probe", {"readouts": "recon,nope"},
     "config.readouts must list recon, recon_power, recon_corr or encoder@K[+K...] (encoder "
     "blocks) without repeats, got 'recon,nope'"),
    ("readouts", "probe", {"readouts": "recon,recon"}, "config.readouts must list"),
    ("readouts", "probe", {"readouts": "encoder@"}, "config.readouts must list"),
    ("readouts", "probe", {"readouts": "encoder@1+1"}, "config.layers must list encoder blocks"),
    ("schemes", "finetune", {"schemes": "kfold,holdout"},
     "config.schemes must list kfold and/or loso, got 'kfold,holdout'"),
    ("mode", "finetune", {"mode": "partial"},
     "config.mode must be one of ('frozen', 'full'), got 'partial'"),
    ("baseline", "attribute", {"baseline": "noise"},
     "config.baseline must be one of ('zeros', 'temporal_mean'), got 'noise'"),
    ("jax_probe", "probe", {"jax_probe": True},
     "config.jax_probe: the JAX logistic probe was removed"),
    # Compare
    ("strategies", "compare_masking", {"strategies": "roi,nope"},
     "unknown strategies nope; known: roi, random"),
    ("strategies", "compare_masking", {"strategies": "roi,roi"},
     "config.strategies must be a comma-separated list without repeats, got 'roi,roi'"),
    ("seeds", "compare_masking", {"seeds": "0,x"}, "config.seeds must list integers, got '0,x'"),
    ("seeds", "compare_masking", {"seeds": "1,1"}, "config.seeds must list integers, got '1,1'"),
    ("budgets", "compare_masking", {"budgets": "0"},
     "config.budgets must list pretraining steps >= 0 (0: the initial weights), at least one "
     "> 0, got '0'"),
    ("budgets", "compare_masking", {"budgets": "-5,10"}, "config.budgets must list"),
    ("budgets", "compare_masking", {"budgets": "10,x"}, "config.budgets must list"),
    ("budgets", "compare_masking", {"budgets": "10,10"}, "config.budgets must list"),
    ("compare_baseline", "compare_masking", {"baseline": "tube"},
     "config.baseline='tube' is not among the strategies or probe baselines roi, random, "
     "region_stats, fc, init"),
]


NO_TEST_VARIANT = ("show_masks", "pair_probes")  # configs whose default is already small


def _config(name: str, settings: dict) -> dict:
  """The config as plain dicts, so a setting may take any type (as a config file may)."""
  config = load_config(name, "" if name in NO_TEST_VARIANT else "test").to_dict()
  for dotted, value in settings.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.mark.parametrize("rule, name, settings, message", TABLE,
                         ids=[f"{r[0]}:{list(r[2].values())[0]}" for r in TABLE])
def test_each_rule_refuses_a_bad_value_in_one_line(rule, name, settings, message):
  config = _config(name, settings)
  with pytest.raises(errors.InputError) as info:
    validation.validate(config)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_the_table_holds_every_rule():
  assert {row[0] for row in TABLE} == (set(validation.VALUES) |
                                       set(validation.BLOCKS) |
                                       set(validation.REMOVED))


def test_every_shipped_config_passes():
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if name.startswith("_"):
      continue
    variants = re.findall(r'arg == "(\w+)"', open(path, encoding="utf-8").read())
    for arg in ["", *variants]:
      validation.validate(load_config(name, arg))


def test_a_rule_applies_in_the_blocks_of_its_tasks_only():
  config = load_config("compare_masking", "test")
  config.pretrain.log_every = 0
  config.probe.pool = "max"
  with pytest.raises(errors.InputError) as info:
    validation.validate(config)
  problems = str(info.value).split("; ")
  assert problems[0] == f"config.pretrain.log_every = 0 {WHOLE_1}"
  assert problems[1].startswith("pool must be one of") and len(problems) == 2
  # compare's own `baseline` (a strategy) is not attribute's; show.strategies is not compare's.
  assert config.baseline == "random" and not validation.problems(load_config(
      "compare_masking", "test"))
  show = load_config("show_masks")
  show.show.strategies = "random,tube"
  assert not validation.problems(show)
  # A block checked on its own meets every rule for its keys.
  with pytest.raises(errors.InputError, match="mask.adaptive draws regions"):
    validation.validate(ml_collections.ConfigDict(
        {"strategy": "tube", "adaptive": True}), where="mask")


def test_rules_that_need_a_loaded_object_run_where_it_is_loaded():
  config = load_config("probe", "test")
  config.update(layers="1,3", readouts="encoder@0+2,recon")
  validation.validate(config)  # blocks 3 may exist: the encoder is not loaded yet
  with pytest.raises(errors.InputError) as info:
    validation.check_loaded(config, depth=2)
  assert str(info.value) == (
      "config.layers must list encoder blocks 0..2 (0: the embedded tokens) without repeats, "
      "or 'all', got '1,3'")
  config.update(layers="", readouts="encoder@3")
  with pytest.raises(errors.InputError, match=r"0\.\.2 .*got '3'"):
    validation.check_loaded(config, depth=2)
  validation.check_loaded(config, depth=3)
  # batch_size against the mesh: sharding.check_batch_size, in tests/devices/test_sharding.py.


def test_parsers_read_only_what_the_rules_let_through():
  from roi_mae_jax.downstream import features  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.InputError, match="pool must be one of"):
    features.check_pools("mean+nope")  # as a saved classifier's pool is read


# task -> (config file, a key and a bad value of it)
TASK_CONFIGS = {
    "prepare": ("prepare", "frames", 0),
    "pretrain": ("pretrain_aal3", "frames", 0),
    "show_masks": ("show_masks", "frames", 0),
    "probe": ("probe", "folds", 1),
    "finetune": ("finetune", "folds", 1),
    "attribute": ("attribute", "ig_steps", 0),
    "compare": ("compare_masking", "seeds", "x"),
    "synthesize": ("synthesize", "orientation", "LAX"),
    "pair_probes": ("pair_probes", "b", "runs/probe:"),
}


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_each_task_validates_once_before_any_work(task, tmp_path, monkeypatch):
  name, key, bad = TASK_CONFIGS[task]
  config = load_config(name, "" if task in NO_TEST_VARIANT else "test")
  config.update({k: "/nowhere" for k in ("checkpoint", "input_dir", "a", "b") if k in config})
  module = importlib.import_module(tasks.TASKS[task])
  calls, runs = [], []
  validate = validation.validate
  monkeypatch.setattr(validation, "validate",
                      lambda c, *a, **k: (calls.append(c), validate(c, *a, **k))[1])
  monkeypatch.setattr(module, "run", lambda c, w: runs.append(w))
  tasks.run_task(config, str(tmp_path / "ok"))
  assert len(calls) == 1 and runs == [str(tmp_path / "ok")]
  config[key] = bad
  with pytest.raises(errors.InputError, match=rf"^config\.{key}\b.* must "):
    tasks.run_task(config, str(tmp_path / "bad"))
  assert len(calls) == 2 and len(runs) == 1 and not (tmp_path / "bad").exists()
