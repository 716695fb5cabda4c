"""Reference points for text-to-item retrieval: popularity and BM25 of the last history item, evaluated on
the full catalogue like every model here, and the seeded test-user subset the LLM evaluations share.

A scorer maps a chunk of examples to scores: [b, N] per example, or [N] shared by all (popularity); row r is
catalogue item r + 1 (`nextitem.NextItemData.item_ids`).
"""

from collections.abc import Callable, Sequence

import numpy as np

from clclm_jax.data import nextitem
from clclm_jax.seqrec import metrics, retrieval

Scorer = Callable[[Sequence[nextitem.Example]], np.ndarray]


def sample_examples(examples: Sequence[nextitem.Example], n: int, seed: int = 0) -> list[nextitem.Example]:
  """`n` examples drawn without replacement by `default_rng(seed)`, kept in their original order (all of them
  when there are fewer): generating text for every Beauty test user is slow, so LLM runs and the baselines
  they are compared with score the same subset, e.g. 2,000 users."""
  if n >= len(examples):
    return list(examples)
  picked = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
  return [examples[i] for i in picked]


def popularity_scores(data: nextitem.NextItemData) -> np.ndarray:
  """[N] how often each item occurs in the training histories (validation and test targets not counted)."""
  counts = np.zeros(data.num_items + 1, np.float32)
  for history in nextitem.train_histories(data):
    np.add.at(counts, np.asarray(history, np.int64), 1.0)
  return counts[1:]


def popularity_scorer(data: nextitem.NextItemData) -> Scorer:
  """Every user gets the training split's most popular items."""
  scores = popularity_scores(data)
  return lambda chunk: scores


def bm25_last_item_scorer(data: nextitem.NextItemData, index: retrieval.BM25Index | None = None) -> Scorer:
  """BM25 of the catalogue against the text of the user's most recent item: text retrieval with no model,
  the floor for a generated item line."""
  index = index if index is not None else retrieval.BM25Index(nextitem.catalogue_texts(data), data.item_ids)
  return lambda chunk: index.scores([nextitem.item_text(data, ex.history[-1]) for ex in chunk])


def rankings(scorer: Scorer, data: nextitem.NextItemData, examples: Sequence[nextitem.Example], *,
             exclude_history: bool = False) -> np.ndarray:
  """Full rankings [len(examples), N] of catalogue ids, best first (history items last as padding 0 when
  `exclude_history`)."""
  scores = np.broadcast_to(scorer(examples), (len(examples), data.num_items))
  exclude = [ex.history for ex in examples] if exclude_history else None
  return retrieval.top_k(scores, data.num_items, data.item_ids, exclude=exclude).astype(np.int32)


def evaluate(scorer: Scorer, data: nextitem.NextItemData, examples: Sequence[nextitem.Example], *,
             exclude_history: bool = False, chunk: int = 1024) -> dict[str, float]:
  """Full-catalogue Recall@{1,5,10} and NDCG@{5,10} of a scorer, `chunk` examples at a time."""
  ranks = []
  for start in range(0, len(examples), chunk):
    part = examples[start:start + chunk]
    exclude = [ex.history for ex in part] if exclude_history else None
    ranks.append(metrics.ranks_from_scores(scorer(part), [ex.target for ex in part], data.item_ids,
                                           exclude=exclude))
  return metrics.ranking_metrics(np.concatenate(ranks) if ranks else np.zeros(0, np.int64))
