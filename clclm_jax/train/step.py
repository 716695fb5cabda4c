"""A pure train step over the trainable state; losses are looked up by name in a small registry."""

from collections.abc import Callable, Mapping, Sequence
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from clclm_jax.train import sharding
from clclm_jax.train.state import TrainState

LossFn = Callable[..., jax.Array | dict[str, jax.Array]]
LOSSES: dict[str, LossFn] = {}
SHARED: dict[str, tuple[str, ...]] = {}  # name -> every name its function computes
PER_TOKEN: set[str] = set()  # losses that are means over the batch's target tokens (`loss_mask`)


def register_loss(*names: str, per_token: Sequence[str] = ()) -> Callable[[LossFn], LossFn]:
  """Adds `fn(model, batch, key) -> scalar` to the registry under one name; under several names,
  `fn(model, batch, key, names) -> {name: scalar}` computes the asked terms together (one shared forward).
  `per_token` names the ones that are means over the target tokens: accumulated micro-batches weigh by them."""
  def add(fn: LossFn) -> LossFn:
    for name in names:
      if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
      LOSSES[name], SHARED[name] = fn, names
      if name in per_token:
        PER_TOKEN.add(name)
    return fn
  return add


def loss_terms(model: nnx.Module, batch: Mapping[str, jax.Array], key: jax.Array,
               names: Sequence[str]) -> dict[str, jax.Array]:
  """{name: loss} for `names` (no dropout when `key` is None); a function registered under several runs once."""
  names, terms = sorted(names), {}
  for i, name in enumerate(names):
    if name in terms:
      continue
    fn, k = LOSSES[name], None if key is None else jax.random.fold_in(key, i)
    if len(SHARED[name]) == 1:
      terms[name] = fn(model, batch, k)
    else:
      terms.update(fn(model, batch, k, tuple(n for n in names if n in SHARED[name])))
  return terms


def attention_mask(batch: Mapping[str, jax.Array]) -> jax.Array | None:
  """Segment ids when the batch is packed, else the padding mask."""
  return batch["segment_ids"] if "segment_ids" in batch else batch.get("attention_mask")


@register_loss("lm", per_token=("lm",))
def lm_loss(model: nnx.Module, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """Next-token cross-entropy averaged over the tokens where `loss_mask` is 1."""
  tokens_bt = batch["tokens"]
  h_btd = model.hidden_states(tokens_bt, batch.get("positions"), attention_mask(batch), dropout_key=key)
  b, t, d = h_btd.shape
  ce_bt = model.token_nll(h_btd[:, :-1].reshape(-1, d), tokens_bt[:, 1:].reshape(-1)).reshape(b, t - 1)
  w_bt = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return jnp.sum(ce_bt * w_bt) / jnp.maximum(jnp.sum(w_bt), 1.0)


def target_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Tokens a per-token loss averages over: `loss_mask` after the first position (float32 scalar)."""
  return jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))


def _loss_terms(params, frozen, micro, key, token_share, *, graphdef, loss_weights, accum_steps):
  """This micro-batch's share of the batch objective: per-token terms scaled by its share of the batch's
  target tokens, the others by 1 / accum_steps; summed over micro-batches they are the whole batch's terms."""
  model = nnx.merge(graphdef, params, frozen)
  terms = loss_terms(model, micro, key, list(loss_weights))
  terms = {n: v * (token_share if n in PER_TOKEN else 1.0 / accum_steps) for n, v in terms.items()}
  total = sum(loss_weights[name] * terms[name] for name in terms)
  return total, terms


def _split_micro(x: jax.Array, accum_steps: int) -> jax.Array:
  """[B, ...] -> [accum, B / accum, ...] taking rows i::accum, so the batch split stays put."""
  x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
  return sharding.constrain(jnp.swapaxes(x, 0, 1), (None, "batch"))


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: nnx.State, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               loss_weights: Mapping[str, float], accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One optimizer update from a global batch of `accum_steps` micro-batches: the gradient of the whole
  batch's objective, so micro-batches holding more answer tokens weigh more in the per-token losses."""
  rng, step_key = jax.random.split(state["rng"])
  grad_fn = jax.value_and_grad(functools.partial(_loss_terms, graphdef=graphdef, loss_weights=loss_weights,
                                                 accum_steps=accum_steps), has_aux=True)
  micro_bs = jax.tree.map(functools.partial(_split_micro, accum_steps=accum_steps), batch)
  if "loss_mask" in batch:
    tokens_a = jax.vmap(target_tokens)(micro_bs)
    share_a = tokens_a / jnp.maximum(jnp.sum(tokens_a), 1.0)
  else:
    share_a = jnp.full((accum_steps,), 1.0 / accum_steps)

  def accumulate(carry, xs):
    i, micro, share = xs
    (loss, terms), grads = grad_fn(state["params"], frozen, micro, jax.random.fold_in(step_key, i), share)
    return jax.tree.map(jnp.add, carry, (grads, loss, terms)), None

  zeros = jax.tree.map(jnp.zeros_like, (state["params"], jnp.zeros(()), {n: jnp.zeros(()) for n in loss_weights}))
  (grads, loss, terms), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro_bs, share_a))

  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             **{f"loss/{name}": value for name, value in terms.items()}}
  new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
  return new_state, metrics


def _with_frozen(step_fn, frozen, state, batch):
  return step_fn(state, batch, frozen)


def jit_train_step(graphdef: nnx.GraphDef, frozen_sh, tx: optax.GradientTransformation, state_sh, mesh: Mesh,
                   *, loss_weights: Mapping[str, float], accum_steps: int = 1):
  """`train_step(state, batch, frozen)` jitted with explicit shardings and a donated state."""
  unknown = set(loss_weights) - set(LOSSES)
  if unknown:
    raise ValueError(f"config.loss_weights names unknown losses {sorted(unknown)}; known: {sorted(LOSSES)}")
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, loss_weights=dict(loss_weights),
                        accum_steps=accum_steps),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), frozen_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=0)


def compile_train_step(graphdef: nnx.GraphDef, frozen: nnx.State, tx: optax.GradientTransformation,
                       state_sh, mesh: Mesh, *, loss_weights: Mapping[str, float],
                       accum_steps: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`jit_train_step` with the frozen base placed on the mesh and bound: `(state, batch) -> (state, metrics)`."""
  frozen_sh = sharding.state_sharding(frozen, mesh)
  step_fn = jit_train_step(graphdef, frozen_sh, tx, state_sh, mesh, loss_weights=loss_weights,
                           accum_steps=accum_steps)
  return functools.partial(_with_frozen, step_fn, sharding.put(frozen, frozen_sh))
