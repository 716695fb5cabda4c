"""TALLRec scoring: P(Yes) from the Yes/No logits at the answer position, AUC over a split."""

from collections.abc import Callable, Iterable
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import tqdm
from jax.sharding import Mesh

from clclm_jax.train import sharding
from clclm_jax.train.step import attention_mask


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """ROC AUC by the Mann-Whitney rank statistic; tied scores share their average rank."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  n_pos, n_neg = labels.sum(), (~labels).sum()
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores))
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0  # average of the 1-based ranks s+1..e
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def yes_probability(model: nnx.Module, batch: dict[str, jax.Array], yes_id: int, no_id: int) -> jax.Array:
  """softmax over (Yes, No) logits at `answer_index`; the LM head runs on those [b, d] rows only."""
  h_btd = model.hidden_states(batch["tokens"], batch.get("positions"), attention_mask(batch))
  h_bd = jnp.take_along_axis(h_btd, batch["answer_index"][:, None, None], axis=1)[:, 0]
  logits_b2 = model.lm_logits(h_bd)[:, jnp.array([yes_id, no_id])]
  return jax.nn.softmax(logits_b2, axis=-1)[:, 0]


def _eval_step(params, frozen, batch, *, graphdef, yes_id, no_id):
  model = nnx.merge(graphdef, params, frozen)
  return yes_probability(model, batch, yes_id, no_id), batch["label"], batch["index"]


def compile_eval_step(graphdef: nnx.GraphDef, params_sh, frozen_sh, mesh: Mesh, yes_id: int,
                      no_id: int) -> Callable:
  """Jitted `(params, frozen, batch) -> (p_yes, label, index)`, outputs replicated on every process."""
  return jax.jit(functools.partial(_eval_step, graphdef=graphdef, yes_id=yes_id, no_id=no_id),
                 in_shardings=(params_sh, frozen_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Scores:
  p_yes: np.ndarray
  label: np.ndarray
  index: np.ndarray

  def metrics(self) -> dict[str, float]:
    return {"auc": auc(self.p_yes, self.label), "n": int(len(self.label)),
            "accuracy": float(np.mean((self.p_yes > 0.5) == (self.label == 1))),
            "mean_p_yes": float(np.mean(self.p_yes))}


def score(eval_step: Callable, params, frozen, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
          desc: str = "eval") -> Scores:
  """P(Yes) for every real row (index >= 0) of the batches, ordered by record index; shows progress."""
  keep = ("tokens", "positions", "attention_mask", "answer_index", "label", "index")
  out = []
  total = len(batches) if hasattr(batches, "__len__") else None
  for batch in tqdm.tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                         disable=jax.process_index() != 0):
    p, label, index = jax.device_get(eval_step(params, frozen, sharding.global_batch(
        {k: batch[k] for k in keep if k in batch}, mesh)))
    out.append((p, label, index))
  p, label, index = (np.concatenate(x) for x in zip(*out))
  real = index >= 0
  order = np.argsort(index[real], kind="stable")
  return Scores(p[real][order], label[real][order], index[real][order])


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop after `patience` evaluations without a better metric (higher is better)."""

  patience: int
  best: float = -np.inf
  best_step: int = -1
  bad_evals: int = 0

  def update(self, value: float, step: int) -> "EarlyStopping":
    if value > self.best:
      return dataclasses.replace(self, best=float(value), best_step=step, bad_evals=0)
    return dataclasses.replace(self, bad_evals=self.bad_evals + 1)

  @property
  def should_stop(self) -> bool:
    return self.bad_evals >= self.patience
