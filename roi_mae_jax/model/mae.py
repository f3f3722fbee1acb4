"""The 4D masked autoencoder (Flax NNX) over brain-patch tokens.

Tokens are brain patches of p^3 voxels x pt frames (see `tokens`). The encoder
sees only the visible tokens; a lighter decoder fills in mask tokens and
predicts the voxels of every token; the loss is the MSE over masked tokens.

    spec = TokenSpec.from_patch_map(patch_map, frames=8, patch_frames=2)
    model = MaskedAutoencoder(spec, model_config("tiny"), rngs=nnx.Rngs(0))
    out = model(windows, sampler.sample_batch(key, windows.shape[0]))
    out["loss"], out["prediction"].shape  # (), (B, N, p^3 * pt)
    model.encode_layers(tokens, ids, layers=(1, 2))   # (2, B, n, width): blocks' outputs

Parameters carry logical axis names ('embed', 'mlp', 'heads', ...); the mesh
axes they map to are set in `sharding`. `target` (platforms.Target) is what the
model is compiled for: it picks the attention kernel, and on CPUs switches on
the CPU-only paths (fused_layers, the float32 layer carry; see `platforms`).
On TPUs and GPUs the blocks are plain nnx modules under autodiff, remat by
named checkpoint policies and `nnx.scan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from roi_mae_jax import errors
from roi_mae_jax.brain import patches as patches_lib
from roi_mae_jax.brain import tokens as tokens_lib
from roi_mae_jax.config import validation
from roi_mae_jax.devices import platforms
from roi_mae_jax.devices import sharding
from roi_mae_jax.masking import samplers
from roi_mae_jax.model import attention as attention_lib
from roi_mae_jax.model import targets
from roi_mae_jax.model.cpu import fused_layers


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """The encoder's and the decoder's width, depth (blocks) and attention heads."""

  width: int
  depth: int
  heads: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int


# config.model.size -> ModelSize
SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(64, 2, 2, decoder_width=64, decoder_depth=1, decoder_heads=2),
    "small": ModelSize(384, 12, 6, decoder_width=256, decoder_depth=4, decoder_heads=4),
    "base": ModelSize(768, 12, 12, decoder_width=512, decoder_depth=4, decoder_heads=8),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.remat -> what a block keeps for the backward pass (None: everything).
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,   # only the block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # + weight matmuls
    # The projections' outputs by name (q/k/v, attention, MLP pre-activation):
    # layer norms and GELU are recomputed, no matmul is.
    "projections": jax.checkpoint_policies.save_only_these_names(
        "qkv", "attention", "mlp_hidden"),
}


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """The `config.model` block; `size` picks widths and depths from SIZES."""
  return ml_collections.ConfigDict({
      "size": size,
      "mlp_ratio": 4,
      "pos_embedding": "sincos",   # or "learned"
      "region_embedding": True,    # add a learned code of the token's AAL3 region
      "decoder_region_embedding": False,  # the decoder's tokens (mask tokens too) get
                                   # their own learned region code: a hidden region's
                                   # slot knows which region it must predict
      "norm_target": False,        # MAE's per-patch normalised target
      "centre_target": False,      # target minus each voxel's mean over the window: the
                                   # loss then counts fluctuation only, not static anatomy
      "target_pool": "voxel",      # "patch": the target is each token's mean over its
                                   # voxels per frame (patch_frames values), the
                                   # region-level course without the voxel detail
      "dtype": "float32",          # compute dtype; parameters stay float32
      "attention": "auto",         # attention.IMPLEMENTATIONS; auto: by backend and size
      "attention_block": 512,      # tokens per query / key tile of `chunked`
      "remat": "none",             # REMAT_POLICIES: recompute activations in backward
      "scan": False,               # encoder and decoder as a scan over stacked layers
      "mlp_chunk": 0,              # >0: the MLP runs over this many tokens at a time,
                                   # each chunk recomputed in backward
  })


def _attention(config) -> str:
  return config.get("attention", "auto") or "auto"  # '' in configs written before 'auto'


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


def _param(rngs: nnx.Rngs, shape, names, scale: float | None = None,
           fan_in_axes: int = 1) -> nnx.Param:
  """A float32 parameter with logical axis names; lecun-normal over the first
  `fan_in_axes` axes as the fan-in, unless `scale` (normal of that std)."""
  init = (nnx.initializers.normal(scale) if scale is not None
          else nnx.initializers.lecun_normal(in_axis=tuple(range(fan_in_axes)),
                                             out_axis=tuple(range(fan_in_axes, len(shape)))))
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def _linear_layer(rngs, d_in, d_out, names, dtype, target: platforms.Target) -> nnx.Linear:
  """x @ W + b in `dtype` with float32 parameters named for sharding."""
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                    dot_general=(_linear_dot_general if target.cpu_paths
                                 else jax.lax.dot_general),
                    kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros, (names[1],)))


def _linear_dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None, **kwargs):
  """nnx.Linear's x @ W through `fused_layers.matmul`, else lax.dot_general."""
  standard = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
  if lhs.dtype == rhs.dtype and standard and rhs.ndim == 2:
    return fused_layers.matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


def _layer_norm(rngs, width) -> nnx.LayerNorm:
  """Layer norm in float32, with the epsilon fused_layers.layer_norm uses."""
  return nnx.LayerNorm(width, epsilon=fused_layers.LAYER_NORM_EPSILON, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))


def _raw_params(module: nnx.LayerNorm | nnx.Linear) -> tuple[jax.Array, jax.Array]:
  """(scale, bias) of a LayerNorm, (kernel, bias) of a Linear, as arrays. The
  CPU-only path (platforms) hands them to fused_layers instead of calling the
  modules: its custom VJPs recompute layer norm and GELU in backward."""
  if isinstance(module, nnx.LayerNorm):
    return module.scale[...], module.bias[...]
  return module.kernel[...], module.bias[...]


class Attention(nnx.Module):
  """Multi-head self-attention; the kernel is chosen by `attention.attend`."""

  def __init__(self, width: int, heads: int, dtype, implementation: str, block: int,
               rngs: nnx.Rngs, target: platforms.Target):
    if width % heads:
      raise errors.InputError(f"model width {width} is not divisible by {heads} heads")
    head_dim = width // heads
    self.qkv = _param(rngs, (width, 3, heads, head_dim), ("embed", None, "heads", "kv"))
    # Every output sums over heads x head_dim inputs: that is its fan-in.
    self.out = _param(rngs, (heads, head_dim, width), ("heads", "kv", "embed"), fan_in_axes=2)
    self.dtype = dtype
    self.implementation = implementation
    self.block = block
    self.placement = target

  def __call__(self, x, norm: nnx.LayerNorm, key_valid=None):
    """Attention over norm(x) (B, T, width); `key_valid` (B, T) bool: tokens
    others may attend to. q, k, v stay interleaved (B, T, 3, H, D) and the
    attention kernel picks each head out of them (see attention.attend_packed)."""
    w_qkv, w_out = self.qkv[...], self.out[...]
    if self.placement.cpu_paths:  # the norm recomputed in backward (fused_layers)
      qkv = fused_layers.norm_dense(x, *_raw_params(norm), w_qkv.reshape(w_qkv.shape[0], -1),
                                    None, self.dtype)
      qkv = qkv.reshape(*x.shape[:2], *w_qkv.shape[1:])
    else:
      qkv = jnp.einsum("btw,wshd->btshd", norm(x).astype(self.dtype), w_qkv.astype(self.dtype))
    qkv = checkpoint_name(qkv, "qkv")
    y = attention_lib.attend_packed(qkv, key_valid, implementation=self.implementation,
                                    block=self.block, target=self.placement)
    y = checkpoint_name(y, "attention")
    if self.placement.cpu_paths:
      return fused_layers.matmul(y.reshape(*y.shape[:2], -1),
                                 w_out.reshape(-1, w_out.shape[-1]).astype(self.dtype))
    return jnp.einsum("bthd,hdw->btw", y, w_out.astype(self.dtype))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, width: int, heads: int, config: ml_collections.ConfigDict, rngs: nnx.Rngs,
               target: platforms.Target):
    dtype = DTYPES[config.dtype]
    self.norm1 = _layer_norm(rngs, width)
    self.attn = Attention(width, heads, dtype, _attention(config),
                          int(config.get("attention_block", 512)), rngs, target)
    self.norm2 = _layer_norm(rngs, width)
    hidden = width * config.mlp_ratio
    self.up = _linear_layer(rngs, width, hidden, ("embed", "mlp"), dtype, target)
    self.down = _linear_layer(rngs, hidden, width, ("mlp", "embed"), dtype, target)
    self.dtype = dtype
    self.mlp_chunk = int(config.get("mlp_chunk", 0))
    self.placement = target

  def __call__(self, x, key_valid=None):
    x = x + self.attn(_batch_sharded(x, self.placement), self.norm1, key_valid)
    x = _batch_sharded(x, self.placement)
    return _batch_sharded(x + _over_token_chunks(self._mlp, x, self.mlp_chunk), self.placement)

  def _mlp(self, x):
    if self.placement.cpu_paths:
      # Layer norm and GELU recomputed in backward (fused_layers): the backward
      # pass keeps the residual stream and the MLP's pre-activation only.
      hidden = fused_layers.norm_dense(x, *_raw_params(self.norm2), *_raw_params(self.up),
                                       self.dtype)
      hidden = checkpoint_name(hidden, "mlp_hidden")
      return fused_layers.gelu_dense(hidden, *_raw_params(self.down), self.dtype)
    hidden = checkpoint_name(self.up(self.norm2(x).astype(self.dtype)), "mlp_hidden")
    return self.down(jax.nn.gelu(hidden))


def _batch_sharded(x, target: platforms.Target):
  """x (B, ...) constrained to batch over data x fsdp, the rest replicated, as
  MaxText constrains its activations. Without it XLA may keep an activation
  sharded like the fsdp-sharded weight it meets (over 'embed') and all-reduce
  partial products of every matmul instead of gathering the weights."""
  mesh = target.mesh
  if mesh is None or mesh.size == 1:
    return x
  shards = sharding.batch_divisor(mesh)
  if x.shape[0] % shards:
    return x  # e.g. one window to encode on a data-parallel mesh
  return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))


def _over_token_chunks(fn, x, chunk: int):
  """fn (token-wise) over x (B, T, ...) in chunks of `chunk` tokens, each recomputed
  in backward: the backward pass then holds one chunk's hidden units (and, on
  CPUs, the float32 copies of a bfloat16 matmul's operands), not T's."""
  b, t = x.shape[:2]
  if not chunk or t <= chunk:
    return fn(x)
  pad = -t % chunk
  x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  chunks = jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)
  out = jax.lax.map(jax.checkpoint(fn), chunks)
  return jnp.moveaxis(out, 0, 1).reshape(b, t + pad, *out.shape[3:])[:, :t]


class Stack(nnx.Module):
  """`depth` blocks, unrolled or (config.scan) one block's code scanned over
  parameters stacked on a leading 'layers' axis, so compile time does not grow
  with depth; config.remat recomputes each block's activations in backward."""

  def __init__(self, depth: int, width: int, heads: int, config: ml_collections.ConfigDict, *,
               rngs: nnx.Rngs, target: platforms.Target):
    self.depth = depth
    self.scan = bool(config.get("scan", False))
    self.remat = config.get("remat", "none")
    self.cpu_paths = target.cpu_paths
    if self.scan:
      @nnx.split_rngs(splits=depth)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs):
        return Block(width, heads, config, rngs, target)
      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([Block(width, heads, config, rngs, target) for _ in range(depth)])

  def __call__(self, x, key_valid=None):
    return self._apply(self.blocks, x, key_valid)

  def outputs(self, x, key_valid=None, layers: tuple[int, ...] = ()) -> list:
    """The residual stream after each block listed in `layers` (0: x itself, k: after
    block k, `depth`: what `__call__` returns), in the order listed.

        first, last = stack.outputs(x, None, layers=(1, stack.depth))

    Runs the blocks only as far as the deepest listed one, segment by segment
    through the same code as `__call__` (unrolled or scanned, CPU-only paths
    or not), so the deepest output equals `__call__`'s exactly.
    """
    check_layers(layers, self.depth)
    reached, done, h = {}, 0, x
    for stop in sorted(set(layers)):
      if stop > done:
        h = self._apply(self._blocks(done, stop), h, key_valid)
        done = stop
      reached[stop] = h
    return [reached[k] for k in layers]

  def _blocks(self, start: int, stop: int):
    """Blocks start..stop-1: the stack itself when that is all of them."""
    if (start, stop) == (0, self.depth):
      return self.blocks
    if not self.scan:
      return list(self.blocks)[start:stop]
    graphdef, state = nnx.split(self.blocks)  # a stacked module over fewer layers
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))

  def _apply(self, blocks, x, key_valid=None):
    dtype = x.dtype

    def run(block, h):  # h may be carried wider than the blocks compute (see below)
      return block(h.astype(dtype), key_valid).astype(h.dtype)
    if self.remat != "none":
      # Inside a scan, CSE across iterations cannot happen: no need to prevent it.
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    if not self.scan:
      for block in blocks:
        x = run(block, x)
      return x

    if self.remat == "block" and self.cpu_paths:
      graphdef, params = nnx.split(blocks)
      apply = lambda p, h, valid: nnx.merge(graphdef, p)(h, valid)
      return fused_layers.recomputed_layers(apply, params, x, key_valid)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def layers(block, h):
      return run(block, h)
    if not self.cpu_paths:
      return layers(blocks, x)
    # The carry (each layer's saved input) is float32 holding bfloat16 values
    # exactly: XLA's CPU backend stacks and slices bfloat16 through float32 and
    # hoisted a float32 copy of the whole stack beside the bfloat16 one.
    return layers(blocks, x.astype(jnp.float32)).astype(dtype)


def check_layers(layers, depth: int) -> None:
  """Raises InputError unless `layers` lists block outputs 0..depth."""
  bad = [k for k in layers if not isinstance(k, (int, np.integer)) or not 0 <= k <= depth]
  if bad or not len(layers):
    raise errors.InputError(f"encoder layers must be 0..{depth} (0: the embedded tokens, "
                            f"{depth}: the encoder's output), got {tuple(layers)!r}")


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

  def __init__(self, spec: TokenSpec, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               target: platforms.Target | None = None):
    """`target`: what the model is compiled for (None: this host, one device)."""
    # Placement is left to jit's out_shardings (see train_step), so a model can
    # also be built with no mesh at all, e.g. in a notebook.
    with nnx.use_eager_sharding(False):
      self._build(spec, config, rngs, target or platforms.Target.host())

  def _build(self, spec: TokenSpec, config: ml_collections.ConfigDict, rngs: nnx.Rngs,
             target: platforms.Target):
    validation.validate(config, where="model")
    size = SIZES[config.size]
    width, d_width = size.width, size.decoder_width
    dtype = DTYPES[config.dtype]
    self.spec = spec
    self.dtype = dtype
    self.placement = target
    self.norm_target = bool(config.norm_target)
    self.centre_target = bool(config.get("centre_target", False))
    self.target_pool = config.get("target_pool", "voxel")
    targets.check(self.target_pool, self.norm_target)
    self.embed = _linear_layer(rngs, spec.token_dim, width, (None, "embed"), dtype, target)
    self.positions = Positions(spec, width, config.pos_embedding, rngs)
    self.region = (_param(rngs, (spec.num_regions + 1, width), (None, "embed"), scale=0.02)
                   if config.region_embedding else None)
    self.encoder = Stack(size.depth, width, size.heads, config, rngs=rngs, target=target)
    self.encoder_norm = _layer_norm(rngs, width)
    self.to_decoder = _linear_layer(rngs, width, d_width, ("embed", "mlp"), dtype, target)
    self.mask_token = _param(rngs, (d_width,), ("embed",), scale=0.02)
    self.decoder_positions = Positions(spec, d_width, config.pos_embedding, rngs)
    self.decoder_region = (_param(rngs, (spec.num_regions + 1, d_width), (None, "embed"),
                                  scale=0.02)
                           if config.get("decoder_region_embedding", False) else None)
    self.decoder = Stack(size.decoder_depth, d_width, size.decoder_heads, config, rngs=rngs,
                         target=target)
    self.decoder_norm = _layer_norm(rngs, d_width)
    self.head = _linear_layer(rngs, d_width, targets.target_dim(spec, self.target_pool),
                              ("embed", None), dtype, target)

  def token_codes(self):
    """(N, width) position (+ region) code added to every token."""
    return self._codes(self.positions(), self.region)

  def decoder_codes(self):
    """(N, decoder width) position (+ region) code added to every decoder token."""
    return self._codes(self.decoder_positions(), self.decoder_region)

  def _codes(self, code, region):
    if region is not None:  # row 0: patches no region owns
      per_patch = jnp.take(region[...], jnp.asarray(self.spec.patch_region + 1), axis=0)
      code = code + jnp.tile(per_patch, (self.spec.num_time, 1))
    return code

  def encode(self, tokens, ids_keep, keep_valid=None):
    """Visible tokens (B, N, D) -> encoded (B, n_keep, width).

    `keep_valid` (B, n_keep) bool hides some kept slots from attention: a mask
    of any size with static shapes (reconstruction by region uses it).
    """
    return self.encoder_norm(self.encoder(self._embedded(tokens, ids_keep), keep_valid))

  def encode_layers(self, tokens, ids_keep, layers: tuple[int, ...], keep_valid=None):
    """Visible tokens (B, N, D) -> (len(layers), B, n_keep, width): the encoder's
    stream after each listed block (0: the embedded tokens; the encoder's depth:
    exactly what `encode` returns), each through the encoder's final norm as
    the last block's output is (intermediate features on one scale).

        first_and_last = model.encode_layers(tokens, ids, layers=(1, 2))
    """
    outs = self.encoder.outputs(self._embedded(tokens, ids_keep), keep_valid, tuple(layers))
    return jnp.stack([self.encoder_norm(o) for o in outs])

  def _embedded(self, tokens, ids_keep):
    # Gather first, so only the visible tokens are embedded.
    codes = jnp.take(self.token_codes().astype(self.dtype), ids_keep, axis=0)
    x = self.embed(_take_tokens(tokens, ids_keep).astype(self.dtype)) + codes
    return _batch_sharded(x, self.placement)

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
    x = _batch_sharded(x + self.decoder_codes().astype(x.dtype), self.placement)
    x = self.decoder_norm(self.decoder(x))
    return self.head(x.astype(self.dtype)).astype(jnp.float32)

  def target(self, tokens):
    """tokens (B, N, p^3 pt) -> what the head is trained to predict (model.targets)."""
    return targets.reconstruction_target(tokens, self.spec, self.centre_target,
                                         self.target_pool, self.norm_target)

  def __call__(self, windows, masks: samplers.MaskSample,
               token_weight: jax.Array | None = None) -> dict[str, Any]:
    """windows (B, X, Y, Z, T) -> dict(loss, target_power, tokens, encoded, prediction, mask,
    token_error).

    `token_weight` (N,) weights each token's error in the loss (region-weighted loss).
    """
    tokens = self.spec.patchify(windows.astype(jnp.float32))
    encoded = self.encode(tokens, masks.ids_keep)
    prediction = self.decode(encoded, masks.ids_restore)
    target = self.target(tokens)
    token_error = jnp.mean((prediction - target) ** 2, axis=-1)
    loss = weighted_mean(token_error, masks.mask, token_weight)
    # The loss of predicting 0 everywhere: what `loss` is worth beside it.
    target_power = weighted_mean(jnp.mean(target ** 2, axis=-1), masks.mask, token_weight)
    return {"loss": loss, "target_power": target_power, "tokens": tokens, "encoded": encoded,
            "prediction": prediction, "mask": masks.mask, "token_error": token_error}


def stack_layers(tree: Any) -> Any:
  """A state laid out for `model.scan=False` (blocks {0: ..., 1: ...}) -> the
  `model.scan=True` layout (one block whose arrays gain a leading layer axis).

  Works on any nested dict holding parameter-shaped trees (params, AdamW moments):

      scanned_params = stack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  """
  if not isinstance(tree, dict):
    return tree
  out = {key: stack_layers(value) for key, value in tree.items()}
  blocks = out.get("blocks")
  if isinstance(blocks, dict) and blocks and all(isinstance(k, int) for k in blocks):
    out["blocks"] = jax.tree.map(lambda *layers: jnp.stack(layers),
                                 *(blocks[i] for i in sorted(blocks)))
  return out


def unstack_layers(tree: Any, depths: dict[str, int]) -> Any:
  """The inverse of `stack_layers`; `depths` maps a stack's name ('encoder',
  'decoder') to its number of blocks."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key in depths and isinstance(value, dict) and "blocks" in value:
      value = dict(value, blocks={i: jax.tree.map(lambda x, i=i: x[i], value["blocks"])
                                  for i in range(depths[key])})
    out[key] = unstack_layers(value, depths)
  return out


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
