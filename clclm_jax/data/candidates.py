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
  `answer_lines` lines of answer at most (the fixed width of `target_index`)."""

  max_history: int = 10
  max_prompt_tokens: int = 1024
  max_item_tokens: int = 24
  pad_multiple: int = 64
  answer_lines: int = 1


class PromptTokens:
  """A dataset's titles as token ids (cut at `max_item_tokens`), the tokenizer's leading special tokens and the
  newline; template lines are tokenized on first use and kept in this object."""

  def __init__(self, data: nextitem.NextItemData, tokenizer, max_item_tokens: int):
    if max_item_tokens < 1:
      raise ValueError(f"max_item_tokens={max_item_tokens}: use 1 or more")
    self.name, self.tokenizer, self.max_item_tokens = data.name, tokenizer, max_item_tokens
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

  def lines(self, lines: Sequence[Line]) -> np.ndarray:
    """Lines with a newline after each."""
    parts = [p for x in lines for p in (self.line(x), self.newline)]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

  def prompt(self, p: Prompt) -> np.ndarray:
    """The prompt's tokens: the special tokens, then its lines."""
    return np.r_[self.specials, self.lines(p.lines)].astype(np.int32)

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


def train_batch(pt: PromptTokens, prompts: Sequence[Prompt], layout: Layout) -> dict[str, np.ndarray]:
  """Right-padded rows `[prompt ; answer lines]`: `tokens`, `attention_mask`, `loss_mask` (the answer and its
  newlines) and `target_index` (the same positions, 0-padded to `answer_width`: the LM head runs on those
  only)."""
  heads = [pt.prompt(p) for p in prompts]
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
  return {"tokens": _pad_rows(rows, width), "attention_mask": attention, "loss_mask": loss,
          "target_index": target_index}


def score_batch(pt: PromptTokens, data: nextitem.NextItemData, examples: Sequence[CandidateExample],
                layout: Layout) -> dict[str, np.ndarray]:
  """Decoding-free scoring input: the rec prompts left-padded `prompt` / `prompt_mask` [u, p] (p a multiple of
  `pad_multiple`) and each candidate's answer (title and newline) right-padded `answer` / `answer_mask`
  [u, c, w] with w = `line_bound()` (one width for every batch), `target_col` [u] the target's column."""
  heads = [pt.prompt(rec_prompt(data, ex, layout.max_history)) for ex in examples]
  width = round_up(max(len(h) for h in heads), layout.pad_multiple)
  w = pt.line_bound()
  answers = [_pad_rows([pt.lines([c]) for c in ex.candidates], w) for ex in examples]
  masks = [_pad_rows([np.ones(len(pt.lines([c])), np.int32) for c in ex.candidates], w) for ex in examples]
  return {"prompt": _pad_rows(heads, width, left=True),
          "prompt_mask": _pad_rows([np.ones(len(h), np.int32) for h in heads], width, left=True),
          "answer": np.stack(answers), "answer_mask": np.stack(masks),
          "target_col": np.asarray([ex.candidates.index(ex.target) for ex in examples], np.int32)}


def max_prompt_tokens_needed(pt: PromptTokens, templates: Sequence[str], variable_lines: int) -> int:
  """An upper bound of a prompt's tokens: the special tokens, the `templates` lines and `variable_lines` item or
  `Text` lines at their cut, each with its newline (what a config's `max_prompt_tokens` must allow)."""
  fixed = sum(len(pt.line(t)) + len(pt.newline) for t in templates)
  return len(pt.specials) + fixed + variable_lines * pt.line_bound()
