"""bfloat16 arrays that loops slice, kept bfloat16-sized on every backend.

XLA's CPU backend slices a bfloat16 array inside a loop (a scan's xs, or a
stack saved for the backward pass) through a float32 copy of the whole array,
made once outside the loop: twice the memory of the array, for as long as the
loop runs. The array's uint16 bits slice in place, and a bitcast costs nothing:

    xs = scan_slices.packed(x)                    # before jax.lax.scan
    def body(carry, x_i):
      x_i = scan_slices.unpacked(x_i, x.dtype)    # inside: bfloat16 again
      ...

Bitcasts carry no gradient: pack only inside a custom_vjp's own passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def packed(x: jax.Array) -> jax.Array:
  """bfloat16 -> its uint16 bits; any other dtype unchanged."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def unpacked(x: jax.Array, dtype) -> jax.Array:
  """The inverse of `packed` for an array that was `dtype`."""
  return x if x.dtype == jnp.dtype(dtype) else jax.lax.bitcast_convert_type(x, dtype)
