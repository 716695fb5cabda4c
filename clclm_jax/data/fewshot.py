"""Few-shot training sets with TALLRec's semantics: shuffle the pool with the seed, keep the first n.

TALLRec calls Hugging Face `datasets` `shuffle(seed).select(range(n))`; we use a numpy permutation
instead, so the chosen examples differ from TALLRec's for the same seed (same distribution, and
deterministic per seed here). Smaller n with the same seed are prefixes of larger ones.
"""

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
SHOTS = (16, 64, 256, None)  # None: the whole pool.


def fewshot(pool: Sequence[T], n: int | None, seed: int) -> list[T]:
  """`n` examples of `pool` drawn without replacement by a seeded shuffle (all of it when n is None)."""
  if n is not None and not 0 < n <= len(pool):
    raise ValueError(f"n={n} must be in [1, {len(pool)}] (the pool size), or None for all")
  order = np.random.default_rng(seed).permutation(len(pool))
  return [pool[i] for i in order[:n]]
