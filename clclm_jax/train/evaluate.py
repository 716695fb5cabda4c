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
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  ranks = ((ends - counts + ends + 1) / 2.0)[inverse]  # a tie group's average 1-based rank
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_bootstrap(p_a, p_b, labels, *, resamples: int = 1000, seed: int = 0) -> dict:
  """AUCs of two scorings of the same prompts and a 95% interval for their difference A - B: the prompts are
  resampled with replacement, the same draw for both (paired), the usual test for two runs on one test set.
  `p_a`, `p_b` may be `[runs, n]` (e.g. seeds): AUCs are then means over runs, each draw shared by all runs."""
  p_a, p_b, labels = np.atleast_2d(p_a), np.atleast_2d(p_b), np.asarray(labels).astype(bool)
  mean_auc = lambda p, idx: float(np.mean([auc(row[idx], labels[idx]) for row in p]))  # noqa: E731
  rng, diffs, every = np.random.default_rng(seed), [], np.arange(len(labels))
  for _ in range(resamples):
    idx = rng.integers(0, len(labels), len(labels))
    if labels[idx].all() or not labels[idx].any():
      continue
    diffs.append(mean_auc(p_a, idx) - mean_auc(p_b, idx))
  lo, hi = np.percentile(diffs, [2.5, 97.5])
  a, b = mean_auc(p_a, every), mean_auc(p_b, every)
  return {"n": int(len(labels)), "runs": len(p_a), "auc_a": a, "auc_b": b, "difference": a - b,
          "ci95": [float(lo), float(hi)], "share_a_not_better": float(np.mean(np.asarray(diffs) <= 0)),
          "resamples": len(diffs)}


def like_ratio_auc(interactions) -> float:
  """AUC of the no-training reference: P(Yes) = share of liked items in the prompt's history (0.5 if empty)."""
  return auc(np.array([np.mean(x.history_likes) if x.history_likes else 0.5 for x in interactions]),
             np.array([x.label for x in interactions]))


# Batch arrays a fused model (contrastive/fusion.py) reads beside the tokens, and its argument names.
FUSED_INPUTS = {"history_ids": "history_ids_bl", "history_feedback": "feedback_bl", "target_ids": "target_ids_b"}


def yes_probability(model: nnx.Module, batch: dict[str, jax.Array], yes_id: int, no_id: int,
                    prefix_kv=None) -> jax.Array:
  """softmax over (Yes, No) logits at `answer_index`; the LM head runs on those [b, d] rows only. A fused
  batch (with `history_feedback`) fills the prompt's soft tokens from its history; a residual fused model gives
  sigmoid of its `residual_logit` (encoder logit + what LoRA changes in the Yes-minus-No logit; the base pass is
  skipped where the batch carries its `base_logit`).

  With `prefix_kv` (the cached shared prefix), the batch holds only the tokens after the prefix.
  """
  fused = {arg: batch[k] for k, arg in FUSED_INPUTS.items()} if "history_feedback" in batch else {}
  if getattr(model, "residual", False):  # contrastive/fusion.py's residual fusion: its own answer logit
    if not fused:
      raise ValueError("a residual fused model scores fused batches (history ids, likes and target id)")
    return jax.nn.sigmoid(model.residual_logit(batch["tokens"], batch.get("positions"), attention_mask(batch),
                                               prefix_kv=prefix_kv, rows_b=batch["answer_index"],
                                               base_logit_b=batch.get("base_logit"), **fused))
  h_bd = model.hidden_states(batch["tokens"], batch.get("positions"), attention_mask(batch),
                            prefix_kv=prefix_kv, rows_b=batch["answer_index"], **fused)
  return yes_share(model, h_bd, yes_id, no_id)


def yes_share(model: nnx.Module, h_bd: jax.Array, yes_id: int, no_id: int) -> jax.Array:
  """P(Yes) = softmax over the (Yes, No) logits of the answer rows' hidden states `[b, d]`."""
  logits_b2 = model.lm_logits(h_bd)[:, jnp.array([yes_id, no_id])]
  return jax.nn.softmax(logits_b2, axis=-1)[:, 0]


def _eval_step(params, frozen, batch, prefix_kv, *, graphdef, yes_id, no_id):
  model = nnx.merge(graphdef, params, frozen)
  return yes_probability(model, batch, yes_id, no_id, prefix_kv), batch["label"], batch["index"]


def _base_logit_step(params, frozen, batch, prefix_kv, *, graphdef):
  model = nnx.merge(graphdef, params, frozen)
  return (model.base_answer_logit(batch["tokens"], batch.get("positions"), attention_mask(batch), prefix_kv=prefix_kv,
                                  rows_b=batch["answer_index"]), batch["label"], batch["index"])


def _prefix_step(params, frozen, prefix_p, *, graphdef):
  model = nnx.merge(graphdef, params, frozen)
  return model.prefix_cache(prefix_p)  # a fused model's is its LLM's (residual: with LoRA and without)


@dataclasses.dataclass(frozen=True)
class EvalStep:
  """Jitted scoring: `batch(params, frozen, batch, prefix_kv)` and `prefix(params, frozen, tokens_p)`."""

  batch: Callable
  prefix: Callable


def compile_eval_step(graphdef: nnx.GraphDef, params_sh, frozen_sh, mesh: Mesh, yes_id: int,
                      no_id: int, base_logit: bool = False) -> EvalStep:
  """Scoring steps whose outputs are replicated on every process; the prefix cache is replicated. `base_logit`:
  the batch step gives a residual fused model's `base_answer_logit` instead of P(Yes)."""
  rep = sharding.replicated(mesh)
  step = (functools.partial(_base_logit_step, graphdef=graphdef) if base_logit else
          functools.partial(_eval_step, graphdef=graphdef, yes_id=yes_id, no_id=no_id))
  return EvalStep(
      batch=jax.jit(step, in_shardings=(params_sh, frozen_sh, sharding.batch_sharding(mesh), rep), out_shardings=rep),
      prefix=jax.jit(functools.partial(_prefix_step, graphdef=graphdef),
                     in_shardings=(params_sh, frozen_sh, rep), out_shardings=rep))


def shared_prefix(batches: list[dict[str, np.ndarray]]) -> np.ndarray:
  """The longest token prefix of every real row (index >= 0) that ends before each row's answer index.

  Agreed across processes, so every process strips the same width and steps stay in lockstep.
  """
  rows = [b["tokens"][b["index"] >= 0] for b in batches]
  answer = [b["answer_index"][b["index"] >= 0] for b in batches]
  limit = min([int(a.min()) for a in answer if a.size] or [0])
  prefix = np.full(limit + 1, -1, np.int64)  # -1 beyond the prefix length
  width = 0
  if limit and any(r.size for r in rows):
    first = next(r[0] for r in rows if r.size)[:limit]
    same = np.all(np.stack([np.all(r[:, :limit] == first, axis=0) for r in rows if r.size]), axis=0)
    width = int(np.argmin(same)) if not same.all() else limit
    prefix[:width] = first[:width]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n = int(multihost_utils.process_allgather(np.int64(prefix.size)).max())
    all_p = multihost_utils.process_allgather(np.pad(prefix, (0, n - prefix.size), constant_values=-1))
    same = np.all(all_p == all_p[:1], axis=0) & (all_p[0] >= 0)
    width = int(np.argmin(same)) if not same.all() else n
    prefix = all_p[0]
  return prefix[:width].astype(np.int32)


def strip_prefix(batch: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
  """The batch without its first `width` tokens (the cached prefix); fill rows keep index -1."""
  out = dict(batch)
  for k in ("tokens", "positions", "attention_mask"):
    if k in batch:
      out[k] = batch[k][:, width:]
  out["answer_index"] = np.maximum(batch["answer_index"] - width, 0).astype(batch["answer_index"].dtype)
  return out


def progress(items, desc: str):
  """`items` with a progress bar (per batch, cleared when done) on the first process only."""
  return tqdm.tqdm(items, desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0)


@dataclasses.dataclass(frozen=True)
class Scores:
  p_yes: np.ndarray
  label: np.ndarray
  index: np.ndarray

  def metrics(self) -> dict[str, float]:
    return {"auc": auc(self.p_yes, self.label), "n": int(len(self.label)),
            "accuracy": float(np.mean((self.p_yes > 0.5) == (self.label == 1))),
            "mean_p_yes": float(np.mean(self.p_yes)), "p_yes_spread": float(np.ptp(self.p_yes))}


def collapsed(*notes: str | None, grad_norm: float | None = None, **spreads: float | None) -> str | None:
  """Why a model looks collapsed (it answers every prompt alike): the `notes` already found, zero gradients at the
  last step, or a split whose prompts all got the same P(Yes) (`p_yes_spread` <= 1e-6); None when nothing is."""
  why = [n for n in notes if n] + (["zero gradients at the last step"] if grad_norm == 0 else [])
  why += [f"every {split} prompt scored alike" for split, s in spreads.items() if s is not None and s <= 1e-6]
  return "; ".join(why) or None


def score(eval_step: EvalStep, params, frozen, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
          desc: str = "eval", share_prefix: bool = True, min_prefix: int = 16, stop_token: int | None = None
          ) -> Scores:
  """P(Yes) for every real row (index >= 0) of the batches, ordered by record index; shows progress.

  With `share_prefix`, the token prefix common to all prompts (TALLRec's instruction) runs once and
  its keys/values are reused by every batch, when it is at least `min_prefix` tokens long; it ends before
  the first `stop_token` (a soft-token placeholder, whose input is not the token's embedding).
  """
  keep = ("tokens", "positions", "attention_mask", "answer_index", "label", "index", "base_logit", *FUSED_INPUTS)
  batches = [{k: b[k] for k in keep if k in b} for b in batches]
  prefix = shared_prefix(batches) if share_prefix else np.zeros(0, np.int32)
  if stop_token is not None and (stops := np.flatnonzero(prefix == stop_token)).size:
    prefix = prefix[:stops[0]]
  prefix_kv = None
  if prefix.size >= min_prefix:
    prefix_kv = eval_step.prefix(params, frozen, jnp.asarray(prefix))
    batches = [strip_prefix(b, prefix.size) for b in batches]
  out = []
  for batch in progress(batches, desc):
    out.append(jax.device_get(eval_step.batch(params, frozen, sharding.global_batch(batch, mesh), prefix_kv)))
  p, label, index = (np.concatenate(x) for x in zip(*out))
  real = index >= 0
  order = np.argsort(index[real], kind="stable")
  return Scores(p[real][order], label[real][order], index[real][order])


@dataclasses.dataclass(frozen=True)
class Scorer:
  """The one scorer of a run: P(Yes) of a plain or fused model over eval batches, compiled once per model
  structure and mesh (`make_scorer`); `scorer(model, batches)` -> `Scores`. A model whose structure changed since
  (another `FusionConfig`, say) gets its own compiled step: scoring never runs a stale graph."""

  step: EvalStep
  graphdef: nnx.GraphDef
  mesh: Mesh
  yes_no: tuple[int, int]
  stop_token: int | None = None
  others: dict = dataclasses.field(default_factory=dict)  # (graphdef, base_logit) -> EvalStep: other steps

  def step_for(self, graphdef: nnx.GraphDef, params, frozen, base_logit: bool = False) -> EvalStep:
    if graphdef == self.graphdef and not base_logit:
      return self.step
    key = (graphdef, base_logit)
    if key not in self.others:
      self.others[key] = compile_eval_step(graphdef, sharding.state_sharding(params, self.mesh),
                                           sharding.state_sharding(frozen, self.mesh), self.mesh, *self.yes_no,
                                           base_logit=base_logit)
    return self.others[key]

  def __call__(self, model: nnx.Module, batches, desc: str = "eval") -> Scores:
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    with jax.set_mesh(self.mesh):
      return score(self.step_for(graphdef, params, frozen), params, frozen, batches, self.mesh, desc=desc,
                   stop_token=self.stop_token)

  def base_logits(self, model: nnx.Module, batches, desc: str = "base logits") -> np.ndarray:
    """A residual fused model's `base_answer_logit` (the frozen base's Yes-minus-No, LoRA off) of every prompt of
    text-only `batches`, ordered by record index: computed once, they ride with the batches as `base_logit`."""
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    with jax.set_mesh(self.mesh):
      return score(self.step_for(graphdef, params, frozen, base_logit=True), params, frozen, batches, self.mesh,
                   desc=desc, stop_token=self.stop_token).p_yes  # the slot holds the logits here


def make_scorer(model: nnx.Module, mesh: Mesh, yes_id: int, no_id: int, stop_token: int | None = None) -> Scorer:
  """A `Scorer` for `model`'s structure on `mesh` (trainable = `nnx.Param`, the rest frozen)."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  step = compile_eval_step(graphdef, sharding.state_sharding(params, mesh), sharding.state_sharding(frozen, mesh),
                           mesh, yes_id, no_id)
  return Scorer(step, graphdef, mesh, (yes_id, no_id), stop_token)


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
