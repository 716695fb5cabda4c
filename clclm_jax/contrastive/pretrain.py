"""Pretraining of the sequence encoder, CL4SRec/CoSeRec style: next-item CE + lambda * InfoNCE.

The state is a plain dict (params, rest, opt_state, step, rng); `train_step(state, batch)` is pure
and jitted once per padded width with the state donated. Training stops early on validation
NDCG@10 (or at the time budget) and the best parameters are evaluated on valid and test.
The next-item CE is a full softmax (`ce_negatives = 0`) or a sampled softmax over `ce_negatives`
shared negatives per step (`ce_sampling` 'uniform' or 'popularity' with logQ correction).
"""

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from clclm_jax.contrastive import losses, metrics
from clclm_jax.contrastive.encoder import SeqEncoder, pool
from clclm_jax.data import augment, sequences

State = dict[str, Any]


def build_model(cfg: ml_collections.ConfigDict, vocab_size: int) -> SeqEncoder:
  return SeqEncoder(vocab_size, hidden=cfg.hidden, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                    max_len=cfg.max_len, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
                    rngs=nnx.Rngs(cfg.seed))


def init_state(model: SeqEncoder, tx: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, State]:
  """Splits the model: trainable `nnx.Param`s get the optimiser, everything else rides along."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = {"params": params, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key(seed)}
  return graphdef, state


def augment_kwargs(cfg: ml_collections.ConfigDict, mask_id: int) -> dict[str, Any]:
  a = cfg.augment
  return dict(mask_id=mask_id, short_threshold=a.short_threshold, eta=a.crop_eta, gamma=a.mask_gamma,
              beta=a.reorder_beta, insert_rate=a.insert_rate, substitute_rate=a.substitute_rate)


def item_counts(data: sequences.SequenceData) -> np.ndarray:
  """Occurrences of each id [vocab] in the training sequences (popularity for sampling)."""
  return np.bincount(np.concatenate(sequences.train_sequences(data)), minlength=data.vocab_size)


def next_item_loss(h_bld, table_vd, targets_bl, key, *, cfg, log_q_v):
  """Full-softmax CE when `cfg.ce_negatives` is 0, else sampled softmax over shared negatives."""
  k = cfg.get("ce_negatives", 0)
  if not k:
    return losses.next_item_ce(h_bld, table_vd, targets_bl)
  negatives_k, log_pi_v = losses.sample_negatives(key, log_q_v, k)
  correct = cfg.get("ce_sampling", "uniform") != "uniform"
  return losses.sampled_next_item_ce(h_bld, table_vd, targets_bl, negatives_k, log_pi_v=log_pi_v if correct else None)


def sample_positions(key, a_bld, b_bld, mask_bl, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The same `k` real positions, drawn without replacement, of two passes -> ([k, d], [k, d], valid [k]);
  when the batch has fewer than k real positions, the padding drawn is marked invalid."""
  d = a_bld.shape[-1]
  mask_n = mask_bl.reshape(-1)
  pick_k = jax.random.choice(key, mask_n.shape[0], (k,), replace=False, p=mask_n / jnp.maximum(mask_n.sum(), 1))
  return a_bld.reshape(-1, d)[pick_k], b_bld.reshape(-1, d)[pick_k], mask_n[pick_k]


def loss_fn(params, rest, batch, key, *, graphdef, corr_vk, cfg, aug, log_q_v=None):
  """CE over next items + cl_weight * InfoNCE between two augmented views, plus DuoRec's views:
  dropout_cl_weight * InfoNCE between two dropout passes of the unaugmented sequence (at its last position,
  or at `dropout_cl_positions` real positions drawn from the batch), and
  same_target_cl_weight * InfoNCE between the sequence and `batch["same_target"]` (supervised positives)."""
  model = nnx.merge(graphdef, params, rest)
  aug_key, drop_key, neg_key = jax.random.split(key, 3)
  items_bl = batch["items"]
  b = items_bl.shape[0]
  v1_bl, _, v2_bl, _ = augment.two_views_batch(aug_key, items_bl, batch["lengths"], corr_vk, **aug)
  dropout_weight, same_weight = cfg.get("dropout_cl_weight", 0.0), cfg.get("same_target_cl_weight", 0.0)
  extra = ([items_bl] if dropout_weight > 0 else []) + ([batch["same_target"]] if same_weight > 0 else [])
  # One encoder pass for the sequence, both views and the optional DuoRec views.
  all_bl = jnp.concatenate([items_bl, v1_bl, v2_bl] + extra)
  h_bld = model(all_bl, dropout_key=drop_key)
  ce, count = next_item_loss(h_bld[:b], model.item_table(), batch["targets"], neg_key, cfg=cfg, log_q_v=log_q_v)
  z_nd = pool(h_bld, all_bl > 0, cfg.pooling)
  nce = functools.partial(losses.info_nce, temperature=cfg.temperature, similarity=cfg.similarity)
  cl = nce(z_nd[b:2 * b], z_nd[2 * b:3 * b])
  cl_dropout = jnp.zeros(())
  if dropout_weight > 0 and cfg.get("dropout_cl_positions", 0):
    pick_key = jax.random.fold_in(drop_key, 1)  # a new stream: the other draws stay as without positions
    z1_kd, z2_kd, valid_k = sample_positions(pick_key, h_bld[:b], h_bld[3 * b:4 * b], items_bl > 0,
                                             cfg.dropout_cl_positions)
    cl_dropout = nce(z1_kd, z2_kd, valid_n=valid_k)
  elif dropout_weight > 0:
    cl_dropout = nce(z_nd[:b], z_nd[3 * b:4 * b])
  cl_same = nce(z_nd[:b], z_nd[-b:]) if same_weight > 0 else jnp.zeros(())
  loss = ce + cfg.cl_weight * cl + dropout_weight * cl_dropout + same_weight * cl_same
  return loss, {"loss": loss, "ce": ce, "cl": cl, "cl_dropout": cl_dropout, "cl_same": cl_same, "targets": count}


def train_step(state: State, batch: dict[str, jax.Array], *, graphdef, tx, corr_vk, cfg, aug,
               log_q_v=None) -> tuple[State, dict]:
  key = jax.random.fold_in(state["rng"], state["step"])
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef, corr_vk=corr_vk, cfg=cfg, aug=aug,
                                                 log_q_v=log_q_v), has_aux=True)
  (_, aux), grads = grad_fn(state["params"], state["rest"], batch, key)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                   step=state["step"] + 1)
  return new_state, aux


def make_train_step(graphdef, tx, corr_vk, cfg, mask_id: int,
                    counts_v: np.ndarray | None = None) -> Callable[[State, dict], tuple[State, dict]]:
  """Jitted step; `counts_v` (item frequencies) only matters for popularity-sampled negatives."""
  log_q_v = None
  if cfg.get("ce_negatives", 0):
    if counts_v is None:
      if cfg.get("ce_sampling", "uniform") != "uniform":
        raise ValueError("popularity-sampled negatives need counts_v (item_counts(data))")
      counts_v = np.zeros(corr_vk.shape[0])
    log_q_v = losses.sampling_log_q(jnp.asarray(counts_v), cfg.get("ce_sampling", "uniform"))
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, corr_vk=corr_vk, cfg=cfg,
                           aug=augment_kwargs(cfg, mask_id), log_q_v=log_q_v)
  return jax.jit(step, donate_argnums=0)


def make_rank_fn(graphdef, cfg, *, exclude_history: bool | None = None) -> Callable:
  """Jitted target ranks; `exclude_history` (default `cfg.exclude_history`) drops the input's items."""
  exclude = cfg.exclude_history if exclude_history is None else exclude_history

  @jax.jit
  def rank(params, rest, items_bl, target_b):
    model = nnx.merge(graphdef, params, rest)
    scores_bv = model.encode(items_bl, pooling=cfg.pooling) @ model.item_table().T
    return metrics.target_rank(scores_bv, target_b, history_bl=items_bl, exclude_history=exclude)
  return rank


def evaluate(rank_fn, state: State, data: sequences.SequenceData, part: str, cfg) -> dict[str, float]:
  """Mean HR@k / NDCG@k over all users for 'valid' or 'test' (full ranking)."""
  ranks = [np.asarray(rank_fn(state["params"], state["rest"], b["items"], b["target"]))
           for b in sequences.eval_batches(data, part, cfg.eval_batch_size, buckets=tuple(cfg.buckets))]
  per_user = metrics.ranking_metrics(jnp.asarray(np.concatenate(ranks)))
  return {k: float(v.mean()) for k, v in per_user.items()}


def train(cfg: ml_collections.ConfigDict, data: sequences.SequenceData) -> dict[str, Any]:
  """Trains with early stopping on valid NDCG@10; returns a summary with valid/test metrics."""
  model = build_model(cfg, data.vocab_size)
  tx = optax.adam(cfg.lr)
  graphdef, state = init_state(model, tx, cfg.seed)
  corr_vk = jnp.asarray(augment.itemcf_iuf(sequences.train_sequences(data), data.num_items, cfg.augment.corr_top_k))
  step_fn = make_train_step(graphdef, tx, corr_vk, cfg, data.mask_id, item_counts(data))
  same_target = sequences.same_target_index(data) if cfg.get("same_target_cl_weight", 0.0) else None
  rank_fn = make_rank_fn(graphdef, cfg)
  rng = np.random.default_rng(cfg.seed)
  best_ndcg, best_epoch, best_params, epoch_times, history = -1.0, -1, None, [], []
  start = time.time()
  bar = tqdm(range(1, cfg.num_epochs + 1), desc=f"pretrain {data.name}", unit="epoch")
  for epoch in bar:
    t0 = time.time()
    sums = []
    for batch in sequences.train_batches(data, cfg.batch_size, rng, buckets=tuple(cfg.buckets),
                                         same_target=same_target):
      state, aux = step_fn(state, batch)
      sums.append(aux)
    sums = jax.device_get(sums)
    epoch_times.append(time.time() - t0)
    record = {"epoch": epoch, "seconds": epoch_times[-1],
              **{k: float(np.mean([s[k] for s in sums])) for k in sums[0] if k != "targets"}}
    if epoch % cfg.eval_every == 0:
      valid = evaluate(rank_fn, state, data, "valid", cfg)
      record.update({f"valid/{k}": v for k, v in valid.items()})
      if valid["NDCG@10"] > best_ndcg:
        best_ndcg, best_epoch, best_params = valid["NDCG@10"], epoch, jax.device_get(state["params"])
    history.append(record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", cl=f"{record['cl']:.3f}",
                    ndcg10=f"{record.get('valid/NDCG@10', float('nan')):.4f}", best=best_epoch)
    if epoch - best_epoch >= cfg.patience * cfg.eval_every and best_epoch > 0:
      break
    if time.time() - start > cfg.time_budget_min * 60:
      break
  bar.close()
  if best_params is not None:
    state = dict(state, params=jax.device_put(best_params))
  summary = {"dataset": data.name, "epochs": len(history), "best_epoch": best_epoch,
             "train_seconds": time.time() - start, "epoch_seconds_median": float(np.median(epoch_times)),
             "valid": evaluate(rank_fn, state, data, "valid", cfg),
             "test": evaluate(rank_fn, state, data, "test", cfg), "history": history,
             # The same parameters under the other protocol (reference papers differ on history items).
             "test_history_excluded" if not cfg.exclude_history else "test_history_kept":
                 evaluate(make_rank_fn(graphdef, cfg, exclude_history=not cfg.exclude_history), state, data, "test", cfg)}
  print(f"[{data.name}] {summary['epochs']} epochs ({summary['train_seconds'] / 60:.1f} min, "
        f"{summary['epoch_seconds_median']:.1f} s/epoch), best epoch {best_epoch}: "
        + " ".join(f"test {k} {v:.4f}" for k, v in summary["test"].items()))
  return summary
