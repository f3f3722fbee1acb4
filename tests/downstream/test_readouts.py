"""Read-outs beyond the encoder's output: chosen encoder layers, reconstruction residuals."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, load_config
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.data import sources
from roi_mae_jax.devices import platforms
from roi_mae_jax.downstream import evaluation
from roi_mae_jax.downstream import features
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import readouts
from roi_mae_jax.downstream import recon_features
from roi_mae_jax.downstream import splits as splits_lib
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.training import build

_STANDARD = platforms.Target("cpu", None, cpu_paths=False)


@pytest.fixture(scope="module")
def spec():
  return build.parts(load_config("pretrain_aal3", "test")).spec


def _layers_of(spec, params, layers, target=None, **overrides):
  cfg = model_lib.model_config("tiny")
  cfg.update(overrides)
  model = model_lib.MaskedAutoencoder(spec, cfg, rngs=nnx.Rngs(0), target=target)
  graphdef = nnx.graphdef(model)
  windows = jax.random.normal(jax.random.key(1), (2,) + spec.window_shape)
  ids = jnp.broadcast_to(jnp.arange(spec.num_tokens), (2, spec.num_tokens))

  @jax.jit
  def run(p):
    m = nnx.merge(graphdef, p)
    tokens = spec.patchify(windows)
    return m.encode_layers(tokens, ids, layers), m.encode(tokens, ids)
  return run(params)


@pytest.mark.parametrize("overrides", [
    {}, {"scan": True}, {"scan": True, "remat": "block"}, {"remat": "projections"},
    {"target": _STANDARD}, {"target": _STANDARD, "scan": True},
    {"target": _STANDARD, "scan": True, "remat": "block"},
])
def test_intermediate_layers_agree_on_every_code_path(spec, overrides):
  cfg = model_lib.model_config("tiny")
  plain = nnx.to_pure_dict(nnx.state(model_lib.MaskedAutoencoder(spec, cfg, rngs=nnx.Rngs(0)),
                                     nnx.Param))
  depth = model_lib.SIZES["tiny"].depth
  want, encoded = _layers_of(spec, plain, (0, 1, depth))
  np.testing.assert_allclose(want[-1], encoded, atol=1e-6)  # the last is encode's output
  assert want.shape == (3, 2, spec.num_tokens, 64)
  assert not np.allclose(want[0], want[1], atol=1e-2) and not np.allclose(want[1], want[2],
                                                                          atol=1e-2)
  params = model_lib.stack_layers(plain) if overrides.get("scan") else plain
  got, _ = _layers_of(spec, params, (depth, 1, 0), **overrides)   # any order
  np.testing.assert_allclose(got[::-1], want, atol=1e-5, rtol=1e-5)
  with pytest.raises(errors.InputError, match="encoder layers must be 0..2"):
    _layers_of(spec, params, (3,), **overrides)


def _source(pre, subjects=4):
  data = ml_collections.ConfigDict({"shards": "", "synthetic_subjects": subjects,
                                    "synthetic_preset": "realistic"})
  return sources.downstream_source(pre.config, data)


def test_encoder_features_from_chosen_layers_pool_each_layer_alone(pretrained_dir):
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  source = _source(pre)
  pool = "region_std+region_corr"
  last = features.EncoderFeatures(pre, pool, batch_size=2)(source).features
  np.testing.assert_allclose(features.EncoderFeatures(pre, pool, batch_size=2,
                                                      layers=(pre.depth,))(source).features,
                             last, atol=1e-5)
  both = features.EncoderFeatures(pre, pool, batch_size=2, layers=(1, pre.depth))(source)
  first = features.EncoderFeatures(pre, pool, batch_size=2, layers=(1,))(source).features
  assert both.features.shape == (4, 2 * last.shape[1])
  np.testing.assert_allclose(both.features, np.concatenate([first, last], 1), atol=1e-5)
  assert not np.allclose(first, last, atol=1e-3)
  tokens, regions = features.EncoderFeatures(pre, pool, batch_size=2,
                                             layers=(0, 1)).scan_courses(source, 0)
  assert tokens.shape[1:] == (2, 64) and regions.shape[1:] == (2, len(pre.pooled_regions), 64)


def test_readout_names_and_layers_are_parsed():  # their rules: tests/config/test_validation.py
  assert readouts.parse_layers("") is None
  assert readouts.parse_layers("1,2") == readouts.parse_layers("1+2") == (1, 2)
  assert readouts.parse_layers("all", depth=2) == (0, 1, 2)
  assert readouts.readout_names("recon, encoder@0+2") == ["recon", "encoder@0+2"]
  assert [readouts.init_name(n) for n in ("recon", "encoder@1")] == ["init_recon", "init@1"]


def test_region_draws_hide_each_region_once_per_round():
  draws = recon_features.region_draws(11, 0.5, rounds=3, seed=0)
  assert draws.shape == (6, 11) and np.all(draws.sum(0) == 3)
  assert np.all(np.abs(draws.sum(1) - 5.5) <= 0.5)
  np.testing.assert_array_equal(draws, recon_features.region_draws(11, 0.5, 3, seed=0))
  assert recon_features.region_draws(12, 0.25, 1).shape == (4, 12)
  with pytest.raises(errors.InputError, match="reconstruction parts"):
    recon_features.check_parts("power+mse")


def test_reconstruction_statistics_follow_their_definitions():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 8, 4))                      # windows, frames, regions
  hidden = recon_features.region_draws(4, 0.5, rounds=1)  # (2, 4)
  e = np.broadcast_to(x[:, None], (3, 2, 8, 4)).copy()    # nothing predicted: e = x
  e[:, :, :, 1] *= 0.5                                    # region 1: half of it predicted
  row = recon_features.subject_features(e, x, hidden, ["power", "corr"])
  np.testing.assert_allclose(row[:4], np.log([1, 0.25, 1, 1]), atol=1e-6)
  corr = row[4:].reshape(4, 4)
  np.testing.assert_allclose(np.diag(corr), np.arctanh(0.999), atol=1e-6)  # clipped r = 1
  flat = x.reshape(-1, 4)
  np.testing.assert_allclose(np.tanh(corr[0, 2]), np.sum(flat[:, 0] * flat[:, 2]) / np.sqrt(
      np.sum(flat[:, 0] ** 2) * np.sum(flat[:, 2] ** 2)), atol=1e-6)


def _decoupling_run(tmp_path_factory) -> str:
  """A tiny model trained briefly on subjects where half have three regions cut off
  from their network (no change of amplitude or level)."""
  config = load_config("pretrain_aal3", "test")
  config.total_steps, config.checkpoint_every, config.log_every = 60, 60, 20
  config.data.synthetic.update(
      num_subjects=24, run_frames=48, coupling=0.95, signal_percent=12.0,
      effect_regions="Frontal_Sup_2_L,Precentral_L,Frontal_Inf_Tri_L", effect_decoupling=1.0,
      effect_amplitude=1.0, effect_level_percent=0.0)
  workdir = tmp_path_factory.mktemp("decoupling")
  tasks.run_task(config, str(workdir))
  return str(workdir)


@pytest.mark.slow
def test_reconstruction_read_out_separates_decoupled_regions(tmp_path_factory):
  pre = pretrained_lib.load_pretrained(_decoupling_run(tmp_path_factory))
  source = sources.downstream_source(pre.config, ml_collections.ConfigDict(
      {"shards": "", "synthetic_subjects": 0}))
  extractor = recon_features.ReconstructionFeatures(pre, rounds=2, batch_size=2)
  feats = extractor(source)
  assert extractor.draws == 4 and feats.features.shape[0] == 24
  assert feats.features.shape[1] == len(pre.pooled_regions) * (1 + len(pre.pooled_regions))
  np.testing.assert_array_equal(extractor(source).features, feats.features)  # deterministic
  config = ml_collections.ConfigDict({"schemes": "kfold", "folds": 3, "repeats": 1})
  splits = splits_lib.from_config(config, feats.subjects, feats.labels, feats.sites)
  results = evaluation.evaluate({"recon": feats}, splits, reference="recon")
  assert results["features"]["recon"]["kfold"]["balanced_accuracy"]["mean"] >= 0.7, results


@pytest.mark.slow
def test_probe_scores_readouts_beside_their_untrained_twins(pretrained_dir, tmp_path):
  config = load_config("probe", "test")
  config.update(checkpoint=str(pretrained_dir), layers="1,2", readouts="encoder@0,recon_power",
                baselines="init", schemes="kfold", pool="region_std")
  tasks.run_task(config, str(tmp_path))
  results = json.loads((tmp_path / "probe_results.json").read_text())
  assert set(results["features"]) == {"encoder", "encoder@0", "recon_power", "init",
                                      "init@0", "init_recon_power"}
  widths, regions = results["meta"]["features"], results["meta"]["features"]["recon_power"]
  assert widths["encoder"] == 2 * widths["encoder@0"] == widths["init"] == 2 * 2 * regions * 64
  assert results["meta"]["layers"] == "1,2" and widths["init_recon_power"] == regions
  for name in ("encoder@0", "recon_power", "init_recon_power"):   # paired with the encoder
    assert results["differences"][name]["kfold"]["balanced_accuracy"]["n"] == 3


_IN_ANOTHER_PROCESS = """
import sys
import ml_collections, numpy as np
from roi_mae_jax.data import sources
from roi_mae_jax.downstream import pretrained
from roi_mae_jax.downstream import recon_features
pre = pretrained.load_pretrained(sys.argv[1])
source = sources.downstream_source(pre.config, ml_collections.ConfigDict(
    {"shards": "", "synthetic_subjects": 2, "synthetic_preset": "realistic"}))
extractor = recon_features.ReconstructionFeatures(pre, batch_size=2, max_windows=2)
np.save(sys.argv[2], extractor(source).features)
"""


@pytest.mark.slow
def test_reconstruction_features_are_the_same_in_another_process(pretrained_dir, tmp_path):
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  here = recon_features.ReconstructionFeatures(pre, batch_size=2, max_windows=2)(
      _source(pre, subjects=2)).features
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
      REPO, os.environ.get("PYTHONPATH")])), JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _IN_ANOTHER_PROCESS, str(pretrained_dir),
                  str(tmp_path / "there.npy")], check=True, env=env, cwd=REPO)
  np.testing.assert_array_equal(np.load(tmp_path / "there.npy"), here)
