"""Pretraining of the sequence encoder, CL4SRec/CoSeRec style, as a stage of the one trainer: next-item CE +
lambda * InfoNCE.

`NextItemRec` is the encoder with what its loss reads (item correlations for the augmentations, the sampling
distribution of negatives, the loss settings); the losses are registered by name (`next_item`, `aug_cl`,
`dropout_cl`, `same_target_cl`) and share one encoder pass. `train` runs one `trainer.Stage`: epochs of
bucketed batches (`sequences.EpochBatches`), validation NDCG@10 every `eval_every` epochs with early stopping
(or the time budget), then the best parameters are evaluated on valid and test.
The next-item CE is a full softmax (`ce_negatives = 0`) or a sampled softmax over `ce_negatives`
shared negatives per step (`ce_sampling` 'uniform' or 'popularity' with logQ correction).
"""

import dataclasses
import functools
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clclm_jax.contrastive import losses, metrics
from clclm_jax.contrastive.encoder import SeqEncoder, pool
from clclm_jax.contrastive.fusion import ItemCorrelation
from clclm_jax.data import augment, sequences
from clclm_jax.train import sharding, trainer
from clclm_jax.train.step import register_loss


class SamplingLogQ(nnx.Variable):
  """A frozen `[vocab]` log-probability of drawing each item as a sampled negative."""


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """What the pretraining losses read beside the batch (static: part of the compiled step)."""

  pooling: str = "last"
  temperature: float = 1.0
  similarity: str = "dot"
  ce_negatives: int = 0
  ce_correction: bool = False  # logQ correction of popularity-sampled negatives
  dropout_cl_positions: int = 0
  augment: tuple[tuple[str, Any], ...] = ()  # `augment.two_views_batch` keywords


def augment_kwargs(cfg: ml_collections.ConfigDict, mask_id: int) -> dict[str, Any]:
  a = cfg.augment
  return dict(mask_id=mask_id, short_threshold=a.short_threshold, eta=a.crop_eta, gamma=a.mask_gamma,
              beta=a.reorder_beta, insert_rate=a.insert_rate, substitute_rate=a.substitute_rate)


def item_counts(data: sequences.SequenceData) -> np.ndarray:
  """Occurrences of each id [vocab] in the training sequences (popularity for sampling)."""
  return np.bincount(np.concatenate(sequences.train_sequences(data)), minlength=data.vocab_size)


class NextItemRec(nnx.Module):
  """The encoder and what its pretraining loss reads: ItemCF-IUF correlations (augmentation), the negatives'
  sampling log-probabilities and the loss settings."""

  def __init__(self, cfg: ml_collections.ConfigDict, data: sequences.SequenceData, *, item_corr=None):
    self.encoder = SeqEncoder(data.vocab_size, hidden=cfg.hidden, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                              max_len=cfg.max_len, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
                              rngs=nnx.Rngs(cfg.seed))
    if item_corr is None:
      item_corr = augment.itemcf_iuf(sequences.train_sequences(data), data.num_items, cfg.augment.corr_top_k)
    self.item_corr = ItemCorrelation(jnp.asarray(item_corr, jnp.int32))
    sampling = cfg.get("ce_sampling", "uniform")
    self.log_q = SamplingLogQ(losses.sampling_log_q(jnp.asarray(item_counts(data)), sampling))
    self.settings = LossSettings(
        pooling=cfg.pooling, temperature=cfg.temperature, similarity=cfg.similarity,
        ce_negatives=cfg.get("ce_negatives", 0), ce_correction=sampling != "uniform",
        dropout_cl_positions=cfg.get("dropout_cl_positions", 0),
        augment=tuple(sorted(augment_kwargs(cfg, data.mask_id).items())))


def next_item_loss(h_bld, table_vd, targets_bl, key, *, settings: LossSettings, log_q_v):
  """Full-softmax CE when `settings.ce_negatives` is 0, else sampled softmax over shared negatives."""
  if not settings.ce_negatives:
    return losses.next_item_ce(h_bld, table_vd, targets_bl)
  negatives_k, log_pi_v = losses.sample_negatives(key, log_q_v, settings.ce_negatives)
  return losses.sampled_next_item_ce(h_bld, table_vd, targets_bl, negatives_k,
                                     log_pi_v=log_pi_v if settings.ce_correction else None)


def sample_positions(key, a_bld, b_bld, mask_bl, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The same `k` real positions, drawn without replacement, of two passes -> ([k, d], [k, d], valid [k]);
  when the batch has fewer than k real positions, the padding drawn is marked invalid."""
  d = a_bld.shape[-1]
  mask_n = mask_bl.reshape(-1)
  pick_k = jax.random.choice(key, mask_n.shape[0], (k,), replace=False, p=mask_n / jnp.maximum(mask_n.sum(), 1))
  return a_bld.reshape(-1, d)[pick_k], b_bld.reshape(-1, d)[pick_k], mask_n[pick_k]


@register_loss("next_item", "aug_cl", "dropout_cl", "same_target_cl")
def next_item_losses(model: NextItemRec, batch, key: jax.Array, names) -> dict[str, jax.Array]:
  """From one encoder pass over the sequence and the views the asked terms need: `next_item` (CE over next
  items at every real position), `aug_cl` (InfoNCE between two augmented views), DuoRec's `dropout_cl`
  (InfoNCE between two dropout passes of the unaugmented sequence, at its last position or at
  `dropout_cl_positions` real positions drawn from the batch) and `same_target_cl` (InfoNCE between the sequence
  and `batch["same_target"]`, another user's prefix before the same next item)."""
  s = model.settings
  aug_key, drop_key, neg_key = jax.random.split(key, 3)
  items_bl = batch["items"]
  b = items_bl.shape[0]
  parts = [items_bl]
  if "aug_cl" in names:
    v1_bl, _, v2_bl, _ = augment.two_views_batch(aug_key, items_bl, batch["lengths"], model.item_corr[...],
                                                  **dict(s.augment))
    parts += [v1_bl, v2_bl]
  if "dropout_cl" in names:
    parts.append(items_bl)
  if "same_target_cl" in names:
    parts.append(batch["same_target"])
  all_bl = jnp.concatenate(parts)
  h_bld = model.encoder(all_bl, dropout_key=drop_key)
  z_nd = pool(h_bld, all_bl > 0, s.pooling)
  nce = functools.partial(losses.info_nce, temperature=s.temperature, similarity=s.similarity)
  part = lambda i: slice(i * b, (i + 1) * b)  # noqa: E731
  terms, at = {}, 1
  if "next_item" in names:
    terms["next_item"], _ = next_item_loss(h_bld[:b], model.encoder.item_table(), batch["targets"], neg_key,
                                           settings=s, log_q_v=model.log_q[...])
  if "aug_cl" in names:
    terms["aug_cl"], at = nce(z_nd[part(1)], z_nd[part(2)]), 3
  if "dropout_cl" in names:
    if s.dropout_cl_positions:
      pick_key = jax.random.fold_in(drop_key, 1)
      z1_kd, z2_kd, valid_k = sample_positions(pick_key, h_bld[:b], h_bld[part(at)], items_bl > 0,
                                               s.dropout_cl_positions)
      terms["dropout_cl"] = nce(z1_kd, z2_kd, valid_n=valid_k)
    else:
      terms["dropout_cl"] = nce(z_nd[:b], z_nd[part(at)])
  if "same_target_cl" in names:
    terms["same_target_cl"] = nce(z_nd[:b], z_nd[-b:])
  return terms


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "exclude_history"))
def _ranks(params, rest, items_bl, target_b, *, graphdef, pooling, exclude_history):
  encoder = nnx.merge(graphdef, params, rest)
  scores_bv = encoder.encode(items_bl, pooling=pooling) @ encoder.item_table().T
  return metrics.target_rank(scores_bv, target_b, history_bl=items_bl, exclude_history=exclude_history)


def evaluate(model: NextItemRec, data: sequences.SequenceData, part: str, cfg, *,
             exclude_history: bool | None = None) -> dict[str, float]:
  """Mean HR@k / NDCG@k over all users for 'valid' or 'test' (full ranking); `exclude_history` (default
  `cfg.exclude_history`) drops the input's items from the ranking."""
  exclude = cfg.exclude_history if exclude_history is None else exclude_history
  graphdef, params, rest = nnx.split(model.encoder, nnx.Param, ...)
  ranks = [np.asarray(_ranks(params, rest, b["items"], b["target"], graphdef=graphdef, pooling=cfg.pooling,
                             exclude_history=exclude))
           for b in sequences.eval_batches(data, part, cfg.eval_batch_size, buckets=tuple(cfg.buckets))]
  per_user = metrics.ranking_metrics(jnp.asarray(np.concatenate(ranks)))
  return {k: float(v.mean()) for k, v in per_user.items()}


def loss_weights(cfg: ml_collections.ConfigDict) -> dict[str, float]:
  return {"next_item": 1.0, "aug_cl": cfg.cl_weight, "dropout_cl": cfg.get("dropout_cl_weight", 0.0),
          "same_target_cl": cfg.get("same_target_cl_weight", 0.0)}


def stage(cfg: ml_collections.ConfigDict, model: NextItemRec, data: sequences.SequenceData,
          workdir: pathlib.Path) -> trainer.Stage:
  """Encoder pretraining as a stage: `num_epochs` epochs of bucketed batches, validation NDCG@10 every
  `eval_every` epochs, stopping after `patience` validations without a better one or at the time budget."""
  same = sequences.same_target_index(data) if cfg.get("same_target_cl_weight", 0.0) else None
  make_epoch = lambda epoch: list(sequences.train_batches(  # noqa: E731
      data, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]), buckets=tuple(cfg.buckets), same_target=same))
  per_epoch = len(make_epoch(0))
  optim = ml_collections.ConfigDict(dict(lr=cfg.lr, warmup_steps=0, schedule="constant", max_grad_norm=0.0,
                                         b1=0.9, b2=0.999, weight_decay=0.0))
  return trainer.Stage(
      f"pretrain {data.name}", pathlib.Path(workdir), lambda: sequences.EpochBatches(make_epoch), loss_weights(cfg),
      cfg.num_epochs * per_epoch, optim, cfg.batch_size, cfg.batch_size,
      validate=lambda m: evaluate(m, data, "valid", cfg), metric="NDCG@10", eval_every=cfg.eval_every * per_epoch,
      patience=cfg.patience, checkpoint_every=per_epoch, seed=cfg.seed, config=cfg,
      max_seconds=cfg.time_budget_min * 60, title=f"encoder pretraining on {data.name} ({per_epoch} steps an epoch)")


def train(cfg: ml_collections.ConfigDict, data: sequences.SequenceData,
          workdir: str | pathlib.Path | None = None) -> dict[str, Any]:
  """Trains in `workdir` (resumable; a temporary folder when None) with early stopping on valid NDCG@10;
  returns a summary with valid/test metrics of the best parameters under both ranking protocols."""
  workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix=f"pretrain_{data.name}_"))
  model = NextItemRec(cfg, data)
  mesh = sharding.make_mesh(cfg.get("mesh", (-1, 1, 1)))
  run = trainer.run([stage(cfg, model, data, workdir)], model, mesh)[-1]
  per_epoch = run["total_steps"] // cfg.num_epochs
  other = "test_history_excluded" if not cfg.exclude_history else "test_history_kept"
  summary = {"dataset": data.name, "epochs": -(-run["steps"] // per_epoch), "best_epoch": run["best_step"] // per_epoch,
             "train_seconds": run["wall_s"], "epoch_seconds_mean": run["wall_s"] * per_epoch / max(run["steps"], 1),
             "stopped": run["stopped"], "preempted": run["preempted"],
             "valid": evaluate(model, data, "valid", cfg), "test": evaluate(model, data, "test", cfg),
             # The same parameters under the other protocol (reference papers differ on history items).
             other: evaluate(model, data, "test", cfg, exclude_history=not cfg.exclude_history)}
  print(f"[{data.name}] {summary['epochs']} epochs ({summary['train_seconds'] / 60:.1f} min), best epoch "
        f"{summary['best_epoch']}: " + " ".join(f"test {k} {v:.4f}" for k, v in summary["test"].items()))
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run lines of `train`'s summary: how training stopped, then valid and test metrics."""
  lines = [f"{'dataset':<18}{summary['dataset']}", f"{'epochs':<18}{summary['epochs']} (best {summary['best_epoch']}, "
           f"stopped by {summary['stopped']}, {summary['train_seconds'] / 60:.1f} min)"]
  labels = {"valid": "valid", "test": "test", "test_history_excluded": "test, history out",
            "test_history_kept": "test, history in"}
  for part, label in labels.items():
    if part in summary:
      lines.append(f"{label:<18}" + "  ".join(f"{k} {v:.4f}" for k, v in summary[part].items()
                                               if k.endswith(("@5", "@10"))))
  return "\n".join(lines)
