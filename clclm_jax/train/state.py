"""The train state: a plain dict of trainable params, optimizer state, step and random key.

The frozen (int8) base is not part of it: `split_model` keeps it apart so it is never
differentiated, donated or saved.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from clclm_jax.train import sharding

TrainState = dict[str, Any]  # {"params": nnx.State, "opt_state": ..., "step": int32[], "rng": uint32[2]}


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable nnx.Param state, everything else)."""
  return nnx.split(model, nnx.Param, ...)


def make_schedule(config) -> optax.Schedule:
  """Linear warm-up to `lr`, then `schedule` ('constant', 'linear' or 'cosine') over `total_steps`."""
  warmup, total = config.warmup_steps, max(config.total_steps, config.warmup_steps + 1)
  decay = {
      "constant": optax.constant_schedule(config.lr),
      "linear": optax.linear_schedule(config.lr, 0.0, total - warmup),
      "cosine": optax.cosine_decay_schedule(config.lr, total - warmup),
  }
  if config.schedule not in decay:
    raise ValueError(f"config.optim.schedule={config.schedule!r}: use one of {sorted(decay)}")
  return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay[config.schedule]], [warmup])


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with the warm-up schedule and global-norm gradient clipping (config = config.optim; no clipping when
  `max_grad_norm` <= 0)."""
  adamw = optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  if config.max_grad_norm <= 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh):
  """Shardings of the whole train state: optimizer moments follow their parameters."""
  params_sh = sharding.state_sharding(params, mesh)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), params_sh,
      transform_non_params=lambda _: rep, is_leaf=_is_var)
  return {"params": params_sh, "opt_state": opt_sh, "step": rep, "rng": rep}


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int, mesh: Mesh) -> TrainState:
  """A fresh state placed on the mesh."""
  shardings = state_shardings(params, tx, mesh)
  params = sharding.put(params, shardings["params"])
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  step, rng = sharding.put((jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)),
                           (shardings["step"], shardings["rng"]))
  return {"params": params, "opt_state": opt_state, "step": step, "rng": rng}
