"""Few-shot training sets with TALLRec's semantics: shuffle the pool with the seed, keep the first n.

TALLRec calls Hugging Face `datasets` `shuffle(seed).select(range(n))`; we use a numpy permutation
instead, so the chosen examples differ from TALLRec's for the same seed (same distribution, and
deterministic per seed here). Smaller n with the same seed are prefixes of larger ones.
"""

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from clclm_jax.data.records import Interaction

T = TypeVar("T")
SHOTS = (16, 64, 256, None)  # None: the whole pool.


def fewshot_positions(pool_size: int, n: int | None, seed: int) -> np.ndarray:
  """Positions in the pool of the examples `fewshot(pool, n, seed)` returns, in its order."""
  if n is not None and not 0 < n <= pool_size:
    raise ValueError(f"n={n} must be in [1, {pool_size}] (the pool size), or None for all")
  return np.random.default_rng(seed).permutation(pool_size)[:n]


def fewshot(pool: Sequence[T], n: int | None, seed: int) -> list[T]:
  """`n` examples of `pool` drawn without replacement by a seeded shuffle (all of it when n is None)."""
  return [pool[i] for i in fewshot_positions(len(pool), n, seed)]


def history_targets(xs: Sequence[Interaction], per_example: int, seed: int) -> list[Interaction]:
  """Up to `per_example` masked-item prompts per interaction (none when it is <= 0): a history item becomes
  the target, its like the label, the other items (order kept) the history. They hold nothing the
  few-shot prompts do not already show (the auxiliary-task idea; on book 16-shot they did not help)."""
  if per_example <= 0:
    return []
  rng, out = np.random.default_rng(seed), []
  for x in xs:
    n = len(x.history_ids)
    if n < 2:
      continue
    for j in sorted(rng.choice(n, min(per_example, n), replace=False)):
      keep = [i for i in range(n) if i != j]
      out.append(dataclasses.replace(x, history_ids=tuple(x.history_ids[i] for i in keep),
                                     history_likes=tuple(x.history_likes[i] for i in keep),
                                     target_id=x.history_ids[j], label=int(x.history_likes[j])))
  return out
