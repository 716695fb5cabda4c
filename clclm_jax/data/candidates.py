"""LLaRA's candidate ranking task as text, and prompts as lines of tokens for training, scoring and generation.

The task (from part 1's leave-one-out splits, `nextitem.examples`): the user's most recent `max_history` items,
then `num_candidates` candidates (the target and `num_candidates - 1` items sampled, seeded, from those the user
never interacted with in the whole sequence, so no validation or test target of the user is ever a negative of a
training prompt), then the instruction to name the next item; the answer is the target's title. Rendered:

    This is the user's watch history:           (`purchase` for products)
    <title>                                      one line per history item, oldest first
    Candidates:
    <title>                                      one line per candidate, in a seeded random order
    Which of the candidates will the user watch next? Answer with its title.
    <target title>                               the answer, then a newline (the model learns to stop)

A prompt is a list of lines (`Prompt`): an `int` is a catalogue item (its title, cut at `max_item_tokens`
tokens), a `Text` is variable text cut the same way (a masked title of the auxiliary tasks), a plain `str` is
template text. `PromptTokens` tokenizes each title once per dataset and template lines once per object, so a
training epoch costs tokenizer calls only for the few variable lines, and training, scoring and generation read
the very same tokens. Candidates have distinct titles (MovieLens lists 18 titles twice under two ids): two
equal texts could be neither told apart by generation nor ranked by likelihood.

Unified prompts (RSLLM / LLaRA, `seqrec/unified.py`): with a `placeholder_id`, a prompt made `soft` has one
placeholder token after each item line's title (history items and candidates alike; answers never), whose input
embedding the model replaces by the item's projected ID embedding (`contrastive.fusion.place_soft_tokens`, as the
fused prompts do). With `Layout.max_items > 0` a training batch also says where each item line is (`item_arrays`).
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from clclm_jax.data import nextitem

NUM_CANDIDATES = 20
CANDIDATES_LINE = "Candidates:"
VERBS = {"movie": "watch", "product": "buy"}


def question(kind: str) -> str:
  return f"Which of the candidates will the user {VERBS[kind]} next? Answer with its title."


class Text(str):
  """Variable text of a prompt line (cut at `max_item_tokens` like a title), as opposed to template text."""


Line = int | str  # an item id, a `Text`, or template text


class Prompt(NamedTuple):
  """A prompt as lines (each followed by a newline) and its answer lines (the loss covers them and their
  newlines). `candidates` (the rec task) lists the candidates in prompt order."""

  task: str
  user: int
  lines: tuple[Line, ...]
  answer: tuple[Line, ...]
  candidates: tuple[int, ...] = ()


class CandidateExample(NamedTuple):
  """A next-item example with its candidates (the target among them)."""

  user: int
  history: tuple[int, ...]
  target: int
  candidates: tuple[int, ...]


# --- Candidates ----------------------------------------------------------------------------------

def example_rng(seed: int, ex: nextitem.Example) -> np.random.Generator:
  """The generator of one example's draws: (user, history length) names an example across all three parts
  (valid and test histories are the two longest), so a draw does not depend on the other examples."""
  return np.random.default_rng([seed, ex.user, len(ex.history)])


def sample_negatives(data: nextitem.NextItemData, user: int, n: int, rng: np.random.Generator,
                     avoid_titles: Sequence[str] = ()) -> list[int]:
  """`n` distinct items the user never interacted with (anywhere in the sequence), with titles distinct from
  each other and from `avoid_titles`, uniformly by rejection."""
  seen = set(data.histories[user])
  titles = set(avoid_titles)
  if data.num_items - len(seen) - len(titles) < n:
    raise ValueError(f"{data.name}: user {user} has {data.num_items - len(seen)} items never interacted with, "
                     f"too few for {n} negatives: lower data.num_candidates")
  out: list[int] = []
  rounds = 0
  while len(out) < n:
    rounds += 1
    if rounds == 100:  # rejection is slow or stuck (many shared titles): count what is left, exactly
      left = {data.titles[i - 1] for i in range(1, data.num_items + 1) if i not in seen} - titles
      if len(left) < n - len(out):
        raise ValueError(f"{data.name}: user {user} has too few items with distinct titles never interacted with "
                         f"for {n} negatives: lower data.num_candidates")
    for item in rng.integers(1, data.num_items + 1, size=2 * n).tolist():
      title = data.titles[item - 1]
      if item not in seen and title not in titles:
        seen.add(item)
        titles.add(title)
        out.append(item)
        if len(out) == n:
          break
  return out


def sample_candidates(data: nextitem.NextItemData, ex: nextitem.Example, rng: np.random.Generator,
                      num_candidates: int = NUM_CANDIDATES) -> tuple[int, ...]:
  """The target and `num_candidates - 1` negatives (`sample_negatives`), in a random order."""
  negatives = sample_negatives(data, ex.user, num_candidates - 1, rng, [data.titles[ex.target - 1]])
  items = np.asarray([ex.target, *negatives])
  return tuple(items[rng.permutation(len(items))].tolist())


def candidate_examples(data: nextitem.NextItemData, part: str, *, num_candidates: int = NUM_CANDIDATES,
                       seed: int = 0, max_prefixes: int | None = None) -> list[CandidateExample]:
  """`nextitem.examples(data, part)` (training: prefixes capped per user by `max_prefixes`, seeded) with their
  candidates drawn by `example_rng(seed, ex)`: the same candidates for an example whatever else is asked."""
  xs = nextitem.examples(data, part, max_prefixes=max_prefixes, seed=seed)
  return [CandidateExample(*ex, sample_candidates(data, ex, example_rng(seed, ex), num_candidates)) for ex in xs]


def recent(history: Sequence[int], max_history: int) -> tuple[int, ...]:
  return tuple(history[max(0, len(history) - max_history):]) if max_history > 0 else ()


def rec_prompt(data: nextitem.NextItemData, ex: CandidateExample, max_history: int) -> Prompt:
  """The candidate ranking prompt (module docstring); the answer is the target."""
  lines = (nextitem.HEADERS[data.kind], *recent(ex.history, max_history), CANDIDATES_LINE, *ex.candidates,
           question(data.kind))
  return Prompt("rec", ex.user, lines, (ex.target,), ex.candidates)


def render(data: nextitem.NextItemData, lines: Sequence[Line]) -> str:
  """The text of lines (full titles; the tokens cut long ones at `max_item_tokens`)."""
  return "".join((data.titles[x - 1] if isinstance(x, int) else x) + "\n" for x in lines)


# --- Tokens ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  """How prompts become tokens: the most recent `max_history` history items, every item title and `Text` line
  cut at `max_item_tokens`, row widths rounded up to a multiple of `pad_multiple` (few compiled shapes);
  `answer_lines` lines of answer at most (the fixed width of `target_index`); `max_items` > 0: training batches
  carry each prompt's item lines in that many slots (`item_arrays`: unified prompts)."""

  max_history: int = 10
  max_prompt_tokens: int = 1024
  max_item_tokens: int = 24
  pad_multiple: int = 64
  answer_lines: int = 1
  max_items: int = 0


class PromptTokens:
  """A dataset's titles as token ids (cut at `max_item_tokens`), the tokenizer's leading special tokens and the
  newline; template lines are tokenized on first use and kept in this object."""

  def __init__(self, data: nextitem.NextItemData, tokenizer, max_item_tokens: int,
               placeholder_id: int | None = None):
    if max_item_tokens < 1:
      raise ValueError(f"max_item_tokens={max_item_tokens}: use 1 or more")
    self.name, self.tokenizer, self.max_item_tokens = data.name, tokenizer, max_item_tokens
    self.placeholder_id = placeholder_id  # the soft-token slot of unified prompts (None: text-only prompts)
    self.specials = np.asarray(tokenizer("", add_special_tokens=True)["input_ids"], np.int32)
    self.newline = self._ids(["\n"])[0]
    self.titles = tuple(x[:max_item_tokens] for x in self._ids(list(data.titles)))
    self._template: dict[str, np.ndarray] = {}

  def _ids(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(x, np.int32) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

  def line(self, line: Line) -> np.ndarray:
    """One line's tokens, without its newline."""
    if isinstance(line, int):
      return self.titles[line - 1]
    if isinstance(line, Text):
      return self._ids([line])[0][:self.max_item_tokens]
    if line not in self._template:
      self._template[line] = self._ids([line])[0]
    return self._template[line]

  def spans(self, lines: Sequence[Line], soft: bool = False,
            start: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Lines with a newline after each (with `soft`, an item line's title is followed by the placeholder token),
    and `(item, first, end)` of each item line's title tokens, counted from `start`."""
    if soft and self.placeholder_id is None:
      raise ValueError("soft prompts need PromptTokens(placeholder_id=...)")
    slot = np.asarray([self.placeholder_id if soft else 0], np.int32)
    parts, spans, at = [], [], start
    for x in lines:
      title = self.line(x)
      parts.append(title)
      if isinstance(x, int):
        spans.append((x, at, at + len(title)))
        if soft:
          parts.append(slot)
          at += 1
      parts.append(self.newline)
      at += len(title) + len(self.newline)
    return (np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)), spans

  def lines(self, lines: Sequence[Line], soft: bool = False) -> np.ndarray:
    """Lines with a newline after each (`spans`)."""
    return self.spans(lines, soft)[0]

  def prompt(self, p: Prompt, soft: bool = False) -> np.ndarray:
    """The prompt's tokens: the special tokens, then its lines (with `soft`, a soft-token slot after each item)."""
    return np.r_[self.specials, self.lines(p.lines, soft)].astype(np.int32)

  def title_text(self, item: int) -> str:
    """An item's title as its (possibly cut) tokens decode: what a generated answer is matched against."""
    return self.tokenizer.decode(self.titles[item - 1].tolist(), skip_special_tokens=True).strip()

  def line_bound(self) -> int:
    """The most tokens a variable line (item or `Text`) and its newline can take."""
    return self.max_item_tokens + len(self.newline)

  def answer_width(self, layout: Layout) -> int:
    return layout.answer_lines * self.line_bound()


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_rows(rows: Sequence[np.ndarray], width: int, *, left: bool = False) -> np.ndarray:
  out = np.zeros((len(rows), width), np.int32)
  for r, x in enumerate(rows):
    if left:
      out[r, width - len(x):] = x
    else:
      out[r, :len(x)] = x
  return out


def train_batch(pt: PromptTokens, prompts: Sequence[Prompt], layout: Layout,
                soft: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """Right-padded rows `[prompt ; answer lines]`: `tokens`, `attention_mask`, `loss_mask` (the answer and its
  newlines) and `target_index` (the same positions, 0-padded to `answer_width`: the LM head runs on those
  only). `soft[r]`: row r is a unified prompt (a soft-token slot after each item line); with
  `layout.max_items > 0` the rows' `item_arrays` too."""
  soft = [False] * len(prompts) if soft is None else list(soft)
  spans = [pt.spans(p.lines, s, start=len(pt.specials)) for p, s in zip(prompts, soft)]
  heads = [np.r_[pt.specials, x].astype(np.int32) for x, _ in spans]
  answers = [pt.lines(p.answer) for p in prompts]
  width_a = pt.answer_width(layout)
  for p, h, a in zip(prompts, heads, answers):
    if len(h) > layout.max_prompt_tokens or len(a) > width_a:
      raise ValueError(f"a {p.task} prompt of {len(h)} tokens with a {len(a)}-token answer exceeds "
                       f"max_prompt_tokens={layout.max_prompt_tokens} / {width_a} answer tokens: raise them")
  rows = [np.r_[h, a] for h, a in zip(heads, answers)]
  width = round_up(max(len(r) for r in rows), layout.pad_multiple)
  loss = np.zeros((len(rows), width), np.int32)
  target_index = np.zeros((len(rows), width_a), np.int32)
  for r, (h, row) in enumerate(zip(heads, rows)):
    loss[r, len(h):len(row)] = 1
    target_index[r, :len(row) - len(h)] = np.arange(len(h), len(row))
  attention = _pad_rows([np.ones(len(r), np.int32) for r in rows], width)
  batch = {"tokens": _pad_rows(rows, width), "attention_mask": attention, "loss_mask": loss,
           "target_index": target_index}
  if layout.max_items:
    batch |= item_arrays(prompts, [s for _, s in spans], soft, layout, width)
  return batch


def history_items(p: Prompt) -> int:
  """How many of a rec prompt's item lines are its history (those before the candidates line); 0 for other
  tasks (their items are no user's history to align with)."""
  if p.task != "rec":
    return 0
  return sum(isinstance(x, int) for x in p.lines[:p.lines.index(CANDIDATES_LINE)])


def item_arrays(prompts: Sequence[Prompt], spans: Sequence[list[tuple[int, int, int]]], soft: Sequence[bool],
                layout: Layout, width: int) -> dict[str, np.ndarray]:
  """Where each row's item lines are, in `layout.max_items` slots in prompt order: `item_ids` [b, k] (0: no
  item), `soft_item_ids` [b, k] (the same in soft rows, 0 in text-only rows: what fills the placeholders),
  `item_slot` [b, t] (slot + 1 on a title's tokens, else 0), `item_valid` [b, k] (an item's first slot in the
  batch: a repeated item is neither its own negative nor counted twice by the item InfoNCE), `history_mask`
  [b, t] (the history lines' titles and soft tokens of rec rows), `history_ids` [b, max_history] (those items,
  left-padded, most recent last) and `user_valid` [b] (rec rows)."""
  b, k = len(prompts), layout.max_items
  out = {"item_ids": np.zeros((b, k), np.int32), "soft_item_ids": np.zeros((b, k), np.int32),
         "item_slot": np.zeros((b, width), np.int32), "item_valid": np.zeros((b, k), np.int32),
         "history_mask": np.zeros((b, width), np.int32),
         "history_ids": np.zeros((b, max(layout.max_history, 1)), np.int32), "user_valid": np.zeros(b, np.int32)}
  seen = set()
  for r, (p, row, is_soft) in enumerate(zip(prompts, spans, soft)):
    if len(row) > k:
      raise ValueError(f"a {p.task} prompt holds {len(row)} items, more than Layout.max_items={k}")
    for j, (item, first, end) in enumerate(row):
      out["item_ids"][r, j] = item
      out["soft_item_ids"][r, j] = item if is_soft else 0
      out["item_slot"][r, first:end] = j + 1
      out["item_valid"][r, j] = item not in seen
      seen.add(item)
    n = history_items(p)
    if n:
      out["user_valid"][r] = 1
      out["history_mask"][r, row[0][1]:row[n - 1][2] + int(is_soft)] = 1
      out["history_ids"][r, -n:] = [item for item, _, _ in row[:n]][-out["history_ids"].shape[1]:]
  return out


def score_batch(pt: PromptTokens, data: nextitem.NextItemData, examples: Sequence[CandidateExample],
                layout: Layout, soft: bool = False) -> dict[str, np.ndarray]:
  """Decoding-free scoring input: the rec prompts left-padded `prompt` / `prompt_mask` [u, p] (p a multiple of
  `pad_multiple`) and each candidate's answer (title and newline) right-padded `answer` / `answer_mask`
  [u, c, w] with w = `line_bound()` (one width for every batch), `target_col` [u] the target's column. With
  `soft`, unified prompts (a soft-token slot after each item line) and `soft_item_ids` [u, max_items] (what fills
  them, in prompt order); answers are text either way."""
  prompts = [rec_prompt(data, ex, layout.max_history) for ex in examples]
  heads = [pt.prompt(p, soft) for p in prompts]
  width = round_up(max(len(h) for h in heads), layout.pad_multiple)
  w = pt.line_bound()
  answers = [_pad_rows([pt.lines([c]) for c in ex.candidates], w) for ex in examples]
  masks = [_pad_rows([np.ones(len(pt.lines([c])), np.int32) for c in ex.candidates], w) for ex in examples]
  out = {"prompt": _pad_rows(heads, width, left=True),
         "prompt_mask": _pad_rows([np.ones(len(h), np.int32) for h in heads], width, left=True),
         "answer": np.stack(answers), "answer_mask": np.stack(masks),
         "target_col": np.asarray([ex.candidates.index(ex.target) for ex in examples], np.int32)}
  if soft:
    out["soft_item_ids"] = soft_item_ids(prompts, layout.max_items)
  return out


def soft_item_ids(prompts: Sequence[Prompt], max_items: int) -> np.ndarray:
  """[b, max_items] the item lines of each prompt in order, 0-padded: what fills its placeholders."""
  out = np.zeros((len(prompts), max_items), np.int32)
  for r, p in enumerate(prompts):
    items = [x for x in p.lines if isinstance(x, int)]
    if len(items) > max_items:
      raise ValueError(f"a {p.task} prompt holds {len(items)} items, more than Layout.max_items={max_items}")
    out[r, :len(items)] = items
  return out


def max_prompt_tokens_needed(pt: PromptTokens, templates: Sequence[str], variable_lines: int,
                             soft: bool = False) -> int:
  """An upper bound of a prompt's tokens: the special tokens, the `templates` lines and `variable_lines` item or
  `Text` lines at their cut, each with its newline, and with `soft` a soft-token slot each (what a config's
  `max_prompt_tokens` must allow)."""
  fixed = sum(len(pt.line(t)) + len(pt.newline) for t in templates)
  return len(pt.specials) + fixed + variable_lines * (pt.line_bound() + int(soft))
