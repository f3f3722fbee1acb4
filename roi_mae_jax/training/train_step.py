"""Optimizer, sharded train state, and the pure, jitted pretraining step.

The state is a dict of arrays: params (pure dict of the model's Params),
opt_state, step, rng (a typed key) and bad_step (-1, or the first step whose
loss or gradients were not finite; from then on updates are skipped, so the
state stays the last good one); with `mask.adaptive`, also region_error (R,),
each region's tracked reconstruction error (masking.objectives).

    setup = TrainSetup.from_config(config, mesh)          # build.parts(config) inside
    state = setup.init()                                  # born sharded
    state, metrics = setup.step(state, {"windows": batch})  # donated state
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from roi_mae_jax import metrics as metrics_lib
from roi_mae_jax.devices import platforms
from roi_mae_jax.devices import sharding as sharding_lib
from roi_mae_jax.masking import objectives
from roi_mae_jax.masking import samplers
from roi_mae_jax.model import mae as model_lib
from roi_mae_jax.training import build

State = dict[str, Any]


def optim_config() -> ml_collections.ConfigDict:
  """The `config.optim` block: AdamW with warmup + cosine decay, clipping."""
  return ml_collections.ConfigDict({
      "learning_rate": 1e-3,   # peak
      "warmup_steps": 20,
      "final_lr_ratio": 0.05,  # end of the cosine, as a share of the peak
      "weight_decay": 0.05,
      "b1": 0.9,
      "b2": 0.95,
      "clip_norm": 1.0,
  })


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.final_lr_ratio)


def make_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule):
  # No weight decay on biases, norms and the mask token (MAE convention).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask))


@dataclasses.dataclass
class TrainSetup:
  """Everything the loop needs: shardings, init, and the compiled step."""

  graphdef: Any
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  sampler: samplers.MaskSampler
  batch_size: int
  state_shardings: State
  abstract_state: State
  _init: Callable[[], State]
  step: Callable[[State, dict], tuple[State, dict]]
  parts: build.Parts | None = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  cpu_paths: bool | None = None) -> "TrainSetup":
    """The setup of `config` on `mesh`; `setup.parts` holds its patch map, spec and sampler.

    The model is compiled for the platform of `mesh`'s devices (a TPU or GPU
    topology's too, from a CPU host); `cpu_paths` (None: on for CPU meshes)
    forces the CPU-only paths on or off (see platforms)."""
    parts = build.parts(config)
    setup = cls.create(config, parts.spec, parts.sampler, mesh, cpu_paths)
    return dataclasses.replace(setup, parts=parts)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, spec: model_lib.TokenSpec,
             sampler: samplers.MaskSampler, mesh: jax.sharding.Mesh,
             cpu_paths: bool | None = None) -> "TrainSetup":
    init_key, train_key = build.parameter_keys(config)
    target = platforms.Target.of_mesh(mesh, cpu_paths)
    schedule = learning_rate_schedule(config.optim, config.total_steps)
    tx = make_optimizer(config.optim, schedule)

    def new_model(key):  # placed by the jitted init's out_shardings below
      return build.new_model(config, spec, key, target)

    abstract_model = nnx.eval_shape(lambda: new_model(init_key))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    param_shardings = sharding_lib.param_shardings(abstract_params, mesh)
    replicated = sharding_lib.replicated(mesh)

    adaptive = objectives.AdaptiveRegions.from_config(config, sampler.patch_map,
                                                             sampler.num_time)
    token_weight = objectives.token_loss_weights(config, sampler.patch_map,
                                                        sampler.num_time)

    def init() -> State:
      params = nnx.to_pure_dict(nnx.state(new_model(init_key), nnx.Param))
      state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
               "rng": train_key, "bad_step": jnp.int32(-1)}
      if adaptive is not None:
        state["region_error"] = adaptive.initial()
      return state

    abstract = jax.eval_shape(init)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract["opt_state"], param_shardings,
        transform_non_params=lambda _: replicated)
    shardings = {"params": param_shardings, "opt_state": opt_shardings,
                 "step": replicated, "rng": replicated, "bad_step": replicated}
    if adaptive is not None:
      shardings["region_error"] = replicated
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    batch_size = int(config.batch_size)
    step = jax.jit(
        make_step_fn(graphdef, tx, schedule, sampler, batch_size, token_weight, adaptive,
                     objectives.visible_weight(config)),
        in_shardings=(shardings, {"windows": sharding_lib.batch_sharding(mesh)}),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
        compiler_options=compiler_options(mesh))
    return cls(graphdef, mesh, tx, schedule, sampler, batch_size, shardings, abstract,
               jax.jit(init, out_shardings=shardings), step)

  def init(self) -> State:
    """A new state (parameters, AdamW moments, step, key), placed by its shardings."""
    return self._init()

  def compile(self, state: State, batch: dict) -> tuple[Any, dict]:
    """(the step compiled ahead of time for `state` and `batch`'s shapes, what
    XLA says of it: 'flops' per device and 'memory', its memory analysis or None):

        compiled, facts = setup.compile(state, batch)
        state, metrics = compiled(state, batch)   # state is donated

    jit's own trace of the step, init's executable (a later `init()` compiles
    it again) and the heap that compiling and analysing freed are let go, so
    they do not add to the host memory of the steps."""
    self._init.clear_cache()  # first: compiling reuses what it held
    compiled = self.step.lower(state, batch).compile()
    self.step.clear_cache()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    facts = {"flops": float(cost.get("flops", float("nan"))),
             "memory": compiled.memory_analysis()}
    metrics_lib.release_freed_host_memory()  # after the analyses: they allocate too
    return compiled, facts

  def model(self, state: State) -> model_lib.MaskedAutoencoder:
    """The NNX model holding `state`'s parameters (for plots, probes, attribution)."""
    return nnx.merge(self.graphdef, state["params"])


def compiler_options(mesh: jax.sharding.Mesh) -> dict[str, str] | None:
  """XLA options for the step on `mesh`'s platform. On CPUs, the scheduler that
  orders work to keep fewer buffers alive, for fewer temporaries at the same
  speed (XLA's default CPU scheduler orders for concurrency on many cores)."""
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  return None


def make_step_fn(graphdef, tx, schedule, sampler: samplers.MaskSampler, batch_size: int,
                 token_weight: np.ndarray | None = None,
                 adaptive: objectives.AdaptiveRegions | None = None,
                 visible_weight: float = 0.0,
                 ) -> Callable[[State, dict], tuple[State, dict]]:
  """The pure step `(state, batch) -> (state, metrics)` for jit.

  `token_weight` (N,): the region-weighted loss; `adaptive`: masks drawn in
  proportion to state["region_error"], which the step then updates;
  `visible_weight`: the visible tokens' reconstruction error joins the loss.
  """
  weight = None if token_weight is None else jnp.asarray(token_weight)

  def loss_fn(params, windows, masks):
    out = nnx.merge(graphdef, params)(windows, masks, weight)
    loss = out["loss"]
    if visible_weight:
      loss = loss + visible_weight * model_lib.weighted_mean(out["token_error"], ~masks.mask,
                                                             weight)
    return loss, out

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    step = state["step"]
    scale = None if adaptive is None else state["region_error"]
    masks = sampler.sample_batch(jax.random.fold_in(state["rng"], step), batch_size, scale)
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], batch["windows"], masks)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state["bad_step"] < 0)

    # A branch, not a select of new and old: the update then writes the donated
    # parameters and moments in place, and no pass picks between two copies.
    def update(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    params, opt_state = jax.lax.cond(ok, update, lambda p, o, g: (p, o),
                                     state["params"], state["opt_state"], grads)
    new_state = {
        "params": params,
        "opt_state": opt_state,
        "step": step + 1,
        "rng": state["rng"],
        "bad_step": jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], step),
    }
    if adaptive is not None:
      tracked = adaptive.update(state["region_error"], out["token_error"], masks.mask)
      new_state["region_error"] = jnp.where(ok, tracked, state["region_error"])
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "masked_loss": out["loss"], "target_power": out["target_power"],
               "param_norm": optax.tree.norm(new_state["params"]),
               "learning_rate": schedule(step)}
    return new_state, metrics

  return train_step
