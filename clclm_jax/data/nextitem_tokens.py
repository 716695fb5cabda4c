"""CALRec's next-item text as token batches: the joint `[history prompt ; target]` sequence with its spans, the
target item's text alone for the item tower, and a seeded, checkpointable source of such batches over one or
several datasets.

Every piece of the text (the header, each item's line, the "next item" line, the newline) is tokenized once per
dataset (`ItemTokens`) and prompts are put together from these pieces, so a Beauty epoch of 70k prompts costs no
tokenizer call, and training, dense retrieval and generation all read the very same prompt tokens. The decoded
prompt is `nextitem.render_prompt`'s text (lines split at their newlines, where byte-level BPE splits anyway),
except that an item line longer than `max_item_tokens` is cut there.

Spans of a joint row (right-padded, the tokenizer's leading special tokens first, e.g. the byte tokenizer's
`<s>`; SmolLM2's tokenizer adds none):
  `history_mask`  the prompt after the special tokens: header, history lines, the "next item" line (v_U);
  `target_mask`   the target item's line (v_T|U);
  `loss_mask`     the target's line and the newline that ends it (next-item generation: the model learns to
                  stop, which `generate(..., stop_at_newline=True)` relies on); `target_index` lists the same
                  positions, padded with 0, at a fixed width so the LM head runs on those rows only;
  `cue_mask`      one position: the last token of the cue every item line opens with (`ItemTokens.cue`,
                  `Title:`), whose state predicts the target's first own word (v_U with `user_pooling="cue"`).
The item tower reads `item_tokens` (special tokens + the target's line) and pools `item_mask` (the line).
"""

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from clclm_jax.data import nextitem, sequences


@dataclasses.dataclass(frozen=True)
class Layout:
  """How examples become tokens: the most recent `max_history` items of a history, as many as fit
  `max_prompt_tokens` (the oldest dropped first); item lines cut at `max_item_tokens`; row widths rounded up to
  a multiple of `pad_multiple` (few distinct shapes, few compiles)."""

  max_history: int = 20
  max_prompt_tokens: int = 512
  max_item_tokens: int = 32
  pad_multiple: int = 64


@dataclasses.dataclass(frozen=True)
class ItemTokens:
  """One dataset's text pieces as token ids (int32): `lines[i - 1]` is item i's line, cut to `max_item_tokens`."""

  name: str
  specials: np.ndarray  # the tokenizer's leading special tokens (BOS), possibly none
  header: np.ndarray  # the history header and its newline
  next_line: np.ndarray  # "The next item is as follows:" and its newline
  newline: np.ndarray
  lines: tuple[np.ndarray, ...]

  @property
  def fixed_prompt_tokens(self) -> int:
    """Prompt tokens that are there whatever the history."""
    return len(self.specials) + len(self.header) + len(self.next_line)

  @functools.cached_property
  def cue(self) -> np.ndarray:
    """The tokens every item line opens with (`Title:`), at most all but one of the shortest line's: after a
    prompt, the state at the cue's last token is the one that predicts a target's first own word."""
    first, n = self.lines[0], min(len(x) for x in self.lines) - 1
    for x in self.lines:
      n = next((i for i in range(n) if x[i] != first[i]), n)
    return first[:max(n, 0)]

  @property
  def target_width(self) -> int:
    """The most positions a target can cover: an item line plus its newline (`target_index`'s width)."""
    return max(len(x) for x in self.lines) + len(self.newline)


def _ids(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  return [np.asarray(x, np.int32) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def item_tokens(data: nextitem.NextItemData, tokenizer, max_item_tokens: int) -> ItemTokens:
  """Tokenizes `data`'s pieces once (the catalogue in one batched call)."""
  if max_item_tokens < 1:
    raise ValueError(f"max_item_tokens={max_item_tokens}: use 1 or more")
  specials = np.asarray(tokenizer("", add_special_tokens=True)["input_ids"], np.int32)
  header, next_line, newline = _ids(tokenizer, [nextitem.HEADERS[data.kind], nextitem.NEXT_ITEM, "\n"])
  lines = tuple(x[:max_item_tokens] for x in _ids(tokenizer, nextitem.catalogue_texts(data)))
  return ItemTokens(data.name, specials, np.r_[header, newline], np.r_[next_line, newline], newline, lines)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def kept_history(it: ItemTokens, history: Sequence[int], layout: Layout) -> tuple[int, ...]:
  """The most recent items of `history` that fit the prompt: at most `max_history`, and together with the fixed
  text within `max_prompt_tokens` (an item that does not fit stops the walk back in time)."""
  budget = layout.max_prompt_tokens - it.fixed_prompt_tokens
  kept = []
  for item in reversed(history[max(0, len(history) - layout.max_history):] if layout.max_history > 0 else ()):
    cost = len(it.lines[item - 1]) + len(it.newline)
    if cost > budget:
      break
    budget -= cost
    kept.append(item)
  return tuple(reversed(kept))


def prompt_ids(it: ItemTokens, history: Sequence[int], layout: Layout) -> np.ndarray:
  """The prompt's tokens: special tokens, header, the kept history lines, the "next item" line."""
  parts = [it.specials, it.header]
  for item in kept_history(it, history, layout):
    parts += [it.lines[item - 1], it.newline]
  return np.concatenate(parts + [it.next_line]).astype(np.int32)


def _pad_rows(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
  out = np.zeros((len(rows), width), np.int32)
  for r, x in enumerate(rows):
    out[r, :len(x)] = x
  return out


def prompt_batch(it: ItemTokens, histories: Sequence[Sequence[int]], layout: Layout) -> dict[str, np.ndarray]:
  """Right-padded prompts for the user tower, each followed by the item lines' `cue`: `tokens`,
  `attention_mask`, `history_mask` (the prompt after the special tokens) and `cue_mask` (the cue's last token,
  or the prompt's when there is no cue) [b, t]."""
  prompts = [prompt_ids(it, h, layout) for h in histories]
  width = round_up(max(len(p) for p in prompts) + len(it.cue), layout.pad_multiple)
  b, s = len(prompts), len(it.specials)
  history, cue = np.zeros((b, width), np.int32), np.zeros((b, width), np.int32)
  for r, p in enumerate(prompts):
    history[r, s:len(p)] = 1
    cue[r, len(p) + len(it.cue) - 1] = 1
  rows = [np.r_[p, it.cue] for p in prompts]
  return {"tokens": _pad_rows(rows, width), "attention_mask": _pad_rows([np.ones(len(x), np.int32) for x in rows],
          width), "history_mask": history, "cue_mask": cue}


def item_width(it: ItemTokens) -> int:
  """The item tower's row width: special tokens and the longest line, rounded up to a multiple of 8 (one shape)."""
  return round_up(len(it.specials) + max(len(x) for x in it.lines), 8)


def item_batch(it: ItemTokens, item_ids: Sequence[int]) -> dict[str, np.ndarray]:
  """Items' text alone for the item tower: `item_tokens`, `item_attention`, `item_mask` (the pooled line) [b, w]."""
  s = len(it.specials)
  rows = [np.r_[it.specials, it.lines[i - 1]] for i in item_ids]
  width = item_width(it)
  attention = _pad_rows([np.ones(len(x), np.int32) for x in rows], width)
  pooled = attention.copy()
  pooled[:, :s] = 0
  return {"item_tokens": _pad_rows(rows, width), "item_attention": attention, "item_mask": pooled}


def first_occurrence(ids: Sequence[int]) -> np.ndarray:
  """1 where an id is the first of its value in `ids`, else 0: rows repeating an earlier row's target take no
  part in the in-batch InfoNCE, where the two would be each other's false negatives (popular MovieLens films)."""
  ids = np.asarray(ids)
  _, first = np.unique(ids, return_index=True)
  out = np.zeros(len(ids), np.int32)
  out[first] = 1
  return out


def train_batch(it: ItemTokens, examples: Sequence[nextitem.Example], layout: Layout) -> dict[str, np.ndarray]:
  """A training batch of joint rows `[prompt ; target line ; newline]` with their spans (module docstring) and
  the targets' item-tower rows; `target_ids` [b] and `contrastive_valid` [b] (`first_occurrence`)."""
  prompts = [prompt_ids(it, ex.history, layout) for ex in examples]
  targets = [it.lines[ex.target - 1] for ex in examples]
  rows = [np.r_[p, t, it.newline] for p, t in zip(prompts, targets)]
  width = round_up(max(len(r) for r in rows), layout.pad_multiple)
  b, s = len(examples), len(it.specials)
  masks = {k: np.zeros((b, width), np.int32)
           for k in ("attention_mask", "history_mask", "target_mask", "loss_mask", "cue_mask")}
  target_index = np.zeros((b, it.target_width), np.int32)
  for r, (p, t, row) in enumerate(zip(prompts, targets, rows)):
    masks["attention_mask"][r, :len(row)] = 1
    masks["history_mask"][r, s:len(p)] = 1
    masks["target_mask"][r, len(p):len(p) + len(t)] = 1
    masks["cue_mask"][r, len(p) + len(it.cue) - 1] = 1  # the target line opens with the cue
    masks["loss_mask"][r, len(p):len(row)] = 1
    target_index[r, :len(row) - len(p)] = np.arange(len(p), len(row))
  ids = [ex.target for ex in examples]
  return {"tokens": _pad_rows(rows, width), **masks, "target_index": target_index,
          **item_batch(it, ids), "target_ids": np.asarray(ids, np.int32),
          "contrastive_valid": first_occurrence(ids)}


# --- A checkpointable source of batches over several datasets -----------------------------------

def epoch_plan(sizes: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
  """One epoch as (source, example indices) per batch: each source's examples shuffled into full batches (the
  remainder dropped), then all batches interleaved in a random order. A batch holds one source only, so its
  in-batch negatives are items of the same catalogue (comparable ids, harder than another domain's)."""
  plan = []
  for source, n in enumerate(sizes):
    order = rng.permutation(n)
    plan += [(source, order[i:i + batch_size]) for i in range(0, n - batch_size + 1, batch_size)]
  return [plan[i] for i in rng.permutation(len(plan))]


class EpochOfBatches(Sequence):
  """An epoch's batches, tokenized when read (an epoch of Beauty prompts held as arrays would be gigabytes)."""

  def __init__(self, sources: Sequence[tuple[ItemTokens, Sequence[nextitem.Example]]],
               plan: list[tuple[int, np.ndarray]], layout: Layout):
    self.sources, self.plan, self.layout = sources, plan, layout

  def __len__(self) -> int:
    return len(self.plan)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    source, rows = self.plan[i]
    it, examples = self.sources[source]
    return train_batch(it, [examples[r] for r in rows], self.layout)


def train_batches(sources: Sequence[tuple[ItemTokens, Sequence[nextitem.Example]]], batch_size: int,
                  layout: Layout, seed: int) -> sequences.EpochBatches:
  """Endless seeded epochs (`epoch_plan` with `default_rng([seed, epoch])`) of training batches over `sources`
  (one dataset, or a mixture of several); checkpointable (`get_state` / `set_state`: epoch and batch), and a
  batch depends only on the seed, the epoch and its index, so a resumed run reads the same batches."""
  sources = list(sources)
  sizes = [len(examples) for _, examples in sources]
  make_epoch = lambda epoch: EpochOfBatches(  # noqa: E731
      sources, epoch_plan(sizes, batch_size, np.random.default_rng([seed, epoch])), layout)
  return sequences.EpochBatches(make_epoch)


def limit_users(examples: Sequence[nextitem.Example], n: int, seed: int) -> list[nextitem.Example]:
  """The examples of `n` users drawn by `default_rng(seed)` (all when n <= 0 or there are fewer): a small
  slice of a dataset for quick runs, with every kept user's examples."""
  users = sorted({ex.user for ex in examples})
  if n <= 0 or n >= len(users):
    return list(examples)
  keep = set(np.random.default_rng(seed).choice(users, n, replace=False).tolist())
  return [ex for ex in examples if ex.user in keep]
