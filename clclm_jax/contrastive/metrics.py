"""Full-ranking HR@k and NDCG@k for next-item prediction (leave-one-out).

Protocol: every item id is scored (padding 0 and the mask id excluded); items already in the
user's history stay in the ranking, as in FEARec's RecBole evaluation (FEARec re-reports the Beauty
reference numbers), unless `exclude_history` is set (CoSeRec's own code zeroes their scores).
Rank = number of items scored strictly higher than the target.
"""

import jax
import jax.numpy as jnp

KS = (5, 10, 20)


def target_rank(scores_bv: jax.Array, target_b: jax.Array, *, history_bl: jax.Array | None = None,
                exclude_history: bool = False) -> jax.Array:
  """0-based rank of each target among all real items."""
  vocab = scores_bv.shape[1]
  ids_v = jnp.arange(vocab)
  excluded_bv = jnp.broadcast_to((ids_v == 0) | (ids_v == vocab - 1), scores_bv.shape)
  if exclude_history:
    if history_bl is None:
      raise ValueError("exclude_history needs history_bl")
    seen_bv = jnp.zeros(scores_bv.shape, bool).at[jnp.arange(scores_bv.shape[0])[:, None], history_bl].set(True)
    excluded_bv = excluded_bv | (seen_bv & (ids_v != target_b[:, None]))
  scores_bv = jnp.where(excluded_bv, -jnp.inf, scores_bv.astype(jnp.float32))
  target_score_b = jnp.take_along_axis(scores_bv, target_b[:, None], axis=1)
  return (scores_bv > target_score_b).sum(axis=1)


def ranking_metrics(rank_b: jax.Array, ks: tuple[int, ...] = KS) -> dict[str, jax.Array]:
  """Per-example HR@k and NDCG@k [B] from 0-based ranks (average them over users)."""
  out = {}
  for k in ks:
    hit_b = rank_b < k
    out[f"HR@{k}"] = hit_b.astype(jnp.float32)
    out[f"NDCG@{k}"] = jnp.where(hit_b, 1.0 / jnp.log2(rank_b + 2.0), 0.0)
  return out
