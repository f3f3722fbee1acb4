"""Subject features: pools over time courses, region series, encoder courses, baselines."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_atlas
from roi_mae_jax import errors
from roi_mae_jax.downstream import evaluation
from roi_mae_jax.downstream import features
from roi_mae_jax.downstream import pretrained as pretrained_lib
from roi_mae_jax.downstream import splits as splits_lib


def test_pools_compute_amplitude_and_correlation_over_time():
  rng = np.random.default_rng(0)
  tokens = rng.standard_normal((30, 4)).astype(np.float32)
  regions = rng.standard_normal((30, 5, 4)).astype(np.float32)
  regions[:, 1] = regions[:, 0] * 0.9 + 0.1 * regions[:, 1]   # two coupled regions
  pooled = lambda pool: np.asarray(features.pool_courses(jnp.asarray(tokens),
                                                         jnp.asarray(regions), pool))
  np.testing.assert_allclose(pooled("mean"), tokens.mean(0), atol=1e-6)
  np.testing.assert_allclose(pooled("region"), regions.mean(0).ravel(), atol=1e-6)
  np.testing.assert_allclose(pooled("region_std"), np.concatenate(
      [regions.mean(0).ravel(), regions.std(0).ravel()]), atol=1e-4)
  centred = regions - regions.mean(0)
  cov = np.einsum("trd,tsd->rs", centred, centred)
  rows, cols = np.triu_indices(5, k=1)
  expected = np.arctanh((cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov))))[rows, cols])
  np.testing.assert_allclose(pooled("region_corr"), expected, atol=1e-3)
  one_dim = np.asarray(features._corr_upper(jnp.asarray(regions[..., 0])))  # plain Pearson
  np.testing.assert_allclose(one_dim, np.arctanh(np.corrcoef(regions[..., 0].T)[rows, cols]),
                             atol=1e-3)
  assert pooled("region_corr")[0] > 1.0   # the coupled pair: z of a high correlation
  both = pooled("region_std+region_corr")
  np.testing.assert_allclose(both, np.concatenate([pooled("region_std"),
                                                   pooled("region_corr")]), atol=1e-6)


def test_window_starts_stride_and_limit():
  assert features.window_starts(12, 4) == [0, 4, 8]
  assert features.window_starts(12, 4, stride=2) == [0, 2, 4, 6, 8]
  assert features.window_starts(12, 4, stride=2, max_windows=2) == [0, 2]
  with pytest.raises(errors.InputError, match="stride"):
    features.window_starts(12, 4, stride=-1)


class _ToySource:
  """Two subjects on the toy atlas; region r of subject s follows sin((r + 1) t) * (s + 1)."""

  frames = 2

  def __init__(self):
    self.atlas = toy_atlas()
    t = np.arange(10)
    labels = self.atlas.labels
    self.data = np.zeros((2,) + labels.shape + (10,), np.float32)
    for s in range(2):
      for r in range(1, 9):
        self.data[s][labels == r] = (s + 1) * np.sin((r + 1) * 0.3 * t)

  def __len__(self):
    return 2

  def info(self, i):
    return {"subject": f"s{i}", "site": "A", "label": i}

  def num_frames(self, i):
    return 10

  @property
  def grid(self):
    return self.atlas.grid

  def read(self, i, start, count):
    self.reads = getattr(self, "reads", 0) + 1
    return self.data[i][..., start:start + count]

  def window_at(self, i, start):
    return self.read(i, start, self.frames)


def test_extractors_share_one_read_of_each_scan():
  source = _ToySource()
  alone = {kind: features.RegionSeriesFeatures(source.atlas, kind)(source)
           for kind in ("region_stats", "fc")}
  reads_alone = source.reads
  source.reads, source.windows_are_slices = 0, True
  together = features.extract({kind: features.RegionSeriesFeatures(source.atlas, kind)
                               for kind in ("region_stats", "fc")}, source)
  assert source.reads == 2 and reads_alone == 2 * 2  # per extractor and scan
  for kind, feats in alone.items():
    np.testing.assert_array_equal(together[kind].features, feats.features)
    assert together[kind].subjects == feats.subjects


def test_window_clips_all_runs_or_the_first_of_each_scan():
  source = _ToySource()   # 10 frames, windows of 2: starts 0, 2, 4, 6, 8
  clips = features.window_clips(source, {"s0", "s1"}, 2)
  assert clips["s1"] == [[(1, 0), (1, 2)], [(1, 4), (1, 6)]]
  assert features.window_clips(source, {"s0"}, 2, first_only=True) == {"s0": [[(0, 0), (0, 2)]]}
  assert features.window_clips(source, {"s0"}, 9, first_only=True)["s0"][0][-1] == (0, 8)
  with pytest.raises(errors.InputError, match="no run of 6 windows"):
    features.window_clips(source, {"s0"}, 6)


def test_region_series_baselines_read_every_frame_in_chunks():
  source = _ToySource()
  series = features.region_series(source, 1, source.atlas, chunk=3)   # 3 does not divide 10
  t = np.arange(10)
  expected = np.stack([2 * np.sin((r + 1) * 0.3 * t) for r in range(1, 9)], axis=1)
  np.testing.assert_allclose(series, expected, atol=1e-5)
  stats = features.RegionSeriesFeatures(source.atlas, "region_stats")(source)
  assert stats.subjects == ["s0", "s1"] and stats.labels.tolist() == [0, 1]
  np.testing.assert_allclose(stats.features[1], np.concatenate(
      [expected.mean(0), expected.std(0)]), atol=1e-5)
  fc = features.RegionSeriesFeatures(source.atlas, "fc")(source)
  assert fc.features.shape == (2, 28)
  np.testing.assert_allclose(fc.features[0], fc.features[1], atol=1e-4)  # amplitude-free


def test_encoder_courses_follow_the_windows_in_order(pretrained_dir):
  from roi_mae_jax.data import sources
  import ml_collections
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  data = ml_collections.ConfigDict({"shards": "", "synthetic_subjects": 4,
                                    "synthetic_preset": "realistic"})
  source = sources.downstream_source(pre.config, data)
  extractor = features.EncoderFeatures(pre, "region_std", batch_size=2)
  tokens, regions = extractor.scan_courses(source, 0)
  starts = features.window_starts(source.num_frames(0), source.frames)
  t = pre.spec.num_time
  assert tokens.shape == (len(starts) * t, 64)
  assert regions.shape == (len(starts) * t, len(pre.pooled_regions), 64)
  last = np.asarray(pre.encode(pre.params, jnp.asarray(source.window_at(0, starts[-1])[None])))
  by_time = last[0].reshape(t, pre.spec.num_patches, -1)
  np.testing.assert_allclose(tokens[-t:], by_time.mean(1), atol=1e-4)
  first_region = np.flatnonzero(pre.spec.patch_region == pre.pooled_regions[0])
  np.testing.assert_allclose(regions[-t:, 0], by_time[:, first_region].mean(1), atol=1e-4)
  overlapping = features.EncoderFeatures(pre, "region_std", stride=2, batch_size=2)
  assert overlapping.scan_courses(source, 0)[0].shape[0] == len(
      features.window_starts(source.num_frames(0), source.frames, 2))
  feats = extractor(source)
  assert feats.features.shape == (4, 2 * len(pre.pooled_regions) * 64)
  init = pretrained_lib.random_init(pre)
  assert init.step == 0 and any(
      not np.allclose(a, b) for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(p))
                                              for p in (init.params, pre.params))))


def test_evaluate_pairs_feature_sets_on_the_same_splits():
  rng = np.random.default_rng(3)
  labels = np.array([0, 1] * 20)
  sites = ["A"] * 20 + ["B"] * 20
  subjects = [f"s{i}" for i in range(40)]
  informative = rng.standard_normal((40, 6)) + 1.5 * labels[:, None]
  sets = {name: features.SubjectFeatures(subjects, sites, labels, x, np.ones(40))
          for name, x in (("encoder", informative), ("noise", rng.standard_normal((40, 6))))}
  config = __import__("ml_collections").ConfigDict({"schemes": "kfold,loso", "folds": 4,
                                                    "repeats": 2})
  splits = splits_lib.from_config(config, subjects, labels, sites)
  results = evaluation.evaluate(sets, splits, reference="encoder")
  assert results["features"]["encoder"]["kfold"]["balanced_accuracy"]["mean"] > 0.8
  assert results["features"]["noise"]["kfold"]["balanced_accuracy"]["n"] == 8
  diff = results["differences"]["noise"]["kfold"]["balanced_accuracy"]
  assert diff["n"] == 8 and diff["ci_low"] > 0, diff
  assert results["differences"]["noise"]["loso"]["roc_auc"]["n"] == 2
  table = evaluation.markdown_table(results)
  assert "| encoder | kfold |" in table and "(reference)" in table and "| noise | loso |" in table
  shuffled = dict(sets, noise=features.SubjectFeatures(subjects[::-1], sites, labels,
                                                       sets["noise"].features, np.ones(40)))
  with pytest.raises(errors.InputError, match="different subjects"):
    evaluation.evaluate(shuffled, splits)


def test_prepared_scans_are_read_once_for_encoder_and_baselines(pretrained_dir, prepared_dir,
                                                                monkeypatch):
  from roi_mae_jax.data import pipeline
  from roi_mae_jax.data import shards
  pre = pretrained_lib.load_pretrained(str(pretrained_dir))
  source = pipeline.ShardWindows(str(prepared_dir), pre.config.frames)
  frames_read = []
  original = shards.PreparedDataset.frames

  def counting(self, scan, start, count):
    frames_read.append(count)
    return original(self, scan, start, count)

  monkeypatch.setattr(shards.PreparedDataset, "frames", counting)
  extractors = lambda: {"encoder": features.EncoderFeatures(pre, "region_std", batch_size=2),
                        "region_stats": features.RegionSeriesFeatures(pre.patch_map.atlas,
                                                                      "region_stats")}
  alone = {name: extractor(source) for name, extractor in extractors().items()}
  read_alone, frames_read[:] = sum(frames_read), []
  together = features.extract(extractors(), source)
  total = sum(source.num_frames(i) for i in range(len(source)))
  assert sum(frames_read) == total < read_alone   # every frame once
  for name, feats in alone.items():
    np.testing.assert_allclose(together[name].features, feats.features, atol=1e-6)
