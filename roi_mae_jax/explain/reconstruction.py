"""Reconstruction by region: mask one AAL3 region at a time, score the autoencoder there.

    rows = reconstruction_by_region(pre, windows)     # windows (W, X, Y, Z, T)
    rows[0]["name"], rows[0]["mse"], rows[0]["r2"]    # sorted, best reconstructed first

For region r every token of r (all time chunks) is hidden and the rest is
visible; the MSE on r's tokens (in the model's target units) is averaged over
windows. `r2` = 1 - mse / power, where power is the mean square of the target
there (what predicting the mean, 0 in z-scored data, would score), so regions
with more signal are not penalised for it. All regions share one compiled
program: every token is a kept slot and the hidden ones are switched off by
`keep_valid` (attention ignores them, the decoder sees mask tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from roi_mae_jax.downstream import pretrained as pretrained_lib


@functools.partial(jax.jit, static_argnums=0)
def _errors(graphdef, params, window, hidden):
  """window (1, ...), hidden (C, N) bool -> (mse, power) per row of `hidden`."""
  model = nnx.merge(graphdef, params)
  tokens = model.spec.patchify(window.astype(jnp.float32))
  tokens = jnp.broadcast_to(tokens, (hidden.shape[0],) + tokens.shape[1:])
  ids = jnp.broadcast_to(jnp.arange(hidden.shape[1]), hidden.shape)
  valid = ~hidden
  prediction = model.decode(model.encode(tokens, ids, valid), ids, valid)
  target = model.target(tokens)
  weight = hidden.astype(jnp.float32)
  count = jnp.maximum(weight.sum(1), 1.0)
  mse = jnp.sum(jnp.mean((prediction - target) ** 2, -1) * weight, 1) / count
  power = jnp.sum(jnp.mean(target ** 2, -1) * weight, 1) / count
  return mse, power


def reconstruction_by_region(pre: pretrained_lib.Pretrained, windows: np.ndarray,
                             chunk: int = 16) -> list[dict]:
  """One row per region that owns a patch, best reconstructed (lowest MSE) first."""
  regions = pre.pooled_regions
  per_token = np.tile(pre.spec.patch_region, pre.spec.num_time)
  hidden = per_token[None, :] == regions[:, None]                 # (R', N)
  padded = -(-len(regions) // chunk) * chunk
  hidden = np.concatenate([hidden, np.zeros((padded - len(regions), hidden.shape[1]), bool)])
  mse = np.zeros(len(regions))
  power = np.zeros(len(regions))
  for window in windows:
    for first in range(0, padded, chunk):
      m, p = _errors(pre.graphdef, pre.params, jnp.asarray(window[None]),
                     jnp.asarray(hidden[first:first + chunk]))
      stop = min(first + chunk, len(regions))
      mse[first:stop] += np.asarray(m)[:stop - first]
      power[first:stop] += np.asarray(p)[:stop - first]
  mse, power = mse / len(windows), power / len(windows)
  rows = []
  for k, index in enumerate(regions):
    region = pre.patch_map.regions[index]
    rows.append({"id": region.id, "name": region.name, "hemisphere": region.hemisphere,
                 "system": region.system, "tokens": int(hidden[k].sum()),
                 "mse": float(mse[k]), "power": float(power[k]),
                 "r2": float(1 - mse[k] / max(power[k], 1e-12))})
  rows.sort(key=lambda r: r["mse"])
  for rank, row in enumerate(rows, start=1):
    row["rank"] = rank
  return rows
