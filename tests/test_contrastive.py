"""Sequence encoder, losses, ranking metrics and the pretraining step on tiny synthetic data."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from clclm_jax.contrastive import losses, metrics, pretrain
from clclm_jax.contrastive.encoder import SeqEncoder, pool
from clclm_jax.data import sequences
from clclm_jax.model.llama import Frozen
from clclm_jax.train import sharding, state as state_lib, step as step_lib
import train_helpers

VOCAB = 22  # padding, items 1..20, mask id 21


def _encoder(**kwargs):
  return SeqEncoder(VOCAB, hidden=16, num_layers=2, num_heads=2, max_len=10, rngs=nnx.Rngs(0), **kwargs)


def test_padding_side_and_width_do_not_change_real_states():
  model = _encoder()
  seqs = [np.asarray([3, 4, 5]), np.asarray([7, 8, 9, 10, 11])]
  right, n = sequences.pad(seqs, 6)
  left, _ = sequences.pad(seqs, 6, side="left")
  wide, _ = sequences.pad(seqs, 9)
  h_right, h_left, h_wide = model(jnp.asarray(right)), model(jnp.asarray(left)), model(jnp.asarray(wide))
  for row, length in enumerate(n):
    np.testing.assert_allclose(h_right[row, :length], h_left[row, 6 - length:], atol=1e-6)
    np.testing.assert_allclose(h_right[row, :length], h_wide[row, :length], atol=1e-6)
    assert (h_right[row, length:] == 0).all() and (h_left[row, :6 - length] == 0).all()
  np.testing.assert_allclose(model.encode(jnp.asarray(right)), model.encode(jnp.asarray(left)), atol=1e-6)


def test_padding_feedback_changes_nothing_and_attention_is_causal():
  model = _encoder(use_feedback=True)
  items = jnp.asarray([[3, 4, 5, 6, 0, 0]])
  feedback = jnp.asarray([[1, 2, 1, 1, 0, 0]])
  h = model(items, feedback_bl=feedback)
  np.testing.assert_array_equal(h, model(items, feedback_bl=feedback.at[0, 4:].set(2)))
  h_changed = model(items.at[0, 2].set(9), feedback_bl=feedback)
  np.testing.assert_array_equal(h[0, :2], h_changed[0, :2])  # earlier positions cannot see position 2
  assert not np.allclose(h[0, 2:4], h_changed[0, 2:4])


def test_dropout_only_with_a_key_and_deterministic_per_key():
  model = _encoder()
  items = jnp.asarray([[3, 4, 5, 6, 0, 0]])
  a, b = model(items, dropout_key=jax.random.key(1)), model(items, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, model(items, dropout_key=jax.random.key(2)))
  assert not np.allclose(a, model(items))
  assert (a[0, 4:] == 0).all()


def test_item_init_frozen_and_trainable_filter():
  init = np.random.default_rng(0).normal(size=(VOCAB, 8)).astype(np.float32)
  frozen = _encoder(item_init=init, freeze_item_init=True)
  assert isinstance(frozen.embed_items, Frozen) and frozen.item_table().shape == (VOCAB, 16)
  assert "embed_items" not in nnx.state(frozen, nnx.Param) and "item_proj" in nnx.state(frozen, nnx.Param)
  trainable = _encoder(item_init=np.zeros((VOCAB, 16), np.float32))
  assert isinstance(trainable.embed_items, nnx.Param) and trainable.item_proj is None
  with pytest.raises(ValueError, match="vocab_size"):
    _encoder(item_init=init[:5])


def test_pool_last_and_mean():
  h = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.asarray([[1, 1, 0], [0, 1, 1]], bool)
  np.testing.assert_array_equal(pool(h, mask, "last"), [[2, 3], [10, 11]])
  np.testing.assert_allclose(pool(h, mask, "mean"), [[1, 2], [9, 10]])


@pytest.mark.parametrize("similarity,tau", [("dot", 1.0), ("cosine", 0.2)])
def test_info_nce_matches_numpy_and_ignores_batch_order(similarity, tau):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
  got = losses.info_nce(z1, z2, temperature=tau, similarity=similarity)
  np.testing.assert_allclose(got, train_helpers.nt_xent(z1, z2, tau, cosine=similarity == "cosine"), rtol=1e-5)
  perm = rng.permutation(6)
  np.testing.assert_allclose(losses.info_nce(z1[perm], z2[perm], temperature=tau, similarity=similarity), got, rtol=1e-6)
  valid = np.asarray([True, False, True, True, False, True])  # invalid pairs are as if absent
  np.testing.assert_allclose(losses.info_nce(z1, z2, temperature=tau, similarity=similarity, valid_n=valid),
                             train_helpers.nt_xent(z1[valid], z2[valid], tau, cosine=similarity == "cosine"), rtol=1e-5)
  grads = jax.grad(lambda a, b: losses.info_nce(a, b, temperature=tau, similarity=similarity, valid_n=valid),
                   argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2))
  for g in grads:  # finite, and nothing flows into the invalid pairs
    assert np.isfinite(g).all() and not np.asarray(g)[~valid].any() and np.asarray(g)[valid].any()
  cross = functools.partial(losses.info_nce, temperature=tau, similarity=similarity, same_side=False)
  clip = functools.partial(train_helpers.nt_xent, tau=tau, cosine=similarity == "cosine", same_side=False)
  np.testing.assert_allclose(cross(z1, z2), clip(z1, z2), rtol=1e-5)
  np.testing.assert_allclose(cross(z1, z2, valid_n=valid), clip(z1, z2, valid_n=valid), rtol=1e-5)


def test_sample_positions_draws_real_positions_of_both_passes():
  h1 = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], bool)  # 4 real positions
  a, b, valid = pretrain.sample_positions(jax.random.key(0), h1, -h1, mask, 3)
  np.testing.assert_array_equal(b, -a)  # the same positions of both passes
  assert valid.all() and len({tuple(r) for r in np.asarray(a)}) == 3
  real = {tuple(r) for r in np.asarray(h1)[np.asarray(mask)]}
  assert {tuple(r) for r in np.asarray(a)} <= real
  _, _, valid = pretrain.sample_positions(jax.random.key(1), h1, h1, mask, 6)  # more than the batch holds
  assert int(valid.sum()) == 4


def test_next_item_ce_matches_numpy_and_skips_padding():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 3, 4)).astype(np.float32)
  table = rng.normal(size=(7, 4)).astype(np.float32)  # pad, items 1..5, mask 6
  targets = np.asarray([[2, 5, 0], [1, 0, 0]], np.int32)
  loss, count = losses.next_item_ce(jnp.asarray(h), jnp.asarray(table), jnp.asarray(targets))
  ref = []
  for b, l in zip(*np.nonzero(targets)):
    logits = table[1:6] @ h[b, l]
    ref.append(np.log(np.exp(logits).sum()) - logits[targets[b, l] - 1])
  assert int(count) == 3
  np.testing.assert_allclose(loss, np.mean(ref), rtol=1e-5)
  g_h, g_table = jax.grad(lambda h, t: losses.next_item_ce(h, t, jnp.asarray(targets))[0], argnums=(0, 1))(
      jnp.asarray(h), jnp.asarray(table))
  assert (g_h[0, 2] == 0).all() and (g_h[1, 1:] == 0).all() and (g_h[0, 0] != 0).any()
  assert (g_table[0] == 0).all() and (g_table[6] == 0).all() and (g_table[1:6] != 0).any()


def _ce_case():
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(3, 4, 5)).astype(np.float32))
  table = jnp.asarray(rng.normal(size=(9, 5)).astype(np.float32))  # pad, items 1..7, mask 8
  targets = jnp.asarray([[2, 7, 1, 0], [3, 3, 0, 0], [5, 0, 0, 0]], np.int32)
  return h, table, targets


@pytest.mark.parametrize("correct", [False, True])
def test_sampled_ce_with_all_items_uniform_equals_full_ce(correct):
  h, table, targets = _ce_case()
  log_q = losses.sampling_log_q(jnp.zeros(9), "uniform")
  negatives, log_pi = losses.sample_negatives(jax.random.key(0), log_q, 7)
  assert sorted(np.asarray(negatives).tolist()) == list(range(1, 8))
  got, count = losses.sampled_next_item_ce(h, table, targets, negatives, log_pi_v=log_pi if correct else None)
  want, want_count = losses.next_item_ce(h, table, targets)
  assert int(count) == int(want_count) == 6
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = lambda f: jax.grad(lambda h, t: f(h, t)[0], argnums=(0, 1))(h, table)
  g_got = grad(lambda h, t: losses.sampled_next_item_ce(h, t, targets, negatives))
  g_want = grad(lambda h, t: losses.next_item_ce(h, t, targets))
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sampled_ce_logq_matches_numpy_and_masks_padding():
  h, table, targets = _ce_case()
  counts = jnp.asarray([0, 30, 1, 5, 0, 9, 2, 4, 0])
  log_q = losses.sampling_log_q(counts, "popularity")
  np.testing.assert_allclose(np.exp(log_q[1:8]), (np.asarray(counts[1:8]) + 1) / 58.0, rtol=1e-5)
  assert np.isneginf(log_q[0]) and np.isneginf(log_q[8])
  negatives, log_pi = losses.sample_negatives(jax.random.key(1), log_q, 3)
  loss, _ = losses.sampled_next_item_ce(h, table, targets, negatives, log_pi_v=log_pi)
  pi = 1 - (1 - np.exp(np.asarray(log_q, np.float64))) ** 3
  h_np, t_np, negs = np.asarray(h, np.float64), np.asarray(table, np.float64), np.asarray(negatives)
  ref = []
  for b, l in zip(*np.nonzero(np.asarray(targets))):
    t = int(targets[b, l])
    cand = [t] + [n for n in negs if n != t]  # the target's own id is dropped from its negatives
    logits = np.asarray([t_np[c] @ h_np[b, l] - np.log(pi[c]) for c in cand])
    ref.append(np.log(np.exp(logits).sum()) - logits[0])
  np.testing.assert_allclose(loss, np.mean(ref), rtol=1e-5)
  g_h, g_table = jax.grad(lambda h, t: losses.sampled_next_item_ce(h, t, targets, negatives, log_pi_v=log_pi)[0],
                          argnums=(0, 1))(h, table)
  assert np.isfinite(g_h).all() and np.isfinite(g_table).all()
  assert (g_h[0, 3] == 0).all() and (g_h[1, 2:] == 0).all() and (g_h[2, 1:] == 0).all() and (g_h[0, 0] != 0).any()
  assert (g_table[0] == 0).all() and (g_table[8] == 0).all()


def test_sample_negatives_distinct_real_items_favouring_popular_ones():
  counts = jnp.asarray([0] + [1000] + [0] * 18 + [0])  # item 1 holds most of the mass
  log_q = losses.sampling_log_q(counts, "popularity")
  keys = jax.random.split(jax.random.key(0), 200)
  ids = np.asarray(jax.vmap(lambda k: losses.sample_negatives(k, log_q, 4)[0])(keys))
  assert ((ids >= 1) & (ids <= 19)).all()
  assert all(len(set(row)) == 4 for row in ids.tolist())
  assert (ids == 1).any(axis=1).mean() > 0.95 and (ids == 2).any(axis=1).mean() < 0.5
  with pytest.raises(ValueError, match="sampling"):
    losses.sampling_log_q(counts, "zipf")


def test_info_nce_global_batch_under_sharding_on_8_devices():
  code = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from clclm_jax.contrastive import losses
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    single = losses.info_nce(z1, z2, temperature=0.5, similarity="cosine")
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P("data"))
    s1, s2 = jax.device_put(z1, shard), jax.device_put(z2, shard)
    assert len(s1.addressable_shards) == 8 and s1.addressable_shards[0].data.shape == (2, 8)
    f = jax.jit(lambda a, b: losses.info_nce(a, b, temperature=0.5, similarity="cosine"))
    np.testing.assert_allclose(f(s1, s2), single, rtol=1e-6)
    print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_ranks_and_metrics_against_hand_values():
  scores = jnp.asarray([[9.0, 0.5, 0.9, 0.1, 0.7, 9.0],    # target 4: item 2 higher -> rank 1
                        [9.0, 0.8, 0.2, 0.3, 0.1, 9.0]])   # target 2: items 1, 3 higher -> rank 2
  target = jnp.asarray([4, 2])
  rank = metrics.target_rank(scores, target)
  np.testing.assert_array_equal(rank, [1, 2])
  m = metrics.ranking_metrics(rank, ks=(1, 2, 5))
  np.testing.assert_allclose(m["HR@1"], [0, 0])
  np.testing.assert_allclose(m["HR@2"], [1, 0])
  np.testing.assert_allclose(m["NDCG@5"], [1 / np.log2(3), 1 / np.log2(4)])
  history = jnp.asarray([[2, 4, 0], [1, 3, 2]])  # the target itself is never excluded
  np.testing.assert_array_equal(metrics.target_rank(scores, target, history_bl=history, exclude_history=True), [0, 0])


def _tiny_config():
  c = ml_collections.ConfigDict(dict(
      seed=0, max_len=8, buckets=(8,), hidden=16, num_layers=1, num_heads=2, dropout=0.1, attn_dropout=0.1,
      pooling="last", batch_size=16, eval_batch_size=64, lr=1e-2, num_epochs=2, eval_every=1, patience=5,
      time_budget_min=5.0, cl_weight=0.1, temperature=1.0, similarity="dot", exclude_history=False,
      ce_negatives=0, ce_sampling="popularity"))
  c.augment = ml_collections.ConfigDict(dict(crop_eta=0.6, mask_gamma=0.3, reorder_beta=0.6, insert_rate=0.4,
                                             substitute_rate=0.1, short_threshold=4, corr_top_k=1))
  return c


def _tiny_data():
  rng = np.random.default_rng(0)  # each user walks the item cycle 1..20 from a random start
  seqs = tuple(((rng.integers(20) + np.arange(rng.integers(5, 10))) % 20 + 1).astype(np.int32) for _ in range(64))
  return sequences.SequenceData("tiny", seqs, 20)


def _tiny_step(cfg):
  """Initial state, the one jitted train step (pretraining's losses by name) and one batch of the tiny data
  (identity item correlations)."""
  data = _tiny_data()
  model = pretrain.NextItemRec(cfg, data, item_corr=np.arange(data.vocab_size)[:, None])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = state_lib.make_optimizer(ml_collections.ConfigDict(dict(
      lr=cfg.lr, warmup_steps=0, schedule="constant", max_grad_norm=0.0, b1=0.9, b2=0.999, weight_decay=0.0,
      total_steps=100)))
  mesh = sharding.make_mesh((-1, 1, 1))
  weights = {k: v for k, v in pretrain.loss_weights(cfg).items() if v}
  step = step_lib.jit_train_step(graphdef, sharding.state_sharding(rest, mesh), tx,
                                 state_lib.state_shardings(params, tx, mesh), mesh, loss_weights=weights)
  same = sequences.same_target_index(data) if cfg.get("same_target_cl_weight", 0.0) else None
  batch = next(sequences.train_batches(data, 16, np.random.default_rng(0), buckets=(8,), same_target=same))
  state = state_lib.init_state(params, tx, 0, mesh)
  return state, lambda st, b: step(st, b, rest), batch


def _total(aux, cfg):
  return (aux["loss/next_item"] + cfg.cl_weight * aux["loss/aug_cl"] + cfg.dropout_cl_weight * aux.get(
      "loss/dropout_cl", 0.0) + cfg.same_target_cl_weight * aux.get("loss/same_target_cl", 0.0))


@pytest.mark.parametrize("negatives,sampling,dropout_cl,same_cl", [
    (0, "uniform", 0.0, 0.0), (8, "uniform", 0.0, 0.0), (8, "popularity", 0.0, 0.0), (0, "uniform", 0.1, 0.0),
    (0, "uniform", 0.1, 0.1)])
def test_train_step_is_pure_jitted_and_learns(negatives, sampling, dropout_cl, same_cl):
  cfg = _tiny_config()
  cfg.ce_negatives, cfg.ce_sampling, cfg.dropout_cl_weight = negatives, sampling, dropout_cl
  cfg.same_target_cl_weight = same_cl
  state, step, batch = _tiny_step(cfg)
  first = None
  for _ in range(40):
    state, aux = step(state, batch)
    first = first if first is not None else float(aux["loss/next_item"])
  terms = {"loss/next_item", "loss/aug_cl"} | ({"loss/dropout_cl"} if dropout_cl else set()) | (
      {"loss/same_target_cl"} if same_cl else set())
  assert int(state["step"]) == 40 and set(aux) == {"loss", "grad_norm"} | terms
  assert float(aux["loss/next_item"]) < 0.5 * first
  assert all(float(aux[t]) > 0 for t in terms)
  np.testing.assert_allclose(aux["loss"], _total(aux, cfg), rtol=1e-6)


def test_dropout_views_at_sampled_positions_train():
  cfg = _tiny_config()
  cfg.dropout_cl_weight, cfg.dropout_cl_positions, cfg.same_target_cl_weight = 0.1, 32, 0.0
  state, step, batch = _tiny_step(cfg)
  state, first = step(state, batch)
  for _ in range(40):
    state, aux = step(state, batch)
  assert float(aux["loss/next_item"]) < 0.5 * float(first["loss/next_item"])
  assert all(0 < float(a["loss/dropout_cl"]) < np.log(2 * 32 - 1) + 1e-3 for a in (first, aux))  # 32 pairs, finite
  np.testing.assert_allclose(aux["loss"], _total(aux, cfg), rtol=1e-6)


@pytest.mark.parametrize("negatives", [0, 8])
def test_train_summary_has_valid_and_test_metrics(negatives, tmp_path):
  cfg = _tiny_config()
  cfg.ce_negatives = negatives
  summary = pretrain.train(cfg, _tiny_data(), tmp_path)
  assert summary["epochs"] == 2 and 1 <= summary["best_epoch"] <= 2 and summary["stopped"] == "last step"
  assert "test, history out" in pretrain.format_summary(summary)
  for part in ("valid", "test"):
    assert set(summary[part]) == {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)}
    assert 0.0 <= summary[part]["NDCG@10"] <= summary[part]["HR@10"] <= 1.0
  assert summary["test"]["HR@10"] > 0.5  # the cycle is easy: far above chance (10/20)
  other = summary["test_history_excluded"]  # the same parameters with the input's items out of the ranking
  assert all(other[m] >= summary["test"][m] for m in other)  # fewer competitors never lower a hit
  assert other["NDCG@10"] > summary["test"]["NDCG@10"]  # on the cycle, seen items outrank the next one
