"""Augmentation invariants: lengths, ratios, padding hygiene, determinism, jit/vmap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clclm_jax.data import augment

L, MASK_ID = 12, 99
CORR = jnp.asarray(np.stack([(np.arange(100) + 50) % 98 + 1, (np.arange(100) + 60) % 98 + 1], 1), jnp.int32)


def _seq(n):
  return jnp.asarray([10 + i if i < n else 0 for i in range(L)], jnp.int32), jnp.int32(n)


def _check_layout(out, n_out):
  out, n_out = np.asarray(out), int(n_out)
  assert (out[:n_out] > 0).all(), "padding leaked into real positions"
  assert (out[n_out:] == 0).all(), "items leaked into padding"


@pytest.mark.parametrize("n", [1, 2, 5, 7, 10, 12])
def test_operators_lengths_ratios_and_layout(n):
  seq, m = _seq(n)
  key = jax.random.key(n)
  items = np.asarray(seq[:n])

  out, c = augment.crop(key, seq, m, 0.6)
  assert int(c) == max(math.floor(0.6 * n), 1)
  _check_layout(out, c)
  start = int(out[0]) - 10
  assert np.asarray(out[:int(c)]).tolist() == items[start:start + int(c)].tolist()

  out, k = augment.mask(key, seq, m, 0.3, MASK_ID)
  _check_layout(out, k)
  assert int(k) == n and int((out == MASK_ID).sum()) == math.floor(0.3 * n)
  assert ((out[:n] == MASK_ID) | (out[:n] == seq[:n])).all()

  out, k = augment.reorder(key, seq, m, 0.6)
  _check_layout(out, k)
  assert int(k) == n and sorted(np.asarray(out[:n]).tolist()) == items.tolist()
  moved = np.flatnonzero(np.asarray(out[:n]) != items)
  assert len(moved) == 0 or moved.max() - moved.min() < math.floor(0.6 * n)  # one contiguous block

  out, k = augment.substitute(key, seq, m, 0.1, CORR)
  _check_layout(out, k)
  changed = np.asarray(out[:n]) != items
  assert int(k) == n and changed.sum() == max(math.floor(0.1 * n), 1)
  new = np.asarray(out[:n])[changed][:, None]
  assert (new == np.asarray(CORR[items[changed]])).any(1).all()

  out, k = augment.insert(key, seq, m, 0.4, CORR)
  _check_layout(out, k)
  added = max(math.floor(0.4 * n), 1)
  assert int(k) == min(n + added, L)
  kept = [x for x in np.asarray(out[:int(k)]).tolist() if 10 <= x < 10 + n]
  assert kept == items[len(items) - len(kept):].tolist()  # originals in order, the newest kept


def test_insert_places_correlated_item_before_its_source():
  seq, m = _seq(4)
  out, k = augment.insert(jax.random.key(3), seq, m, 0.4, CORR[:, :1])
  out = np.asarray(out[:int(k)])
  src = [i for i in range(1, len(out)) if out[i - 1] == int(CORR[out[i], 0]) and 10 <= out[i] < 14]
  assert int(k) == 5 and len(src) == 1


def test_same_key_same_views_and_different_keys_differ():
  seq_bl = jnp.tile(_seq(10)[0][None], (16, 1))
  n_b = jnp.full(16, 10, jnp.int32)
  a = augment.two_views_batch(jax.random.key(0), seq_bl, n_b, CORR, mask_id=MASK_ID)
  b = augment.two_views_batch(jax.random.key(0), seq_bl, n_b, CORR, mask_id=MASK_ID)
  c = augment.two_views_batch(jax.random.key(1), seq_bl, n_b, CORR, mask_id=MASK_ID)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any((np.asarray(x) != np.asarray(y)).any() for x, y in zip(a, c))
  assert (np.asarray(a[0]) != np.asarray(a[0][:1])).any()  # rows get their own keys


def test_draw_ops_distinct_and_short_pool():
  keys = jax.random.split(jax.random.key(0), 400)
  long_ops = np.asarray(jax.vmap(lambda k: augment.draw_ops(k, jnp.int32(10), 4))(keys))
  short_ops = np.asarray(jax.vmap(lambda k: augment.draw_ops(k, jnp.int32(3), 4))(keys))
  assert (long_ops[:, 0] != long_ops[:, 1]).all() and (short_ops[:, 0] != short_ops[:, 1]).all()
  assert set(long_ops.ravel()) == set(range(5))
  assert set(short_ops.ravel()) == set(augment.SHORT_OPS)


def test_views_batch_under_jit_and_vmap_keep_layout():
  lengths = np.asarray([1, 2, 3, 4, 5, 8, 11, 12])
  seq_bl = jnp.stack([_seq(n)[0] for n in lengths])
  v1, n1, v2, n2 = augment.two_views_batch(jax.random.key(7), seq_bl, jnp.asarray(lengths), CORR, mask_id=MASK_ID)
  assert v1.shape == v2.shape == seq_bl.shape
  for row in range(len(lengths)):
    _check_layout(v1[row], n1[row])
    _check_layout(v2[row], n2[row])
    assert 1 <= int(n1[row]) <= L and 1 <= int(n2[row]) <= L


def test_itemcf_iuf_matches_hand_computation():
  seqs = [np.asarray([1, 2]), np.asarray([1, 2, 3]), np.asarray([3, 4])]
  table = augment.itemcf_iuf(seqs, num_items=5, top_k=2)
  assert table.shape == (7, 2)
  # sim(1,2) = (1/log3 + 1/log4) / sqrt(2*2); sim(2,3) = (1/log4) / sqrt(2*2); sim(3,4) = (1/log3) / sqrt(2*1)
  assert table[1, 0] == 2 and table[2, 0] == 1 and table[3, 0] == 4 and table[4, 0] == 3
  assert table[2, 1] == 3 and table[1, 1] == 3
  assert table[5].tolist() == [5, 5] and table[0].tolist() == [0, 0] and table[6].tolist() == [6, 6]
