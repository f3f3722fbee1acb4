"""The 4D masked autoencoder (Flax NNX) over brain-patch tokens.

Tokens are brain patches of p^3 voxels x pt frames (see `tokens`). The encoder
sees only the visible tokens; a lighter decoder fills in mask tokens and
predicts the voxels of every token; the loss is the MSE over masked tokens.

    spec = TokenSpec.from_patch_map(patch_map, frames=8, patch_frames=2)
    model = MaskedAutoencoder(spec, model_config("tiny"), rngs=nnx.Rngs(0))
    out = model(windows, sampler.sample_batch(key, windows.shape[0]))
    out["loss"], out["prediction"].shape  # (), (B, N, p^3 * pt)

Parameters carry logical axis names ('embed', 'mlp', 'heads', ...); the mesh
axes they map to are set in `sharding`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from roi_mae_jax import errors
from roi_mae_jax import masking
from roi_mae_jax import patches as patches_lib
from roi_mae_jax import tokens as tokens_lib

# name -> (width, depth, heads, decoder width, decoder depth, decoder heads)
SIZES = {
    "tiny": (64, 2, 2, 64, 1, 2),
    "small": (384, 12, 6, 256, 4, 4),
    "base": (768, 12, 12, 512, 4, 8),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """The `config.model` block; `size` picks widths and depths from SIZES."""
  return ml_collections.ConfigDict({
      "size": size,
      "mlp_ratio": 4,
      "pos_embedding": "sincos",   # or "learned"
      "region_embedding": True,    # add a learned code of the token's AAL3 region
      "norm_target": False,        # MAE's per-patch normalised target
      "dtype": "float32",          # compute dtype; parameters stay float32
      "attention": "",             # jax.nn.dot_product_attention implementation
  })


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: static under jit
class TokenSpec:
  """Static facts about the token layout, fixed by grid + atlas + window."""

  window_shape: tuple[int, int, int, int]  # X, Y, Z, T
  patch_size: int
  patch_frames: int
  brain_patches: np.ndarray   # (P,) indices into the patch box
  patch_grid: tuple[int, int, int]
  patch_region: np.ndarray    # (P,) region index, -1 = mixed
  num_regions: int

  @classmethod
  def from_patch_map(cls, patch_map: patches_lib.PatchMap, frames: int,
                     patch_frames: int) -> "TokenSpec":
    if frames % patch_frames:
      raise errors.InputError(
          f"frames ({frames}) must be a multiple of patches.frames ({patch_frames})")
    return cls(tuple(patch_map.atlas.grid.shape) + (frames,), patch_map.patch_size,
               patch_frames, patch_map.brain_patches, tuple(patch_map.patch_grid),
               patch_map.brain_region, patch_map.atlas.num_regions)

  @property
  def num_patches(self) -> int:
    return len(self.brain_patches)

  @property
  def num_time(self) -> int:
    return self.window_shape[3] // self.patch_frames

  @property
  def num_tokens(self) -> int:
    return self.num_time * self.num_patches

  @property
  def token_dim(self) -> int:
    return self.patch_size ** 3 * self.patch_frames

  def patchify(self, windows):
    return tokens_lib.patchify(windows, self.brain_patches, self.patch_size, self.patch_frames)

  def unpatchify(self, tokens):
    return tokens_lib.unpatchify(tokens, self.brain_patches, self.window_shape,
                                 self.patch_size, self.patch_frames)


def _param(rngs: nnx.Rngs, shape, names, scale: float | None = None) -> nnx.Param:
  """A float32 parameter with logical axis names; lecun-normal unless `scale`."""
  init = (nnx.initializers.normal(scale) if scale is not None
          else nnx.initializers.lecun_normal(in_axis=0, out_axis=tuple(range(1, len(shape)))))
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def _dense(rngs, d_in, d_out, names, dtype) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros, (names[1],)))


def _norm(rngs, width) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))


def _einsum_attention(q, k, v, mask=None):
  """Softmax attention as two einsums: on XLA's CPU backend ~1.4x faster than
  `jax.nn.dot_product_attention`, which is kept for GPUs (cuDNN) and TPUs."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nnx.Module):
  """Multi-head self-attention via `jax.nn.dot_product_attention` (cuDNN on GPU)."""

  def __init__(self, width: int, heads: int, dtype, implementation: str | None,
               rngs: nnx.Rngs):
    if width % heads:
      raise errors.InputError(f"model width {width} is not divisible by {heads} heads")
    head_dim = width // heads
    self.qkv = _param(rngs, (width, 3, heads, head_dim), ("embed", None, "heads", "kv"))
    self.out = _param(rngs, (heads, head_dim, width), ("heads", "kv", "embed"))
    self.dtype = dtype
    self.implementation = implementation or None

  def __call__(self, x, key_valid=None):
    """x (B, T, width); `key_valid` (B, T) bool: tokens others may attend to."""
    qkv = jnp.einsum("btd,dshk->sbthk", x, self.qkv[...].astype(self.dtype))
    mask = None if key_valid is None else key_valid[:, None, None, :]
    if self.implementation is None and jax.default_backend() == "cpu":
      y = _einsum_attention(qkv[0], qkv[1], qkv[2], mask)
    else:
      y = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2], mask=mask,
                                       implementation=self.implementation)
    return jnp.einsum("bthk,hkd->btd", y, self.out[...].astype(self.dtype))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, dtype, attention: str,
               rngs: nnx.Rngs):
    self.norm1 = _norm(rngs, width)
    self.attn = Attention(width, heads, dtype, attention, rngs)
    self.norm2 = _norm(rngs, width)
    self.up = _dense(rngs, width, width * mlp_ratio, ("embed", "mlp"), dtype)
    self.down = _dense(rngs, width * mlp_ratio, width, ("mlp", "embed"), dtype)
    self.dtype = dtype

  def __call__(self, x, key_valid=None):
    x = x + self.attn(self.norm1(x).astype(self.dtype), key_valid)
    h = self.up(self.norm2(x).astype(self.dtype))
    return x + self.down(jax.nn.gelu(h))


class Stack(nnx.Module):
  def __init__(self, depth: int, *args, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(*args, rngs=rngs) for _ in range(depth)])

  def __call__(self, x, key_valid=None):
    for block in self.blocks:
      x = block(x, key_valid)
    return x


class Positions(nnx.Module):
  """Factorised space + time position codes, fixed sin-cos or learned."""

  def __init__(self, spec: TokenSpec, width: int, kind: str, rngs: nnx.Rngs):
    if kind not in ("sincos", "learned"):
      raise errors.InputError(f"model.pos_embedding must be 'sincos' or 'learned', got {kind!r}")
    self.learned = kind == "learned"
    if self.learned:
      self.space = _param(rngs, (spec.num_patches, width), (None, "embed"), scale=0.02)
      self.time = _param(rngs, (spec.num_time, width), (None, "embed"), scale=0.02)
    self.spec = spec
    self.width = width

  def __call__(self):
    """(N, width) codes in time-major token order."""
    if self.learned:
      space, time = self.space[...], self.time[...]
    else:
      # Constants folded into the compiled step, not parameters.
      coords = tokens_lib.patch_coordinates(self.spec.brain_patches, self.spec.patch_grid)
      space = jnp.asarray(tokens_lib.sincos_3d(coords, self.width))
      time = jnp.asarray(tokens_lib.sincos_1d(np.arange(self.spec.num_time), self.width))
    code = time[:, None, :] + space[None, :, :]
    return code.reshape(-1, code.shape[-1])


def _take_tokens(x, ids):
  """x (B, N, D), ids (B, n) -> (B, n, D)."""
  return jnp.take_along_axis(x, ids[..., None], axis=1)


class MaskedAutoencoder(nnx.Module):
  """Encoder on visible tokens, light decoder with mask tokens, masked MSE."""

  def __init__(self, spec: TokenSpec, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # Placement is left to jit's out_shardings (see train_step), so a model can
    # also be built with no mesh at all, e.g. in a notebook.
    with nnx.use_eager_sharding(False):
      self._build(spec, config, rngs)

  def _build(self, spec: TokenSpec, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    if config.size not in SIZES:
      raise errors.InputError(f"model.size must be one of {', '.join(SIZES)}, got {config.size!r}")
    if config.dtype not in DTYPES:
      raise errors.InputError(f"model.dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    width, depth, heads, d_width, d_depth, d_heads = SIZES[config.size]
    dtype = DTYPES[config.dtype]
    self.spec = spec
    self.dtype = dtype
    self.norm_target = bool(config.norm_target)
    self.embed = _dense(rngs, spec.token_dim, width, (None, "embed"), dtype)
    self.positions = Positions(spec, width, config.pos_embedding, rngs)
    self.region = (_param(rngs, (spec.num_regions + 1, width), (None, "embed"), scale=0.02)
                   if config.region_embedding else None)
    self.encoder = Stack(depth, width, heads, config.mlp_ratio, dtype, config.attention, rngs=rngs)
    self.encoder_norm = _norm(rngs, width)
    self.to_decoder = _dense(rngs, width, d_width, ("embed", "mlp"), dtype)
    self.mask_token = _param(rngs, (d_width,), ("embed",), scale=0.02)
    self.decoder_positions = Positions(spec, d_width, config.pos_embedding, rngs)
    self.decoder = Stack(d_depth, d_width, d_heads, config.mlp_ratio, dtype, config.attention,
                         rngs=rngs)
    self.decoder_norm = _norm(rngs, d_width)
    self.head = _dense(rngs, d_width, spec.token_dim, ("embed", None), dtype)

  def token_codes(self):
    """(N, width) position (+ region) code added to every token."""
    code = self.positions()
    if self.region is not None:
      per_patch = jnp.take(self.region[...], jnp.asarray(self.spec.patch_region + 1), axis=0)
      code = code + jnp.tile(per_patch, (self.spec.num_time, 1))
    return code

  def encode(self, tokens, ids_keep, keep_valid=None):
    """Visible tokens (B, N, D) -> encoded (B, n_keep, width).

    `keep_valid` (B, n_keep) bool hides some kept slots from attention: a mask
    of any size with static shapes (reconstruction by region uses it).
    """
    # Gather first, so only the visible tokens are embedded.
    codes = jnp.take(self.token_codes().astype(self.dtype), ids_keep, axis=0)
    x = self.embed(_take_tokens(tokens, ids_keep).astype(self.dtype)) + codes
    return self.encoder_norm(self.encoder(x, keep_valid))

  def decode(self, encoded, ids_restore, keep_valid=None):
    """Encoded visible tokens -> predictions for all N tokens (B, N, D).

    Kept slots where `keep_valid` is False enter the decoder as mask tokens.
    """
    x = self.to_decoder(encoded.astype(self.dtype))
    if keep_valid is not None:
      x = jnp.where(keep_valid[..., None], x, self.mask_token[...].astype(x.dtype))
    b, n_keep, width = x.shape
    n_mask = ids_restore.shape[1] - n_keep
    fill = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n_mask, width))
    x = _take_tokens(jnp.concatenate([x, fill], axis=1), ids_restore)
    x = x + self.decoder_positions().astype(x.dtype)
    x = self.decoder_norm(self.decoder(x))
    return self.head(x.astype(self.dtype)).astype(jnp.float32)

  def target(self, tokens):
    if not self.norm_target:
      return tokens
    mean = tokens.mean(-1, keepdims=True)
    var = tokens.var(-1, keepdims=True)
    return (tokens - mean) / jnp.sqrt(var + 1e-6)

  def __call__(self, windows, masks: masking.MaskSample,
               token_weight: jax.Array | None = None) -> dict[str, Any]:
    """windows (B, X, Y, Z, T) -> dict(loss, tokens, encoded, prediction, mask, token_error).

    `token_weight` (N,) weights each token's error in the loss (region-weighted loss).
    """
    tokens = self.spec.patchify(windows.astype(jnp.float32))
    encoded = self.encode(tokens, masks.ids_keep)
    prediction = self.decode(encoded, masks.ids_restore)
    token_error = jnp.mean((prediction - self.target(tokens)) ** 2, axis=-1)
    loss = weighted_mean(token_error, masks.mask, token_weight)
    return {"loss": loss, "tokens": tokens, "encoded": encoded,
            "prediction": prediction, "mask": masks.mask, "token_error": token_error}


def weighted_mean(token_error, mask, token_weight=None):
  """Mean of (B, N) errors over the masked tokens, each weighted by `token_weight` (N,)."""
  weight = mask.astype(jnp.float32)
  if token_weight is not None:
    weight = weight * token_weight
  return jnp.sum(token_error * weight) / jnp.maximum(jnp.sum(weight), 1e-6)


def masked_mse(prediction, target, mask):
  """Mean squared error over the masked tokens only; visible tokens count 0."""
  return weighted_mean(jnp.mean((prediction - target) ** 2, axis=-1), mask)


def spec_from_config(config: ml_collections.ConfigDict,
                     patch_map: patches_lib.PatchMap) -> TokenSpec:
  return TokenSpec.from_patch_map(patch_map, config.frames, config.patches.frames)
