"""train_step: deterministic, accumulation-consistent, trains only LoRA, losses by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import train_helpers
from clclm_jax.train import sharding, state as state_lib, step as step_lib


def _run(model, batches, *, accum_steps=1, loss_weights=None, seed=0):
  graphdef, params, frozen = state_lib.split_model(model)
  tx = state_lib.make_optimizer(train_helpers.optim_config())
  mesh = sharding.make_mesh((-1, 1, 1))
  state = state_lib.init_state(params, tx, seed=seed, mesh=mesh)
  step = step_lib.compile_train_step(graphdef, frozen, tx, state_lib.state_shardings(params, tx, mesh), mesh,
                                     loss_weights=loss_weights or {"lm": 1.0}, accum_steps=accum_steps)
  history = []
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return state, history, frozen


def test_step_is_deterministic_and_trains_only_lora():
  batches = train_helpers.synthetic_batches(3)
  s1, h1, frozen = _run(train_helpers.tiny_model(), batches)
  s2, h2, _ = _run(train_helpers.tiny_model(), batches)
  assert [m["loss"] for m in h1] == [m["loss"] for m in h2]
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_array_equal(a, b)
  assert int(s1["step"]) == 3
  assert h1[-1]["loss"] < h1[0]["loss"] + 1.0 and np.isfinite(h1[-1]["grad_norm"])
  paths = {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(s1["params"])}
  assert paths and all("lora_" in p for p in paths)
  _, _, frozen_after = state_lib.split_model(train_helpers.tiny_model())
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_after)):
    np.testing.assert_array_equal(a, b)


def test_dropout_key_changes_with_step_seed():
  batches = train_helpers.synthetic_batches(3)  # B starts at 0 and lr(0) = 0: dropout shows at step 3.
  _, h1, _ = _run(train_helpers.tiny_model(dropout=0.5), batches, seed=0)
  _, h2, _ = _run(train_helpers.tiny_model(dropout=0.5), batches, seed=1)
  assert h1[0]["loss"] == h2[0]["loss"] and h1[2]["loss"] != h2[2]["loss"]


def test_accumulation_of_identical_micro_batches_equals_one_batch():
  half = train_helpers.synthetic_batches(2, batch=4)
  doubled = [{k: np.repeat(v, 2, axis=0) for k, v in b.items()} for b in half]  # rows i::2 are equal
  s1, h1, _ = _run(train_helpers.tiny_model(dropout=0.0), half)
  s2, h2, _ = _run(train_helpers.tiny_model(dropout=0.0), doubled, accum_steps=2)
  np.testing.assert_allclose([m["loss"] for m in h1], [m["loss"] for m in h2], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_auxiliary_loss_is_weighted_and_reported():
  name = "test_mean_logit"
  if name not in step_lib.LOSSES:
    step_lib.register_loss(name)(lambda model, batch, key: jnp.mean(model(batch["tokens"])) ** 2)
  batches = train_helpers.synthetic_batches(1)
  _, h, _ = _run(train_helpers.tiny_model(dropout=0.0), batches, loss_weights={"lm": 1.0, name: 0.5})
  m = h[0]
  np.testing.assert_allclose(m["loss"], m["loss/lm"] + 0.5 * m[f"loss/{name}"], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown losses"):
    _run(train_helpers.tiny_model(), batches, loss_weights={"nope": 1.0})


def test_schedule_warms_up_then_decays():
  sched = state_lib.make_schedule(train_helpers.optim_config(lr=1.0, warmup_steps=4, total_steps=12))
  assert float(sched(0)) == 0.0 and float(sched(4)) == pytest.approx(1.0)
  assert float(sched(8)) == pytest.approx(0.5) and float(sched(12)) == pytest.approx(0.0)


def test_unequal_micro_batches_accumulate_to_the_full_batch_gradient():
  """Micro-batch 0 (rows 0, 2) holds 15 answer tokens per row, micro-batch 1 (rows 1, 3) one: averaging the
  two micro-batch means would weigh each of the latter's tokens 15 times more than the full-batch mean."""
  batch = train_helpers.synthetic_batches(1, batch=4)[0]
  batch["loss_mask"] = batch["attention_mask"].copy()
  batch["tokens"][:, :] = np.maximum(batch["tokens"], 3)
  batch["attention_mask"][:] = 1
  batch["positions"] = np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)).copy()
  batch["loss_mask"][:] = 1
  batch["loss_mask"][1::2, :-1] = 0  # rows 1 and 3: only the last token is a target
  model = train_helpers.tiny_model(dropout=0.0)
  graphdef, params, frozen = state_lib.split_model(model)
  tx = state_lib.make_optimizer(train_helpers.optim_config())
  mesh = sharding.make_mesh((-1, 1, 1))

  def grads_and_loss(accum_steps):
    state = state_lib.init_state(params, tx, seed=0, mesh=mesh)
    fn = jax.jit(lambda s, b, f: step_lib.train_step(s, b, f, graphdef=graphdef, tx=optax.identity(),
                                                      loss_weights={"lm": 1.0}, accum_steps=accum_steps))
    # With the identity optimizer the update is the gradient itself: new params - old params.
    new, metrics = fn(dict(state, opt_state=optax.identity().init(params)), batch, frozen)
    return jax.tree.map(lambda a, b: np.asarray(a - b), new["params"], params), float(metrics["loss"])

  full, full_loss = grads_and_loss(1)
  accumulated, accumulated_loss = grads_and_loss(2)
  assert accumulated_loss == pytest.approx(full_loss, rel=1e-6)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(accumulated)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert any(np.abs(a).max() > 0 for a in jax.tree.leaves(full))
  # The mean of per-micro-batch means (the old accumulation) is another number here.
  rows = [slice(0, 4, 2), slice(1, 4, 2)]
  per_micro = [grads_and_loss_for({k: v[r] for k, v in batch.items()}, graphdef, params, frozen) for r in rows]
  assert abs(np.mean(per_micro) - full_loss) > 1e-3


def grads_and_loss_for(batch, graphdef, params, frozen):
  model = nnx.merge(graphdef, params, frozen)
  return float(step_lib.loss_terms(model, batch, None, ["lm"])["lm"])
