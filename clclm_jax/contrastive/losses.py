"""Contrastive (InfoNCE / NT-Xent) and next-item cross-entropy losses.

Both are plain matrix products over the whole batch: under `jit` with the batch sharded over a
mesh, the compiler gathers what it needs, so the negatives are the global batch. The next-item CE
comes as a full softmax over all items or a sampled softmax over K shared negatives per step.
"""

import jax
import jax.numpy as jnp


def info_nce(z1_nd: jax.Array, z2_nd: jax.Array, *, temperature: float = 1.0,
             similarity: str = "dot", valid_n: jax.Array | None = None) -> jax.Array:
  """NT-Xent over 2N views: each view's positive is its pair, the other 2N - 2 are negatives.

  Pairs with `valid_n` False take no part: neither anchors nor negatives (the mean is over valid ones).
  """
  if similarity not in ("dot", "cosine"):
    raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
  z_md = jnp.concatenate([z1_nd, z2_nd], axis=0).astype(jnp.float32)
  if similarity == "cosine":
    z_md = z_md / jnp.maximum(jnp.linalg.norm(z_md, axis=-1, keepdims=True), 1e-8)
  n = z1_nd.shape[0]
  valid_m = jnp.ones(2 * n, bool) if valid_n is None else jnp.concatenate([valid_n, valid_n])
  logits_mm = z_md @ z_md.T / temperature
  logits_mm = jnp.where(jnp.eye(2 * n, dtype=bool) | ~valid_m[None, :], -jnp.inf, logits_mm)
  positive_m = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_probs_mm = jax.nn.log_softmax(logits_mm, axis=-1)
  nll_m = -jnp.take_along_axis(log_probs_mm, positive_m[:, None], axis=1)[:, 0]
  return jnp.where(valid_m, nll_m, 0.0).sum() / jnp.maximum(valid_m.sum(), 1)


def next_item_ce(h_bld: jax.Array, table_vd: jax.Array, targets_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Full-softmax cross-entropy of the next item at every position with a target (> 0).

  Scores all ids except padding (0) and the mask id (the last row); returns (mean loss, count).
  """
  logits_blv = jnp.einsum("bld,vd->blv", h_bld, table_vd).astype(jnp.float32)
  vocab = table_vd.shape[0]
  special_v = (jnp.arange(vocab) == 0) | (jnp.arange(vocab) == vocab - 1)
  logits_blv = jnp.where(special_v, -jnp.inf, logits_blv)
  nll_bl = jax.nn.logsumexp(logits_blv, axis=-1) - jnp.take_along_axis(logits_blv, targets_bl[..., None], axis=-1)[..., 0]
  valid_bl = targets_bl > 0
  count = valid_bl.sum()
  return jnp.where(valid_bl, nll_bl, 0.0).sum() / jnp.maximum(count, 1), count


def sampling_log_q(counts_v: jax.Array, how: str) -> jax.Array:
  """Log sampling weights [vocab] over real items (padding 0 and the mask id get -inf).

  'uniform': equal weights; 'popularity': proportional to `counts_v + 1` (training frequencies).
  """
  if how not in ("uniform", "popularity"):
    raise ValueError(f"sampling must be 'uniform' or 'popularity', got {how!r}")
  vocab = counts_v.shape[0]
  special_v = (jnp.arange(vocab) == 0) | (jnp.arange(vocab) == vocab - 1)
  weight_v = jnp.ones(vocab) if how == "uniform" else counts_v.astype(jnp.float32) + 1.0
  log_q_v = jnp.where(special_v, -jnp.inf, jnp.log(weight_v))
  return log_q_v - jax.nn.logsumexp(log_q_v)


def sample_negatives(key: jax.Array, log_q_v: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """K distinct ids drawn without replacement from exp(log_q_v) (Gumbel top-k).

  Returns (ids [K], log inclusion probabilities [vocab] ~ log(1 - (1 - q)^K), for logQ correction;
  0 for never-sampled ids so padded targets stay finite).
  """
  _, ids_k = jax.lax.top_k(log_q_v + jax.random.gumbel(key, log_q_v.shape), k)
  log_pi_v = jnp.log(-jnp.expm1(k * jnp.log1p(-jnp.exp(log_q_v))))
  return ids_k, jnp.where(jnp.isfinite(log_q_v), log_pi_v, 0.0)


def sampled_next_item_ce(h_bld: jax.Array, table_vd: jax.Array, targets_bl: jax.Array, negatives_k: jax.Array,
                         *, log_pi_v: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Sampled-softmax CE of the next item: each target against K negatives shared by the batch.

  A negative equal to the position's target is dropped. With `log_pi_v` (log inclusion
  probabilities) every logit is corrected by -log pi (logQ). Returns (mean loss, count).
  """
  h_bld = h_bld.astype(jnp.float32)
  pos_bl = jnp.einsum("bld,bld->bl", h_bld, table_vd[targets_bl].astype(jnp.float32))
  neg_blk = jnp.einsum("bld,kd->blk", h_bld, table_vd[negatives_k].astype(jnp.float32))
  if log_pi_v is not None:
    pos_bl = pos_bl - log_pi_v[targets_bl]
    neg_blk = neg_blk - log_pi_v[negatives_k]
  neg_blk = jnp.where(negatives_k == targets_bl[..., None], -jnp.inf, neg_blk)
  logits_blc = jnp.concatenate([pos_bl[..., None], neg_blk], axis=-1)
  nll_bl = jax.nn.logsumexp(logits_blc, axis=-1) - pos_bl
  valid_bl = targets_bl > 0
  count = valid_bl.sum()
  return jnp.where(valid_bl, nll_bl, 0.0).sum() / jnp.maximum(count, 1), count
