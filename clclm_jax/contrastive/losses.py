"""Contrastive (InfoNCE / NT-Xent) and next-item cross-entropy losses.

Both are plain matrix products over the whole batch: under `jit` with the batch sharded over a
mesh, the compiler gathers what it needs, so the negatives are the global batch.
"""

import jax
import jax.numpy as jnp


def info_nce(z1_nd: jax.Array, z2_nd: jax.Array, *, temperature: float = 1.0,
             similarity: str = "dot") -> jax.Array:
  """NT-Xent over 2N views: each view's positive is its pair, the other 2N - 2 are negatives."""
  if similarity not in ("dot", "cosine"):
    raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
  z_md = jnp.concatenate([z1_nd, z2_nd], axis=0).astype(jnp.float32)
  if similarity == "cosine":
    z_md = z_md / jnp.maximum(jnp.linalg.norm(z_md, axis=-1, keepdims=True), 1e-8)
  n = z1_nd.shape[0]
  logits_mm = z_md @ z_md.T / temperature
  logits_mm = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits_mm)
  positive_m = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_probs_mm = jax.nn.log_softmax(logits_mm, axis=-1)
  return -jnp.take_along_axis(log_probs_mm, positive_m[:, None], axis=1).mean()


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
