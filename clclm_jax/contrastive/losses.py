"""Contrastive (InfoNCE / NT-Xent) and next-item cross-entropy losses, and CLCLMRec's joint losses.

InfoNCE and the next-item CE are plain matrix products over the whole batch: under `jit` with the batch sharded
over a mesh, the compiler gathers what it needs, so the negatives are the global batch. The next-item CE comes
as a full softmax over all items or a sampled softmax over K shared negatives per step.

CLCLMRec's losses on fused batches (`data/fused.py`), registered by name for `train.step` and weighted by a
stage's loss weights (off when absent or 0):
  `text_lm`   next-token CE on the text-only prompt where `loss_mask` is 1 (LM head on those rows only);
  `fused_lm`  the same on the fused prompt (soft tokens at the placeholders);
  `seq_cl`    InfoNCE between two augmented views (data/augment.py) of the history through the encoder;
  `text_cl`   InfoNCE between the LLM's mean-pooled states of two text views (data/textviews.py);
  `align_cl`  CALRec-style InfoNCE between the LLM's pooled history span and the encoder's user state;
  `hint_kd`   cross-entropy of the fused prompt's (Yes, No) answer against the encoder's P(like) (distillation);
  `residual_answer`  binary cross-entropy of a residual fused model's answer logit (encoder logit + what LoRA
              changes in the Yes-minus-No logit, `FusedRec.residual_logit`) against the label.
The recipe's stage 1 trains `text_lm` on text-only prompts; stage 2 the others on fused prompts.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from clclm_jax.contrastive.fusion import FEEDBACK_BITS, FusedRec
from clclm_jax.data import augment
from clclm_jax.model.llama import take_rows
from clclm_jax.train.step import register_loss


def info_nce(z1_nd: jax.Array, z2_nd: jax.Array, *, temperature: float = 1.0,
             similarity: str = "dot", valid_n: jax.Array | None = None, same_side: bool = True) -> jax.Array:
  """NT-Xent over 2N views: each view's positive is its pair, the other 2N - 2 are negatives.

  `same_side=False` keeps only the other side's views as negatives (CLIP's symmetric loss: N - 1 negatives per
  anchor, chance ln N): for two towers whose own outputs are far more alike than they are like the other tower's
  (an LLM's mean-pooled prompts share their template), same-side negatives outscore every positive at the start.

  Pairs with `valid_n` False take no part: neither anchors nor negatives (the mean is over valid ones; 0 when
  none is). Their values are replaced before use (ones as vectors: a zero vector's norm has a NaN gradient;
  zeros as an anchor's logits: a row with every column masked is NaN when no pair is valid), since a NaN there
  would reach the valid rows' gradients as 0 x NaN. The valid pairs' loss is unchanged by it.
  """
  if similarity not in ("dot", "cosine"):
    raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
  n = z1_nd.shape[0]
  valid_m = jnp.ones(2 * n, bool) if valid_n is None else jnp.concatenate([valid_n, valid_n])
  z_md = jnp.where(valid_m[:, None], jnp.concatenate([z1_nd, z2_nd], axis=0).astype(jnp.float32), 1.0)
  if similarity == "cosine":
    z_md = z_md / jnp.maximum(jnp.linalg.norm(z_md, axis=-1, keepdims=True), 1e-8)
  logits_mm = z_md @ z_md.T / temperature
  side_m = jnp.arange(2 * n) < n
  masked_mm = jnp.eye(2 * n, dtype=bool) if same_side else side_m[:, None] == side_m[None, :]
  logits_mm = jnp.where(masked_mm | ~valid_m[None, :], -jnp.inf, logits_mm)
  logits_mm = jnp.where(valid_m[:, None], logits_mm, 0.0)
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


# --- CLCLMRec's joint losses ------------------------------------------------------------------------

def target_ce(model: FusedRec, h_btd: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Mean next-token CE at `target_index` (0 = padding); the LM head runs on those rows only."""
  idx_bn = batch["target_index"]
  h_bnd = jnp.take_along_axis(h_btd, jnp.maximum(idx_bn - 1, 0)[..., None], axis=1)
  targets_bn = jnp.take_along_axis(batch["tokens"], idx_bn, axis=1)
  ce_bn = optax.softmax_cross_entropy_with_integer_labels(model.lm_logits(h_bnd), targets_bn)
  w_bn = (idx_bn > 0).astype(jnp.float32)
  return jnp.sum(ce_bn * w_bn) / jnp.maximum(jnp.sum(w_bn), 1.0)


def masked_mean(h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """`[b, d]` float32 mean of the states where `mask_bt` is 1 (zeros for an empty mask)."""
  m_bt1 = mask_bt[..., None].astype(jnp.float32)
  return (h_btd.astype(jnp.float32) * m_bt1).sum(1) / jnp.maximum(m_bt1.sum(1), 1.0)


def left_to_right(seq_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Left-padded rows -> right-padded rows (the layout of data/augment.py) and their lengths."""
  l = seq_bl.shape[1]
  n_b = (seq_bl > 0).sum(1)
  idx_bl = (jnp.arange(l)[None] + (l - n_b)[:, None]) % l
  return jnp.take_along_axis(seq_bl, idx_bl, axis=1), n_b


@register_loss("text_lm", per_token=("text_lm",))
def text_lm_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """Next-token CE of the text-only prompt: step.py's `lm` with the LM head on the target rows only."""
  h_btd = model.hidden_states(batch["tokens"], batch.get("positions"), batch["attention_mask"], dropout_key=key)
  return target_ce(model, h_btd, batch)


def fused_hidden(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array | None = None, **kw) -> jax.Array:
  """`model.hidden_states` of the batch's fused prompt (soft tokens from its history, likes and target)."""
  return model.hidden_states(batch["tokens"], batch.get("positions"), batch["attention_mask"],
                             history_ids_bl=batch["history_ids"], feedback_bl=batch["history_feedback"],
                             target_ids_b=batch["target_ids"], dropout_key=key, **kw)


@register_loss("fused_lm", "hint_kd", per_token=("fused_lm",))
def fused_losses(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array,
                 names: Sequence[str]) -> dict[str, jax.Array]:
  """The fused prompt's terms from one forward: `fused_lm` (its next-token CE) and `hint_kd` (CE of its
  softmax over the (Yes, No) logits against the encoder's P(like), the answer hint's p held fixed and
  without dropout: distils the encoder's ranking into the answer)."""
  c = model.config
  if "hint_kd" in names and c.answer_hint is None:
    raise ValueError("the hint_kd loss needs FusionConfig.answer_hint (the (Yes, No) token ids)")
  h_btd = fused_hidden(model, batch, key)
  terms = {"fused_lm": target_ce(model, h_btd, batch)} if "fused_lm" in names else {}
  if "hint_kd" in names:
    h_bd = take_rows(h_btd, batch["answer_index"])[:, 0]
    logp_b2 = jax.nn.log_softmax(model.lm_logits(h_bd)[:, jnp.asarray(c.answer_hint)].astype(jnp.float32), -1)
    z_be, _ = model.encode_history(batch["history_ids"], batch["history_feedback"], batch["target_ids"])
    p_b = jax.lax.stop_gradient(jax.nn.sigmoid(c.hint_scale * model.like_logit(z_be)))
    terms["hint_kd"] = -jnp.mean(p_b * logp_b2[:, 0] + (1 - p_b) * logp_b2[:, 1])
  return terms


@register_loss("residual_answer")
def residual_answer_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """Mean binary cross-entropy of the residual answer logit at `answer_index` against `label` (Yes = 1); a batch
  with `base_logit` (text-only prompts' base pass, computed once) runs only the LoRA pass."""
  if not model.residual:
    raise ValueError("the residual_answer loss needs FusionConfig.mode='residual' (config.fusion.mode)")
  logit_b = model.residual_logit(batch["tokens"], batch.get("positions"), batch["attention_mask"],
                                 history_ids_bl=batch["history_ids"], feedback_bl=batch["history_feedback"],
                                 target_ids_b=batch["target_ids"], rows_b=batch["answer_index"], dropout_key=key,
                                 base_logit_b=batch.get("base_logit"))
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logit_b, batch["label"].astype(jnp.float32)))


@register_loss("seq_cl")
def seq_cl_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """InfoNCE between two augmented views of each history; ids and likes travel together (id * 4 + like)."""
  c = model.config
  aug_key, drop_key = jax.random.split(key)
  packed_bl, n_b = left_to_right(batch["history_ids"] * FEEDBACK_BITS + batch["history_feedback"])
  v1_bl, _, v2_bl, _ = augment.two_views_batch(
      aug_key, packed_bl, n_b, model.packed_corr(), mask_id=c.mask_id * FEEDBACK_BITS,
      short_threshold=c.short_threshold, eta=c.crop_eta, gamma=c.mask_gamma, beta=c.reorder_beta,
      insert_rate=c.insert_rate, substitute_rate=c.substitute_rate)
  views_bl = jnp.concatenate([v1_bl, v2_bl])
  z_be, _ = model.encode_history(views_bl // FEEDBACK_BITS, views_bl % FEEDBACK_BITS, dropout_key=drop_key)
  b = v1_bl.shape[0]
  return info_nce(z_be[:b], z_be[b:], temperature=c.seq_temperature, similarity="cosine")


@register_loss("text_cl")
def text_cl_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """InfoNCE between the LLM's mean-pooled final states of two text views of the same user (one pass)."""
  tokens_bt = jnp.concatenate([batch["view1_tokens"], batch["view2_tokens"]])
  mask_bt = jnp.concatenate([batch["view1_mask"], batch["view2_mask"]])
  z_bd = masked_mean(model.llm.hidden_states(tokens_bt, None, mask_bt, dropout_key=key), mask_bt)
  b = batch["view1_tokens"].shape[0]
  return info_nce(z_bd[:b], z_bd[b:], temperature=model.config.text_temperature, similarity="cosine")


@register_loss("align_cl")
def align_cl_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """InfoNCE between the LLM's pooled history span (before the placeholders) and the encoder's user state."""
  llm_key, enc_key = jax.random.split(key)
  h_btd = model.llm.hidden_states(batch["tokens"], batch.get("positions"), batch["attention_mask"],
                                  dropout_key=llm_key)
  v_be = model.align_proj(masked_mean(h_btd, batch["history_mask"]))
  z_be, _ = model.encode_history(batch["history_ids"], batch["history_feedback"], dropout_key=enc_key)
  return info_nce(v_be, z_be, temperature=model.config.align_temperature, similarity="cosine")
