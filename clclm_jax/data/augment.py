"""Contrastive sequence augmentations (CL4SRec crop/mask/reorder, CoSeRec insert/substitute).

Every operator is a pure function of an explicit `jax.random` key on one right-padded sequence
`seq_l` (items first, zeros after) and its length `n`; it returns `(seq_l, n)` in the same layout
and is jittable and vmappable. Counts are floor(rate * n) (at least one item for crop, insert and
substitute); insertions keep the most recent `L` items when the view overflows.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

CROP, MASK, REORDER, INSERT, SUBSTITUTE = range(5)
SHORT_OPS = (MASK, INSERT, SUBSTITUTE)
_EPS = 1e-4  # floor(0.7 * 10) must be 7 in float32 too


def _count(rate: float, n: jax.Array, at_least: int = 0) -> jax.Array:
  return jnp.minimum(jnp.maximum(jnp.floor(rate * n + _EPS).astype(jnp.int32), at_least), n)


def _choose(key: jax.Array, n: jax.Array, count: jax.Array, length: int) -> jax.Array:
  """A boolean [L] mask of exactly `count` distinct positions drawn among the first `n`."""
  pos = jnp.arange(length)
  scores = jnp.where(pos < n, jax.random.uniform(key, (length,)), 2.0)
  return jnp.argsort(jnp.argsort(scores)) < count


def crop(key: jax.Array, seq_l: jax.Array, n: jax.Array, eta: float) -> tuple[jax.Array, jax.Array]:
  """Keeps a random contiguous block of max(floor(eta * n), 1) items."""
  c = _count(eta, n, 1)
  start = jax.random.randint(key, (), 0, n - c + 1)
  pos = jnp.arange(seq_l.shape[0])
  return jnp.where(pos < c, jnp.take(seq_l, start + pos, mode="clip"), 0), c


def mask(key: jax.Array, seq_l: jax.Array, n: jax.Array, gamma: float, mask_id: int) -> tuple[jax.Array, jax.Array]:
  """Replaces floor(gamma * n) random real items with `mask_id`."""
  chosen = _choose(key, n, _count(gamma, n), seq_l.shape[0])
  return jnp.where(chosen, mask_id, seq_l), n


def reorder(key: jax.Array, seq_l: jax.Array, n: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """Shuffles a random contiguous block of floor(beta * n) items."""
  start_key, perm_key = jax.random.split(key)
  r = _count(beta, n)
  start = jax.random.randint(start_key, (), 0, n - r + 1)
  pos = jnp.arange(seq_l.shape[0])
  inside = (pos >= start) & (pos < start + r)
  # Keys inside the block stay in [start - 0.5, start + r - 0.5): sorting only permutes the block.
  sort_key = jnp.where(inside, start - 0.5 + r * jax.random.uniform(perm_key, pos.shape), pos)
  return seq_l[jnp.argsort(sort_key)], n


def substitute(key: jax.Array, seq_l: jax.Array, n: jax.Array, rate: float,
               corr_vk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Replaces max(floor(rate * n), 1) random items with one of their top-k correlated items."""
  pos_key, col_key = jax.random.split(key)
  chosen = _choose(pos_key, n, _count(rate, n, 1), seq_l.shape[0])
  col = jax.random.randint(col_key, seq_l.shape, 0, corr_vk.shape[1])
  return jnp.where(chosen, corr_vk[seq_l, col], seq_l), n


def insert(key: jax.Array, seq_l: jax.Array, n: jax.Array, rate: float,
           corr_vk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Before max(floor(rate * n), 1) random items inserts a correlated item; keeps the last L."""
  pos_key, col_key = jax.random.split(key)
  length = seq_l.shape[0]
  pos = jnp.arange(length)
  chosen = _choose(pos_key, n, _count(rate, n, 1), length)
  new_pos = pos + jnp.cumsum(chosen)  # where each original item lands
  col = jax.random.randint(col_key, seq_l.shape, 0, corr_vk.shape[1])
  dump = 2 * length  # out of range: dropped by the scatter
  buf = jnp.zeros(2 * length, seq_l.dtype)
  buf = buf.at[jnp.where(pos < n, new_pos, dump)].set(seq_l, mode="drop")
  buf = buf.at[jnp.where(chosen, new_pos - 1, dump)].set(corr_vk[seq_l, col], mode="drop")
  total = n + chosen.sum()
  offset = jnp.maximum(total - length, 0)
  out_n = jnp.minimum(total, length)
  return jnp.where(pos < out_n, jnp.take(buf, pos + offset, mode="clip"), 0), out_n


def apply(op: jax.Array, key: jax.Array, seq_l: jax.Array, n: jax.Array, corr_vk: jax.Array, *,
          mask_id: int, eta: float = 0.6, gamma: float = 0.3, beta: float = 0.6,
          insert_rate: float = 0.4, substitute_rate: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Applies operator `op` (CROP, MASK, REORDER, INSERT or SUBSTITUTE)."""
  branches = (
      lambda k, s, m: crop(k, s, m, eta),
      lambda k, s, m: mask(k, s, m, gamma, mask_id),
      lambda k, s, m: reorder(k, s, m, beta),
      lambda k, s, m: insert(k, s, m, insert_rate, corr_vk),
      lambda k, s, m: substitute(k, s, m, substitute_rate, corr_vk),
  )
  return jax.lax.switch(op, branches, key, seq_l, n)


def draw_ops(key: jax.Array, n: jax.Array, short_threshold: int) -> jax.Array:
  """Two distinct operators: from all five, or from mask/insert/substitute when n <= threshold."""
  first_key, second_key = jax.random.split(key)
  all_ops, short_ops = jnp.arange(5), jnp.asarray(SHORT_OPS)
  pool, size = jax.lax.cond(n <= short_threshold, lambda: (jnp.pad(short_ops, (0, 2)), 3), lambda: (all_ops, 5))
  a = jax.random.randint(first_key, (), 0, size)
  b = (a + 1 + jax.random.randint(second_key, (), 0, size - 1)) % size
  return pool[jnp.stack([a, b])]


def two_views(key: jax.Array, seq_l: jax.Array, n: jax.Array, corr_vk: jax.Array, *,
              short_threshold: int = 4, **rates) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Two augmented views of one sequence with two distinct operators -> (v1, n1, v2, n2)."""
  op_key, key1, key2 = jax.random.split(key, 3)
  op1, op2 = draw_ops(op_key, n, short_threshold)
  v1, n1 = apply(op1, key1, seq_l, n, corr_vk, **rates)
  v2, n2 = apply(op2, key2, seq_l, n, corr_vk, **rates)
  return v1, n1, v2, n2


@functools.partial(jax.jit, static_argnames=("short_threshold", "mask_id", "eta", "gamma", "beta",
                                             "insert_rate", "substitute_rate"))
def two_views_batch(key: jax.Array, seq_bl: jax.Array, n_b: jax.Array, corr_vk: jax.Array, **kwargs):
  """`two_views` over a batch, one key per row -> (v1_bl, n1_b, v2_bl, n2_b)."""
  keys = jax.random.split(key, seq_bl.shape[0])
  return jax.vmap(lambda k, s, m: two_views(k, s, m, corr_vk, **kwargs))(keys, seq_bl, n_b)


def itemcf_iuf(train_seqs: list[np.ndarray], num_items: int, top_k: int = 1) -> np.ndarray:
  """Top-k ItemCF-IUF neighbours per id -> int32 [num_items + 2, top_k].

  sim(i, j) = sum over users with both of 1 / log(1 + |user's items|), divided by
  sqrt(N_i N_j) (N = users per item); items without neighbours, padding and the mask id map
  to themselves. Build it from training sequences only.
  """
  vocab = num_items + 2
  rows = np.concatenate([np.full(len(np.unique(s)), u) for u, s in enumerate(train_seqs)])
  cols = np.concatenate([np.unique(s) for s in train_seqs])
  x_uv = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(train_seqs), vocab))
  per_user = np.asarray(x_uv.sum(1)).ravel()
  iuf = 1.0 / np.log1p(np.maximum(per_user, 1))
  co_vv = (x_uv.T @ scipy.sparse.diags(iuf) @ x_uv).tocsr()
  co_vv.setdiag(0)
  co_vv.eliminate_zeros()
  users_v = np.asarray(x_uv.sum(0)).ravel()
  co_vv = co_vv.tocoo()
  sim = co_vv.data / np.sqrt(users_v[co_vv.row] * users_v[co_vv.col])
  sim_vv = scipy.sparse.csr_matrix((sim, (co_vv.row, co_vv.col)), shape=(vocab, vocab))
  table = np.repeat(np.arange(vocab, dtype=np.int32)[:, None], top_k, axis=1)
  for i in range(vocab):
    lo, hi = sim_vv.indptr[i], sim_vv.indptr[i + 1]
    if hi == lo:
      continue
    nbr, val = sim_vv.indices[lo:hi], sim_vv.data[lo:hi]
    best = nbr[np.lexsort((nbr, -val))[:top_k]]  # highest similarity, ties by smaller id
    table[i, :len(best)] = best
  return table
