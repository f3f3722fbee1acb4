"""Reconstruction read-out: what the autoencoder cannot predict of each region, per subject.

    extractor = ReconstructionFeatures(pre)                  # parts "power+corr"
    feats = extractor(source)                                # SubjectFeatures (S, F)
    sets = features.extract({"recon": extractor,
                             "init_recon": ReconstructionFeatures(random_init(pre))}, source)

Only a pretrained model has a decoder that predicts hidden regions from the
rest of the brain; a region that decouples from its network becomes harder to
predict. Regions are hidden in fixed draws like the pretraining's region
masking: each of `rounds` rounds is a seeded permutation of the pooled regions
cut into round(1 / mask ratio) groups, one draw per group, so every region is
hidden exactly `rounds` times per window and every subject sees the same
draws. Hidden tokens stay in their slots, switched off in attention and
replaced by mask tokens in the decoder (as `explain.reconstruction`), so one
compiled program serves every draw.

For hidden region r and frame f of a window, e_r(f) is the mean over r's
tokens of target - prediction and x_s(f) the mean target of region s (model
target units); both are centred over the window's frames (the static anatomy
and a constant offset of the prediction are not fluctuation). Over the
subject's windows and the draws that hide r:

  power  log(sum e_r^2 / sum x_r^2): residual power relative to the region's own  (R')
  corr   Fisher z of corr(e_r, x_s) for every region s (row r, column s)          (R' x R')

Parts join with '+' ("power+corr"). Windows are consecutive and do not overlap
(`max_windows` > 0 keeps that many per scan); `batch_size` windows x all draws
go through the model per call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from roi_mae_jax import errors
from roi_mae_jax.downstream import features as features_lib
from roi_mae_jax.downstream import pretrained as pretrained_lib

PARTS = ("power", "corr")
_EPS = 1e-8


def check_parts(parts: str) -> list[str]:
  """'power+corr' -> its parts; a bad name is an InputError."""
  chosen = [p.strip() for p in str(parts).split("+") if p.strip()]
  if not chosen or any(p not in PARTS for p in chosen) or len(set(chosen)) != len(chosen):
    raise errors.InputError(f"reconstruction parts must be {', '.join(PARTS)} joined by '+', "
                            f"got {parts!r}")
  return chosen


def region_draws(num_regions: int, ratio: float, rounds: int, seed: int = 0) -> np.ndarray:
  """(rounds * groups, num_regions) bool: each round a permutation cut into
  groups = round(1 / ratio) draws, so each region is hidden once per round."""
  if rounds < 1:
    raise errors.InputError(f"reconstruction rounds must be >= 1, got {rounds}")
  groups = max(2, int(round(1.0 / ratio)))
  rng = np.random.default_rng([seed, 0x5EC])
  draws = []
  for _ in range(rounds):
    for part in np.array_split(rng.permutation(num_regions), groups):
      hidden = np.zeros(num_regions, bool)
      hidden[part] = True
      draws.append(hidden)
  return np.stack(draws)


@functools.partial(jax.jit, static_argnums=0)
def _residual_courses(graphdef, params, pooling, hidden, windows):
  """windows (B, ...), hidden (D, N) -> residuals e (B, D, T, R'), targets x (B, T, R'),
  region means per frame, centred over each window's frames."""
  model = nnx.merge(graphdef, params)
  spec = model.spec
  tokens = spec.patchify(windows.astype(jnp.float32))          # (B, N, p^3 pt)
  target = model.target(tokens)
  b, d, n = tokens.shape[0], hidden.shape[0], tokens.shape[1]
  rows = jnp.repeat(tokens, d, axis=0)                          # window-major, draw-minor
  ids = jnp.broadcast_to(jnp.arange(n), (b * d, n))
  valid = jnp.tile(~hidden, (b, 1))
  prediction = model.decode(model.encode(rows, ids, valid), ids, valid)
  residual = jnp.repeat(target, d, axis=0) - prediction

  def by_region(v):  # (M, N, p^3 pt) -> (M, T, R'): region means per frame, centred
    v = v.reshape(v.shape[0], spec.num_time, spec.num_patches, -1, spec.patch_frames)
    per_frame = jnp.einsum("mtpf,pr->mtfr", v.mean(3), pooling)
    per_frame = per_frame.reshape(v.shape[0], -1, pooling.shape[1])
    return per_frame - per_frame.mean(1, keepdims=True)
  return by_region(residual).reshape(b, d, -1, pooling.shape[1]), by_region(target)


def subject_features(e: np.ndarray, x: np.ndarray, hidden: np.ndarray,
                     parts: list[str]) -> np.ndarray:
  """Residuals e (W, D, T, R'), targets x (W, T, R'), draws hidden (D, R') -> (F,)."""
  h = hidden.astype(np.float64)
  e, x = e.astype(np.float64), x.astype(np.float64)
  residual_power = np.einsum("dr,wdtr->r", h, e ** 2)
  times_hidden = h.sum(0)                                   # draws that hide each region
  own_power = np.einsum("wts->s", x ** 2)                   # per region, over all frames
  out = []
  for part in parts:
    if part == "power":
      out.append(np.log((residual_power + _EPS) / (times_hidden * own_power + _EPS)))
    else:
      cov = np.einsum("dr,wdtr,wts->rs", h, e, x)
      norm = np.sqrt(residual_power[:, None] * times_hidden[:, None] * own_power[None] + _EPS)
      out.append(np.arctanh(np.clip(cov / norm, -0.999, 0.999)).reshape(-1))
  return np.concatenate(out).astype(np.float32)


class ReconstructionFeatures:
  """A pretrained (or `random_init`) autoencoder's reconstruction residuals by region."""

  def __init__(self, pre: pretrained_lib.Pretrained, parts: str = "power+corr",
               rounds: int = 2, batch_size: int = 4, max_windows: int = 0, seed: int = 0,
               name: str = "recon"):
    self.pre, self.parts, self.name = pre, check_parts(parts), name
    self.batch_size, self.max_windows = int(batch_size), int(max_windows)
    regions = pre.pooled_regions
    self.hidden_regions = region_draws(len(regions), float(pre.config.mask.ratio),
                                       int(rounds), seed)           # (D, R')
    per_token = np.tile(pre.spec.patch_region, pre.spec.num_time)
    owned = per_token >= 0                                          # mixed patches: never hidden
    owner = np.searchsorted(regions, per_token[owned])              # token -> pooled index
    self.hidden_tokens = np.zeros((len(self.hidden_regions), len(per_token)), bool)
    self.hidden_tokens[:, owned] = self.hidden_regions[:, owner]
    self._pooling = jnp.asarray(pre.patch_pooling)

  @property
  def draws(self) -> int:
    return len(self.hidden_regions)

  def check(self, source) -> None:
    if source.frames != self.pre.config.frames:
      raise errors.InputError(f"the data give windows of {source.frames} frames but the "
                              f"autoencoder was pretrained on {self.pre.config.frames}")

  def windows(self, source, scan: int) -> list[int]:
    return features_lib.window_starts(source.num_frames(scan), source.frames, 0,
                                      self.max_windows)

  def scan_part(self, source, scan: int) -> tuple[np.ndarray, np.ndarray]:
    """(e (W, D, T, R'), x (W, T, R')) of one scan's windows, in fixed-size batches."""
    es, xs = [], []
    hidden = jnp.asarray(self.hidden_tokens)
    for windows, n in features_lib.window_batches(source, scan, self.windows(source, scan),
                                                  self.batch_size):
      e, x = jax.device_get(_residual_courses(self.pre.graphdef, self.pre.params,
                                              self._pooling, hidden, jnp.asarray(windows)))
      es.append(e[:n])
      xs.append(x[:n])
    return np.concatenate(es), np.concatenate(xs)

  def subject_row(self, source, scans: list[int], parts: list) -> tuple[np.ndarray, int]:
    e = np.concatenate([p[0] for p in parts])
    x = np.concatenate([p[1] for p in parts])
    return (subject_features(e, x, self.hidden_regions, self.parts),
            sum(len(self.windows(source, i)) for i in scans))

  def __call__(self, source, labelled_only: bool = True) -> features_lib.SubjectFeatures:
    return features_lib.extract({self.name: self}, source, labelled_only)[self.name]
