"""From text or vectors to ranked catalogue items: BM25 (the `bm25s` library), CALRec's merge of several
generated continuations, and dense cosine ranking with a cached catalogue-vector table.

Every ranking here breaks score ties by catalogue row (lower first, a stable sort), the same rule
`metrics.ranks_from_scores` uses, so a ranked list and the score matrix it came from give the same metrics.
Items excluded from a ranking (a user's history) score -inf; when fewer than k items remain, the list is
filled with `PAD_ID` (0, never a target).
"""

import glob
import hashlib
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence

import bm25s
import numpy as np

from clclm_jax.data.errors import DataError
from clclm_jax.data.records import PAD_ID


def item_rows(item_ids: np.ndarray, ids) -> np.ndarray:
  """Catalogue rows of item `ids` (any shape; PAD_ID maps to -1) given the catalogue's `item_ids` in row order."""
  ids = np.asarray(ids, np.int64)
  lookup = np.full(max(int(item_ids.max()), int(ids.max(initial=0))) + 1, -1, np.int64)
  lookup[item_ids] = np.arange(len(item_ids))
  rows = lookup[ids]
  unknown = (rows < 0) & (ids != PAD_ID)
  if unknown.any():
    raise ValueError(f"item ids {np.unique(ids[unknown])[:5].tolist()} are not in the catalogue")
  return rows


def exclusion_mask(item_ids: np.ndarray, exclude: Sequence[Sequence[int]], keep=None) -> np.ndarray:
  """[len(exclude), num_items] True where a row's item is in that query's `exclude` ids (e.g. its history),
  except the item `keep[q]` when given (a target that repeats a history item stays rankable)."""
  mask = np.zeros((len(exclude), len(item_ids)), bool)
  for q, ids in enumerate(exclude):
    if len(ids):
      mask[q, item_rows(item_ids, ids)] = True
  if keep is not None:
    mask[np.arange(len(exclude)), item_rows(item_ids, keep)] = False
  return mask


def top_k(scores_qn: np.ndarray, k: int, item_ids: np.ndarray, *, exclude=None) -> np.ndarray:
  """Item ids [Q, k] of the highest scores per row, ties by row; `exclude` (per query item ids) never appear."""
  scores_qn = np.array(scores_qn, np.float32, ndmin=2)
  if exclude is not None:
    scores_qn[exclusion_mask(item_ids, exclude)] = -np.inf
  k = min(k, scores_qn.shape[1])
  order = np.argsort(-scores_qn, axis=1, kind="stable")[:, :k]
  ids = item_ids[order]
  ids[np.take_along_axis(scores_qn, order, axis=1) == -np.inf] = PAD_ID
  return ids


def merge_round_robin(ranked_lists: Sequence[Sequence[int]], k: int | None = None, *,
                      exclude: Sequence[int] = ()) -> list[int]:
  """CALRec's quasi-round-robin merge of the rankings retrieved for several generated continuations: every
  list's rank-1 item in list order, then every rank-2 item, ..., skipping items already taken, `exclude`d
  items and padding; at most `k` items. Sampling more continuations thus widens the head of the ranking
  instead of letting one continuation's tail push the others' best guesses down."""
  seen, merged = {PAD_ID, *exclude}, []
  for rank in range(max((len(lst) for lst in ranked_lists), default=0)):
    for lst in ranked_lists:
      if rank < len(lst) and lst[rank] not in seen:
        seen.add(lst[rank])
        merged.append(int(lst[rank]))
        if k is not None and len(merged) == k:
          return merged
  return merged


def drop_history(ranked: Sequence[int], history: Sequence[int]) -> list[int]:
  """A ranked list without the user's history items (CALRec's optional filter of already-seen items)."""
  seen = set(history)
  return [int(i) for i in ranked if i not in seen]


# --- BM25 ----------------------------------------------------------------------------------------

def _tokenize(texts: Sequence[str]) -> list[list[str]]:
  """bm25s' tokenizer (lower-cased words of 2+ characters, English stopwords removed), same for both sides."""
  return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class BM25Index:
  """BM25 (bm25s' Lucene variant, k1=1.5, b=0.75) over the catalogue's item texts, row r being item `item_ids[r]`.

  It maps free text, e.g. an item line the LLM generated, to catalogue items; CALRec retrieves the generated
  continuation's nearest items this way."""

  def __init__(self, texts: Sequence[str], item_ids: Sequence[int] | None = None, *, k1: float = 1.5,
               b: float = 0.75):
    if not len(texts):
      raise DataError(None, None, "the catalogue has no item text", "index at least one item text")
    for row, text in enumerate(texts):
      if not text.strip():
        raise DataError(None, row, "the item text is empty", "render every item with nextitem.item_text")
    self.item_ids = np.asarray(item_ids if item_ids is not None else np.arange(1, len(texts) + 1), np.int64)
    if self.item_ids.shape != (len(texts),) or len(np.unique(self.item_ids)) != len(texts):
      raise ValueError(f"item_ids must be {len(texts)} distinct ids, one per text")
    self.retriever = bm25s.BM25(k1=k1, b=b)
    self.retriever.index(_tokenize(texts), show_progress=False)

  def __len__(self) -> int:
    return len(self.item_ids)

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    """BM25 scores [len(texts), num_items] of every catalogue item for each query text (0 without a shared word)."""
    out = np.zeros((len(texts), len(self)), np.float32)
    for q, tokens in enumerate(_tokenize(texts)):
      ids = self.retriever.get_tokens_ids(tokens)
      if ids:
        out[q] = self.retriever.get_scores_from_ids(ids)
    return out

  def retrieve(self, texts: Sequence[str], k: int, *, exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Item ids [len(texts), k] of each text's k best matches (ties by row; `exclude`d ids per text left out)."""
    return top_k(self.scores(texts), k, self.item_ids, exclude=exclude)

  def retrieve_merged(self, generations: Sequence[Sequence[str]], k: int, *,
                      exclude: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """Per user, the round-robin merge of the k-best lists of each generated continuation (`generations[u]`),
    `exclude[u]` (its history) left out before the merge so that k items remain."""
    out = []
    for u, texts in enumerate(generations):
      drop = [exclude[u]] * len(texts) if exclude is not None else None
      out.append(merge_round_robin(self.retrieve(texts, k, exclude=drop).tolist(), k))
    return out


# --- Dense ---------------------------------------------------------------------------------------

def normalize(x_nd: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Unit rows (a zero row stays zero), in float32."""
  x_nd = np.asarray(x_nd, np.float32)
  return x_nd / np.maximum(np.linalg.norm(x_nd, axis=-1, keepdims=True), eps)


def cosine_scores(user_bd: np.ndarray, item_nd: np.ndarray) -> np.ndarray:
  """Cosine similarity [B, N] of every user vector with every item vector."""
  return normalize(user_bd) @ normalize(item_nd).T


def dense_top_k(user_bd: np.ndarray, item_nd: np.ndarray, k: int, item_ids: np.ndarray | None = None, *,
                exclude: Sequence[Sequence[int]] | None = None, chunk: int = 1024) -> np.ndarray:
  """Item ids [B, k] of the k items most cosine-similar to each user vector, over the whole catalogue,
  `chunk` users at a time (the [B, N] score matrix of a full test set need not fit in memory)."""
  item_ids = np.asarray(item_ids if item_ids is not None else np.arange(1, len(item_nd) + 1), np.int64)
  items = normalize(item_nd)
  out = []
  for start in range(0, len(user_bd), chunk):
    part = slice(start, start + chunk)
    scores = normalize(user_bd[part]) @ items.T
    out.append(top_k(scores, k, item_ids, exclude=exclude[part] if exclude is not None else None))
  return np.concatenate(out) if out else np.zeros((0, min(k, len(item_ids))), np.int64)


def text_fingerprint(texts: Sequence[str]) -> str:
  """SHA-256 of the texts in order: part of a cache key, so an edited catalogue is re-encoded."""
  h = hashlib.sha256()
  for text in texts:
    h.update(text.encode("utf-8") + b"\0")
  return h.hexdigest()


def cached_vectors(run_dir: str | os.PathLike, key: Mapping | str, compute: Callable[[], np.ndarray], *,
                   name: str = "item_vectors") -> np.ndarray:
  """Vectors (a catalogue's items, a set of users) from `run_dir/{name}-{digest}.npy`, else `compute()` saved there.

  `key` names everything the vectors depend on (model and checkpoint step, pooling, `text_fingerprint` of
  the texts): its digest is in the file name, so a changed key misses the cache and recomputes, and older
  files of this name are removed (one file per name). Written to a temporary name then renamed, so a killed run leaves
  no half-written cache that a later run would read."""
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
  path = run_dir / f"{name}-{digest}.npy"
  if path.exists():
    return np.load(path)
  vectors = np.asarray(compute())
  fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}-", suffix=".npy.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, vectors)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  for stale in run_dir.glob(f"{glob.escape(name)}-*.npy"):
    if stale != path and re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{16}}\.npy", stale.name):
      stale.unlink()
  return vectors
