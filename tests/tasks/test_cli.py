"""The CLI: task dispatch, one-line errors, show_masks output, the bench."""

import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import show_masks
from roi_mae_jax import errors
from roi_mae_jax import tasks
from roi_mae_jax.bench import __main__ as bench_main
from roi_mae_jax.bench import overview
from tests.conftest import REPO, load_config


def _cli(*args, cwd=REPO, platforms="cpu"):
  env = dict(os.environ, JAX_PLATFORMS=platforms)
  return subprocess.run([sys.executable, "-m", "roi_mae_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_show_masks_writes_png_and_summary(tmp_path):
  workdir = str(tmp_path / "masks")
  # No JAX_PLATFORMS: JAX probes every backend, as on a user's machine.
  done = _cli("--config=configs/show_masks.py", f"--workdir={workdir}",
              "--config.mask.ratio=0.75", "--config.frames=4", platforms="")
  assert done.returncode == 0, done.stderr
  # Short log lines (time + message), no absl prefix, no backend chatter.
  short = [l for l in done.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d \S", l)]
  assert short[0].endswith(f"task show_masks, workdir {workdir}"), done.stderr
  assert any(" grid 40x48x44 at 4x4x4 mm" in l for l in short), done.stderr
  assert not re.search(r"^[IWE]\d{4} ", done.stderr, re.M), done.stderr
  assert "Unable to initialize backend" not in done.stderr
  png = os.path.join(workdir, "masks.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 50_000
  with open(os.path.join(workdir, "masks_summary.json")) as f:
    summary = json.load(f)
  assert set(summary["strategies"]) == {"random", "tube", "roi", "roi_time"}
  assert summary["tokens_brain"] == summary["patches_brain"] * 4
  roi = summary["strategies"]["roi"]
  assert roi["regions"]["partial"] <= 1 and roi["regions"]["whole"] > 10
  assert roi["masked_tokens"] == pytest.approx(0.75 * summary["tokens_brain"], abs=4)

  again = _cli("--config=configs/show_masks.py", f"--workdir={workdir}", "--verbose")
  assert again.returncode == 2
  assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ main\.py:\d+\] task show_masks",
                   again.stderr, re.M), again.stderr
  assert "already exist" in again.stderr and "overwrite=True" in again.stderr
  assert "Traceback" not in again.stderr


def test_unknown_task_is_one_line_on_stderr(tmp_path):
  done = _cli("--config=configs/show_masks.py", f"--workdir={tmp_path}",
              "--config.task=pretrainn")
  assert done.returncode == 2
  lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: unknown task 'pretrainn'; config.task must be one of: attribute, "
                   "compare, finetune, pair_probes, prepare, pretrain, probe, show_masks, "
                   "synthesize"]
  assert "Traceback" not in done.stderr


def test_missing_required_keys_are_named(tmp_path):
  config = ml_collections.ConfigDict({"task": "show_masks", "seed": 0, "frames": 4,
                                      "mask": {"ratio": 0.5}})
  with pytest.raises(errors.InputError) as info:
    tasks.run_task(config, str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  for key in ("grid.voxel_size_mm", "patches.size", "show.strategies"):
    assert key in message
  assert "mask.ratio" not in message


def test_config_variant_and_bad_variant():
  assert show_masks.get_config("paper").grid.shape == (96, 96, 96)
  assert show_masks.get_config().grid.voxel_size_mm == 4.0
  with pytest.raises(ValueError, match="variant"):
    show_masks.get_config("huge")
  assert "python -m roi_mae_jax.main --config=configs/show_masks.py" in show_masks.__doc__


def test_bench_masks_prints_figures(tmp_path, capsys):
  out = tmp_path / "bench.json"
  code = bench_main.main(["masks", "--voxel_size_mm=4", "--grid", "40", "48", "44",
                          "--patch=4", "--frames=3", "--batch=2", "--repeats=2",
                          "--strategies=roi,random", f"--json={out}"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "tokens per window" in printed and "roi" in printed
  figures = json.loads(out.read_text())["masks"]
  assert figures["tokens_all"] == 1320 * 3
  assert figures["tokens_brain"] < figures["tokens_all"]
  assert figures["strategies"]["roi"]["median_ms"] > 0


@pytest.mark.slow
def test_bench_train_prints_mfu_and_flops(tmp_path, capsys):
  out = tmp_path / "bench.json"
  config = os.path.join(REPO, "configs", "pretrain_aal3.py") + ":test"
  code = bench_main.main(["train", f"--config={config}", "--size=tiny", "--steps=1",
                          "--peak_size=256", "--vs_dtype=bfloat16", f"--json={out}"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "MFU" in printed and "tokens/s" in printed and "host peak RSS" in printed
  figures = json.loads(out.read_text())["train"]
  assert figures["vs_dtype"]["dtype"] == "bfloat16" and figures["vs_dtype"]["step_s"] > 0
  assert figures["host_peak_rss_mib"] > 0
  assert 0 < figures["mfu"] and figures["step_s"] > 0
  assert 0 < figures["mfu_cpu"] and figures["step_cpu_s"] > 0 and "by CPU time" in printed
  # The analytic count (matmuls only) is close to XLA's count. Not always below it:
  # XLA counts a loop's body once, and `dense` attention loops over heads.
  assert 0.5 < figures["model_flops_per_step"] / figures["xla_flops_per_step"] < 2.0
  assert figures["tokens_brain"] < figures["tokens_box"]
  # The step's matmuls timed one by one, on one device: forward and backward,
  # less the patch embedding's input gradient, plus the recomputed logits.
  ceiling = figures["matmul_ceiling"]
  assert "MFU ceiling" in printed and "matmuls alone" in printed
  assert 0 < ceiling["seconds"] and ceiling["share"] == pytest.approx(
      ceiling["seconds"] / figures["step_s"])
  per_device = figures["model_flops_per_step"] / figures["devices"]
  assert 0.9 * per_device < ceiling["flops"] < 1.2 * per_device


@pytest.mark.slow
def test_bench_data_prints_throughput_and_input_wait(tmp_path, capsys):
  out = tmp_path / "bench.json"
  configs = os.path.join(REPO, "configs")
  code = bench_main.main([
      "data", "--subjects=2", "--run_frames=8", "--workers=0", "--batches=2", "--steps=1",
      "--size=tiny", f"--prepare_config={configs}/prepare.py:test",
      f"--train_config={configs}/pretrain_aal3.py:test", f"--json={out}"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "subjects/min" in printed and "input wait" in printed
  figures = json.loads(out.read_text())["data"]
  assert figures["subjects"] == 2 and figures["subjects_per_min"] > 0
  assert figures["pipeline_windows_per_s"] > 0 and 0 <= figures["input_wait_share"] < 1
  assert figures["peak_rss_main_mib"] > 0


@pytest.mark.slow
def test_bench_without_a_part_reports_every_headline_figure(tmp_path, capsys):
  out = tmp_path / "bench.json"
  config = os.path.join(REPO, "configs", "pretrain_aal3.py") + ":test"
  code = bench_main.main([f"--config={config}", "--size=tiny", "--steps=2", "--peak_size=256",
                          "--mask_repeats=2", "--memory_config=", f"--json={out}"])
  assert code == 0
  printed = capsys.readouterr().out
  for line in ("step time", "tokens/s", "MFU", "MFU ceiling", "mask sampling", "waiting for data",
               "brain-only tokens", "memory per step", "host peak RSS"):
    assert line in printed, line
  figures = json.loads(out.read_text())["all"]
  assert figures["step_s"] > 0 and 0 < figures["mfu"] < 1.5
  assert 0 < figures["mask_sampling_share"] < 1 and 0 <= figures["data_wait_share"] < 1
  assert figures["tokens_saved"] == pytest.approx(1 - figures["tokens_brain"] / figures["tokens_box"])
  assert figures["step_memory_bytes"] > 0 and figures["host_peak_rss_mib"] > 0


@pytest.mark.slow
def test_bench_memory_prints_memory_per_window_and_largest_batches(tmp_path, capsys):
  out = tmp_path / "bench.json"
  config = os.path.join(REPO, "configs", "pretrain_aal3.py") + ":test"
  code = bench_main.main(["memory", f"--memory_config={config}",
                          "--memory_attention=reference,cudnn", "--memory_remat=block",
                          f"--json={out}"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "per window" in printed and "n/a (needs gpu)" in printed and "scanned layers" in printed
  figures = json.loads(out.read_text())["memory"]
  row = figures["rows"]["reference/block"]
  assert row["window_bytes"] > 0 and row["fixed_bytes"] > 0
  assert row["step_bytes_2"] == row["fixed_bytes"] + 2 * row["window_bytes"]
  assert row["largest_batch"]["80 GiB (H100)"] > row["largest_batch"]["16 GiB (TPU v5e)"] > 0
  assert figures["rows"]["cudnn/block"] == {"error": "needs gpu"}
  assert set(figures["compile_s"]) == {"unrolled", "scan"}


def test_memory_not_affine_in_the_batch_counts_only_the_measured_points(monkeypatch):
  from roi_mae_jax.bench import memory  # pylint: disable=g-import-not-at-top
  gib = 2**30
  sizes = {1: 65 * gib, 2: 155 * gib}  # a second window costing more than the first step
  monkeypatch.setattr(memory, "compiled_step",
                      lambda config, batch: {"step_memory_bytes": sizes[batch], "compile_s": 1.0})
  row = memory.per_window(None)
  assert row["fixed_bytes"] is None and row["window_bytes"] == 90 * gib
  assert row["largest_batch"] == {"80 GiB (H100)": 1, "16 GiB (TPU v5e)": 0}


@pytest.mark.slow
def test_largest_batch_search_and_the_compiled_memory_it_uses(monkeypatch):
  assert overview.largest_batch(lambda b: b <= 37, start=8) == 37
  assert overview.largest_batch(lambda b: b <= 5, start=8) == 5
  assert overview.largest_batch(lambda b: False, start=8) == 0
  assert overview.largest_batch(lambda b: True, start=8, limit=64) == 64
  # The CPU reports no memory limit: search against a made-up one between what
  # batches 1 and 2 per device need (the compiled step's memory grows with the batch).
  config = load_config("pretrain_aal3", "test")
  config.model.size = "tiny"
  measure = overview.step_memory
  need = {b: measure(config, b) for b in (1, 2)}
  assert 0 < need[1] < need[2]
  monkeypatch.setattr(overview, "step_memory", lambda _, b: need[b])  # no compile twice
  fits = overview.fits_in(config, limit_bytes=(need[1] + need[2]) / 2 / 0.9)
  assert overview.largest_batch(fits, start=1) == 1
