"""Contrastive views on text: a prompt's history cropped, masked or reordered, two views per user.

The operators follow CL4SRec (crop a contiguous window, mask items, reorder a window) but act on the
rendered prompt: a masked item keeps its like/dislike slot and shows the placeholder title `[MASK]`.
All randomness comes from an explicit `numpy.random.Generator`.
"""

from collections.abc import Sequence

import numpy as np

from clclm_jax.data import prompts
from clclm_jax.data.records import Catalogue, Interaction, Item

MASK_TITLE = "[MASK]"
OPS = ("crop", "mask", "reorder")


def view_positions(n: int, op: str, rng: np.random.Generator, ratio: float) -> list[tuple[int, bool]]:
  """(history position, masked) pairs for one view of an n-item history."""
  if op == "crop":
    k = max(1, int(ratio * n)) if n else 0
    start = int(rng.integers(0, n - k + 1))
    return [(i, False) for i in range(start, start + k)]
  if op == "mask":
    masked = set(rng.choice(n, size=int(ratio * n), replace=False).tolist()) if n else set()
    return [(i, i in masked) for i in range(n)]
  if op == "reorder":
    k = max(1, int(ratio * n)) if n else 0
    start = int(rng.integers(0, n - k + 1))
    window = list(range(start, start + k))
    order = list(range(start)) + [window[j] for j in rng.permutation(k)] + list(range(start + k, n))
    return [(i, False) for i in order]
  raise KeyError(f"unknown view op {op!r}; choose one of {OPS}")


def render_view(x: Interaction, catalogue: Catalogue, domain: str, positions: Sequence[tuple[int, bool]]) -> str:
  """The TALLRec input text for the history items at `positions`, masked ones shown as `[MASK]`."""
  mask = Item(0, MASK_TITLE, MASK_TITLE if domain == "book" else None)
  history = [(mask if masked else catalogue[x.history_ids[i]], x.history_likes[i]) for i, masked in positions]
  return prompts.render_input(history, catalogue[x.target_id], domain)


def two_views(x: Interaction, catalogue: Catalogue, domain: str, rng: np.random.Generator, *,
              ops: Sequence[str] = OPS, ratios: dict[str, float] | None = None) -> tuple[str, str]:
  """Two input texts of the same user, each from an operator drawn uniformly from `ops`."""
  ratios = {"crop": 0.6, "mask": 0.3, "reorder": 0.6} | (ratios or {})
  views = []
  for _ in range(2):
    op = ops[int(rng.integers(len(ops)))]
    views.append(render_view(x, catalogue, domain, view_positions(len(x.history_ids), op, rng, ratios[op])))
  return views[0], views[1]
