"""Full-catalogue Recall@k and NDCG@k of next-item rankings, from ranked lists or from score matrices.

One held-out target per example, so Recall@k is the hit rate (the `HR@k` of `contrastive.metrics`, whose
per-example formulas are reused here) and NDCG@k = 1 / log2(rank + 2) when the 0-based rank is below k.
Every item of the catalogue competes (no sampled negatives). A score matrix ranks ties by catalogue row, the
rule of `retrieval.top_k`, so that a list and the scores it came from agree; excluded items (a user's
history, when asked) never outrank the target.
"""

from collections.abc import Sequence

import numpy as np

from clclm_jax.contrastive import metrics as id_metrics
from clclm_jax.seqrec.retrieval import exclusion_mask, item_rows

RECALL_KS = (1, 5, 10)
NDCG_KS = (5, 10)
MISS = 2**30  # the rank of a target that is not in its list


def ranks_from_lists(ranked: Sequence[Sequence[int]], targets: Sequence[int]) -> np.ndarray:
  """0-based rank of each target in its ranked list of item ids (`MISS` when absent: a list's length is its
  cutoff, so a top-5 list counts any target beyond it as missed at every k)."""
  if len(ranked) != len(targets):
    raise ValueError(f"{len(ranked)} ranked lists for {len(targets)} targets")
  ranks = np.full(len(targets), MISS, np.int64)
  for i, (lst, target) in enumerate(zip(ranked, targets)):
    hits = np.flatnonzero(np.asarray(lst) == target)
    if len(hits):
      ranks[i] = hits[0]
  return ranks


def ranks_from_scores(scores_bn: np.ndarray, targets: Sequence[int], item_ids: np.ndarray | None = None, *,
                      exclude: Sequence[Sequence[int]] | None = None, chunk: int = 1024) -> np.ndarray:
  """0-based rank of each target among all items: items scored higher, plus equal-scored items in earlier
  rows. `scores_bn` is [B, N], or [N] shared by every example (popularity); row r is `item_ids[r]`
  (default id r + 1); `exclude[b]` (e.g. the history) are dropped from example b's ranking, the target kept.
  Counted `chunk` examples at a time."""
  scores_bn = np.asarray(scores_bn, np.float32)
  num_items = scores_bn.shape[-1]
  item_ids = np.asarray(item_ids if item_ids is not None else np.arange(1, num_items + 1), np.int64)
  targets = np.asarray(targets, np.int64)
  rows = item_rows(item_ids, targets)
  if (rows < 0).any():
    raise ValueError("a target is the padding id")
  if scores_bn.ndim == 2 and len(scores_bn) != len(targets):
    raise ValueError(f"{len(scores_bn)} score rows for {len(targets)} targets")
  ranks = np.zeros(len(targets), np.int64)
  for start in range(0, len(targets), chunk):
    part = slice(start, start + chunk)
    scores = scores_bn[part] if scores_bn.ndim == 2 else scores_bn[None, :]
    target_b1 = np.take_along_axis(np.broadcast_to(scores, (len(rows[part]), num_items)), rows[part, None], axis=1)
    ahead_bn = (scores > target_b1) | ((scores == target_b1) & (np.arange(num_items) < rows[part, None]))
    if exclude is not None:
      ahead_bn &= ~exclusion_mask(item_ids, exclude[part], keep=targets[part])
    ranks[part] = ahead_bn.sum(axis=1)
  return ranks


def ranking_metrics(ranks: np.ndarray, recall_ks: Sequence[int] = RECALL_KS,
                    ndcg_ks: Sequence[int] = NDCG_KS) -> dict[str, float]:
  """Mean Recall@k and NDCG@k over examples, and `count`, the number of examples."""
  ranks = np.minimum(np.asarray(ranks, np.int64), MISS).astype(np.int32)
  ks = tuple(sorted(set(recall_ks) | set(ndcg_ks)))
  per_example = id_metrics.ranking_metrics(ranks, ks) if len(ranks) else {}
  out = {}
  for k in recall_ks:
    out[f"Recall@{k}"] = float(np.mean(per_example[f"HR@{k}"])) if len(ranks) else float("nan")
  for k in ndcg_ks:
    out[f"NDCG@{k}"] = float(np.mean(per_example[f"NDCG@{k}"])) if len(ranks) else float("nan")
  out["count"] = len(ranks)
  return out
