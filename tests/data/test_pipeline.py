"""Grain pipeline over prepared shards: windows, epochs, process shares, exact resume."""

import numpy as np
import pytest

from conftest import load_config
from roi_mae_jax import errors
from roi_mae_jax.data import pipeline
from roi_mae_jax.data import shards
from roi_mae_jax.data import sources


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_windows_come_from_the_shards(prepared_dir):
  source = pipeline.ShardWindows(str(prepared_dir), frames=4)
  assert len(source) == 8 and source.grid.shape == (20, 24, 24)
  item = source.draw(3, np.random.default_rng(7))
  start = int(np.random.default_rng(7).integers(0, source.row(3)["frames"] - 4 + 1))
  data = shards.PreparedDataset(str(prepared_dir))
  np.testing.assert_array_equal(item["windows"], data.frames(3, start, 4))
  assert item["windows"].shape == (20, 24, 24, 4) and item["windows"].dtype == np.float32
  assert int(item["label"]) == source.row(3)["label"]
  assert not item["windows"][~source.brain].any()  # nothing outside the brain
  with pytest.raises(errors.InputError, match="do not fit any scan"):
    pipeline.ShardWindows(str(prepared_dir), frames=500)


def test_epochs_visit_every_scan_several_times_and_processes_are_disjoint(prepared_dir):
  source = pipeline.ShardWindows(str(prepared_dir), frames=4)
  seen = []
  for process in range(3):
    ds = pipeline.training_dataset(source, 1, seed=0, windows_per_subject=3,
                                   process_index=process, process_count=3)
    subjects = [int(b["subject"][0]) for b in _batches(pipeline.make_iterator(ds), 9)]
    share = sorted(set(subjects))
    assert share == list(range(process, 8, 3))
    assert sorted(subjects[:3 * len(share)]) == sorted(share * 3)  # one epoch
    seen += share
  assert sorted(seen) == list(range(8))


@pytest.mark.slow
@pytest.mark.parametrize("prefetch_workers", [0, 2])
def test_iterator_state_resumes_the_exact_batches(prepared_dir, prefetch_workers):
  source = pipeline.ShardWindows(str(prepared_dir), frames=4)
  ds = pipeline.training_dataset(source, 2, seed=3, windows_per_subject=2)
  first = pipeline.make_iterator(ds, prefetch_workers=prefetch_workers)
  _batches(first, 3)
  state = first.get_state()
  expected = _batches(first, 4)
  second = pipeline.make_iterator(ds, prefetch_workers=prefetch_workers)
  second.set_state(state)
  for a, b in zip(expected, _batches(second, 4)):
    np.testing.assert_array_equal(a["subject"], b["subject"])
    np.testing.assert_array_equal(a["windows"], b["windows"])
  if prefetch_workers:  # the same stream as reading in threads
    threaded = pipeline.make_iterator(ds)
    _batches(threaded, 3)
    np.testing.assert_array_equal(next(threaded)["windows"], expected[0]["windows"])
    first.close()
    second.close()


def test_training_source_checks_the_grid(prepared_dir, tmp_path):
  config = load_config("pretrain_aal3", "test")
  config.data.shards = str(prepared_dir)
  assert len(sources.training_source(config, multiple_of=4)) == 8
  config.grid.voxel_size_mm = 4.0
  with pytest.raises(errors.InputError, match=r"grid.shape=\"\(20,24,24\)\""):
    sources.training_source(config, multiple_of=4)
  config.data.shards = str(tmp_path)
  with pytest.raises(errors.InputError, match="not a prepared dataset"):
    sources.training_source(config, multiple_of=4)


@pytest.mark.parametrize("prefetch_workers", [0, 2])
def test_one_process_reading_two_streams_sees_the_two_process_batches(prepared_dir,
                                                                        prefetch_workers):
  source = pipeline.ShardWindows(str(prepared_dir), frames=4)
  one = pipeline.make_iterator(
      pipeline.training_dataset(source, 4, seed=5, windows_per_subject=2, streams=2,
                                process_index=0, process_count=1),
      prefetch_workers=prefetch_workers)
  halves = [pipeline.make_iterator(pipeline.training_dataset(
      source, 2, seed=5, windows_per_subject=2, streams=2, process_index=p, process_count=2))
            for p in range(2)]
  for batch in _batches(one, 6):  # 6 batches cross an epoch of each 4-scan stream
    parts = [next(h) for h in halves]
    for key in ("subject", "windows", "label"):
      np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
    assert set(parts[0]["subject"]) <= {0, 2, 4, 6} and set(parts[1]["subject"]) <= {1, 3, 5, 7}
  if prefetch_workers:
    one.close()
  with pytest.raises(errors.InputError, match="data.streams=3 cannot be shared by 2"):
    pipeline.training_dataset(source, 2, seed=0, streams=3, process_index=0, process_count=2)
  with pytest.raises(errors.InputError, match="batch of 3 cannot be split into its 2 streams"):
    pipeline.training_dataset(source, 3, seed=0, streams=2, process_index=0, process_count=1)
