"""Integrated gradients in JAX, with the path integral in bounded-memory chunks.

    attr, delta = integrated_gradients(logit_fn, windows, steps=64, chunk=8)
    # attr: like windows; attr.sum(axes) ~= delta = logit_fn(windows) - logit_fn(baseline)
    completeness_error(attr, delta)           # relative error per example

IG_i(x) = (x_i - x0_i) * mean over alpha of d f(x0 + alpha (x - x0)) / d x_i,
with the mean taken at `steps` midpoints of [0, 1] (exact for a linear f).
The steps run `chunk` at a time under `lax.scan`, so memory is that of
`chunk` backward passes whatever `steps` is.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


# XLA:CPU's YNNPACK fusions crash (SIGSEGV in YnnFusionThunk, jaxlib 0.10.2) on the
# scanned, batched backward pass of a classifier over clips; this program goes without.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def integrated_gradients(fn: Callable[[jax.Array], jax.Array], x: jax.Array,
                         baseline: jax.Array | None = None, steps: int = 64,
                         chunk: int = 8) -> tuple[jax.Array, jax.Array]:
  """(attributions like `x`, f(x) - f(baseline) per example).

  `fn` maps a batch (B, ...) to one scalar per example (B,), e.g. a logit;
  `baseline` defaults to zeros (the mean, in z-scored data).
  """
  return _compiled(jax.default_backend())(fn, x, baseline, steps=steps, chunk=chunk)


@functools.cache
def _compiled(backend: str):
  return jax.jit(_integrated_gradients, static_argnames=("fn", "steps", "chunk"),
                 compiler_options=_CPU_OPTIONS if backend == "cpu" else None)


def _integrated_gradients(fn, x, baseline, steps: int, chunk: int):
  x0 = jnp.zeros_like(x) if baseline is None else baseline
  chunk = max(1, min(chunk, steps))
  padded = -(-steps // chunk) * chunk
  alphas = (jnp.arange(padded) + 0.5) / steps
  weights = (jnp.arange(padded) < steps).astype(x.dtype)  # padding steps count 0
  grad_fn = jax.grad(lambda points: jnp.sum(fn(points)))
  batch = x.shape[0]
  expand = (slice(None),) + (None,) * x.ndim

  def body(total, chunk_of):
    alpha, weight = chunk_of
    points = x0[None] + alpha[expand] * (x - x0)[None]           # (chunk, B, ...)
    grads = grad_fn(points.reshape((-1,) + x.shape[1:]))
    grads = grads.reshape((alpha.shape[0], batch) + x.shape[1:])
    return total + jnp.sum(weight[expand] * grads, axis=0), None

  total, _ = jax.lax.scan(body, jnp.zeros_like(x),
                          (alphas.reshape(-1, chunk), weights.reshape(-1, chunk)))
  attributions = (x - x0) * total / steps
  return attributions, fn(x) - fn(x0)


def completeness_error(attributions, delta) -> np.ndarray:
  """|sum(attr) - delta| / max(|delta|, 1e-6) per example (0 = complete)."""
  attributions, delta = np.asarray(attributions), np.asarray(delta)
  sums = attributions.reshape(attributions.shape[0], -1).sum(axis=1)
  return np.abs(sums - delta) / np.maximum(np.abs(delta), 1e-6)
