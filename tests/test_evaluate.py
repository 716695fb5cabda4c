"""AUC against scikit-learn, Yes/No scoring at the answer position, early stopping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import train_helpers
from clclm_jax.data.records import Interaction
from clclm_jax.train import evaluate, sharding, state as state_lib


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 300)
  scores = np.round(rng.random(300) + 0.3 * labels, 1)  # rounding makes many ties
  assert evaluate.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases():
  assert evaluate.auc([0.1, 0.9], [0, 1]) == 1.0
  assert evaluate.auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
  with pytest.raises(ValueError, match="both classes"):
    evaluate.auc([0.1, 0.2], [1, 1])


def test_paired_bootstrap_separates_a_better_scoring_and_is_antisymmetric():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 400)
  good, noise = labels + rng.normal(0, 0.8, 400), rng.random(400)
  c = evaluate.paired_bootstrap(good, noise, labels, resamples=300)
  assert c["difference"] == pytest.approx(roc_auc_score(labels, good) - roc_auc_score(labels, noise))
  assert 0 < c["ci95"][0] < c["difference"] < c["ci95"][1] and c["share_a_not_better"] == 0.0
  r = evaluate.paired_bootstrap(noise, good, labels, resamples=300)
  assert r["difference"] == -c["difference"] and r["ci95"] == pytest.approx([-c["ci95"][1], -c["ci95"][0]])
  same = evaluate.paired_bootstrap(good, good, labels, resamples=50)
  assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
  seeds = evaluate.paired_bootstrap([good, good + 1.0], [noise, noise], labels, resamples=50)  # [runs, prompts]
  assert seeds["runs"] == 2 and seeds["difference"] == pytest.approx(c["difference"])


def test_like_ratio_auc_scores_the_history_share_of_likes():
  xs = [Interaction(1, (1, 2), (True, True), 3, 1), Interaction(2, (1, 2), (True, False), 3, 0),
        Interaction(3, (), (), 3, 1), Interaction(4, (1, 2, 4), (False, False, True), 3, 0)]
  assert evaluate.like_ratio_auc(xs) == evaluate.auc([1.0, 0.5, 0.5, 1 / 3], [1, 0, 1, 0]) == 0.875


def test_yes_probability_is_softmax_at_answer_index():
  model = train_helpers.tiny_model()
  batch = {k: jnp.asarray(v) for k, v in train_helpers.synthetic_batches(1, batch=4)[0].items()}
  batch["answer_index"] = jnp.array([15, 14, 15, 13])
  p = evaluate.yes_probability(model, batch, 7, 9)
  logits = model(batch["tokens"], batch["positions"], batch["attention_mask"])
  rows = logits[jnp.arange(4), batch["answer_index"]][:, jnp.array([7, 9])]
  np.testing.assert_allclose(p, jax.nn.softmax(rows, -1)[:, 0], rtol=1e-5)


def test_score_drops_fill_rows_and_orders_by_index():
  model = train_helpers.tiny_model()
  graphdef, params, frozen = state_lib.split_model(model)
  mesh = sharding.make_mesh((-1, 1, 1))
  step = evaluate.compile_eval_step(graphdef, sharding.state_sharding(params, mesh),
                                    sharding.state_sharding(frozen, mesh), mesh, 7, 9)
  batches = train_helpers.synthetic_batches(2, batch=4)
  for i, b in enumerate(batches):
    b["answer_index"] = np.full(4, 15, np.int32)
    b["label"] = np.array([1, 0, 1, -1], np.int32)
    b["index"] = np.array([5 + i, 3 + i, 1 + i, -1], np.int32)
  s = evaluate.score(step, params, frozen, batches, mesh)
  assert list(s.index) == [1, 2, 3, 4, 5, 6] and list(s.label) == [1, 1, 0, 0, 1, 1]
  assert s.metrics()["n"] == 6 and np.all((s.p_yes > 0) & (s.p_yes < 1))


def test_early_stopping_waits_patience_evaluations():
  stop = evaluate.EarlyStopping(patience=2)
  for step, value in [(10, 0.6), (20, 0.7), (30, 0.65)]:
    stop = stop.update(value, step)
    assert not stop.should_stop
  assert (stop.best, stop.best_step, stop.bad_evals) == (0.7, 20, 1)
  stop = stop.update(0.7, 40)  # equal is not better
  assert stop.should_stop and stop.best_step == 20


def _prefixed_batches(n_batches=3, batch=4, prefix_len=20, seed=0):
  """Right-padded batches whose real rows share their first `prefix_len` tokens; last row of each is fill."""
  rng = np.random.default_rng(seed)
  prefix = rng.integers(3, 256, prefix_len)
  out = []
  for i in range(n_batches):
    lengths = rng.integers(prefix_len + 3, prefix_len + 30, batch)
    t = 64
    tokens, mask = np.zeros((batch, t), np.int32), np.zeros((batch, t), np.int32)
    for r, n in enumerate(lengths[:-1]):
      tokens[r, :n] = np.r_[prefix, rng.integers(3, 256, n - prefix_len)]
      mask[r, :n] = 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    out.append({"tokens": tokens, "positions": positions, "attention_mask": mask,
                "answer_index": np.maximum(mask.sum(1) - 1, 0).astype(np.int32),
                "label": np.r_[rng.integers(0, 2, batch - 1), -1].astype(np.int32),
                "index": np.r_[np.arange(batch - 1) + i * batch, -1].astype(np.int32)})
  return out


def _trained_lora_model():
  model = train_helpers.tiny_model(dropout=0.0)
  for _, proj in model.projections(("q_proj", "v_proj")):
    proj.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(3), proj.lora_b.shape)
  return model


def test_prefix_cache_matches_full_forward():
  model = _trained_lora_model()
  batch = _prefixed_batches(1)[0]
  full = model.hidden_states(batch["tokens"], batch["positions"], batch["attention_mask"])
  cache = model.prefix_cache(jnp.asarray(batch["tokens"][0, :20]))
  rest = evaluate.strip_prefix(batch, 20)
  part = model.hidden_states(rest["tokens"], None, rest["attention_mask"], prefix_kv=cache)
  real = batch["attention_mask"][:, 20:] == 1
  np.testing.assert_allclose(np.asarray(part)[real], np.asarray(full)[:, 20:][real], atol=2e-5)


def test_shared_prefix_width():
  batches = _prefixed_batches(prefix_len=20)
  assert evaluate.shared_prefix(batches).size == 20
  np.testing.assert_array_equal(evaluate.shared_prefix(batches), batches[0]["tokens"][0, :20])
  batches[1]["answer_index"][0] = 12  # the prefix may not reach past any row's answer position
  assert evaluate.shared_prefix(batches).size == 12


def test_score_with_shared_prefix_equals_plain_scoring():
  model = _trained_lora_model()
  graphdef, params, frozen = state_lib.split_model(model)
  mesh = sharding.make_mesh((-1, 1, 1))
  step = evaluate.compile_eval_step(graphdef, sharding.state_sharding(params, mesh),
                                    sharding.state_sharding(frozen, mesh), mesh, 7, 9)
  batches = _prefixed_batches()
  plain = evaluate.score(step, params, frozen, batches, mesh, share_prefix=False)
  shared = evaluate.score(step, params, frozen, batches, mesh, share_prefix=True)
  np.testing.assert_array_equal(plain.index, shared.index)
  np.testing.assert_allclose(shared.p_yes, plain.p_yes, atol=1e-5)
  assert len(plain.index) == 9
