"""Cao et al.'s auxiliary-task prompts (arXiv 2404.00245) beside the rec prompts, mixed at configurable ratios.

Every prompt is made from one training example of `nextitem.examples(data, "train")` (a prefix of the training
history `h[:-2]` and the next training item), so no auxiliary prompt holds a user's validation or test target
(BPR negatives are items the user never interacted with anywhere). Tasks (their templates are ours; the paper's
are not public), items rendered by title, no user ids:
  rec  the candidate ranking prompt of `data/candidates.py` (target + sampled negatives; answer: the target);
  mim  masked item modelling: the sequence (history and next item, the most recent `max_history`) with 1 to
       `mim_max_masks` items replaced by `[MASK]` lines; answer: the hidden titles, one a line, in order;
  bpr  pairwise preference: the history, then the next item and one negative in a random order; answer: the
       next item's title;
  mlm  masked language modelling over item text: the first `mlm_max_words` words of the title of an item of the
       sequence with a `mlm_mask_rate` share of them (at least one) replaced by `[MASK]`; answer: the hidden
       words, space-separated, in order.
`train_batches` draws each row's task by the ratios and builds its prompt from the row's example with a
generator seeded by (seed, epoch, batch, row): a batch depends only on those, so a resumed run reads the same.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from clclm_jax.data import candidates, nextitem, sequences
from clclm_jax.data.candidates import Layout, Prompt, PromptTokens, Text

TASKS = ("rec", "mim", "bpr", "mlm")
MASK = "[MASK]"
MIM_QUESTION = "Which items are hidden behind [MASK], in order? Answer with their titles, one a line."
MLM_QUESTION = "Fill in the words hidden behind [MASK] in this title, in order:"


def bpr_question(kind: str) -> str:
  return f"Which of these two items will the user {candidates.VERBS[kind]} next? Answer with its title."


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """What the prompt generators read (config `data` / `tasks` fields)."""

  max_history: int = 10
  num_candidates: int = candidates.NUM_CANDIDATES
  mim_max_masks: int = 2
  mlm_max_words: int = 12
  mlm_mask_rate: float = 0.3


def mixture(ratios: Mapping[str, float], field: str = "config.tasks.ratios") -> tuple[tuple[str, ...], np.ndarray]:
  """(tasks with a positive ratio, in `TASKS` order; their probabilities). Bad ratios raise a one-line
  ValueError naming `field`."""
  unknown = sorted(set(ratios) - set(TASKS))
  if unknown:
    raise ValueError(f"{field} names unknown task(s) {unknown}: use {list(TASKS)}")
  bad = {k: v for k, v in ratios.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
  if bad:
    raise ValueError(f"{field}={dict(ratios)}: ratios must be finite and 0 or more ({bad})")
  names = tuple(t for t in TASKS if ratios.get(t, 0) > 0)
  if not names:
    raise ValueError(f"{field}={dict(ratios)} sums to zero: give at least one task a ratio above 0")
  p = np.asarray([ratios[t] for t in names], np.float64)
  return names, p / p.sum()


def _sequence(ex: nextitem.Example, s: TaskSettings) -> tuple[int, ...]:
  return candidates.recent((*ex.history, ex.target), s.max_history)


def rec_prompt(data: nextitem.NextItemData, ex: nextitem.Example, rng: np.random.Generator,
               s: TaskSettings) -> Prompt:
  cands = candidates.sample_candidates(data, ex, rng, s.num_candidates)
  return candidates.rec_prompt(data, candidates.CandidateExample(*ex, cands), s.max_history)


def mim_prompt(data: nextitem.NextItemData, ex: nextitem.Example, rng: np.random.Generator,
               s: TaskSettings) -> Prompt:
  seq = _sequence(ex, s)
  k = int(rng.integers(1, max(1, min(s.mim_max_masks, len(seq) - 1)) + 1))  # at least one item stays visible
  hidden = set(rng.choice(len(seq), k, replace=False).tolist())
  lines = (nextitem.HEADERS[data.kind], *(MASK if i in hidden else x for i, x in enumerate(seq)), MIM_QUESTION)
  return Prompt("mim", ex.user, lines, tuple(seq[i] for i in sorted(hidden)))


def bpr_prompt(data: nextitem.NextItemData, ex: nextitem.Example, rng: np.random.Generator,
               s: TaskSettings) -> Prompt:
  negative = candidates.sample_negatives(data, ex.user, 1, rng, [data.titles[ex.target - 1]])[0]
  pair = (ex.target, negative) if rng.random() < 0.5 else (negative, ex.target)
  lines = (nextitem.HEADERS[data.kind], *candidates.recent(ex.history, s.max_history), bpr_question(data.kind),
           *pair)
  return Prompt("bpr", ex.user, lines, (ex.target,), pair)


def mlm_prompt(data: nextitem.NextItemData, ex: nextitem.Example, rng: np.random.Generator,
               s: TaskSettings) -> Prompt:
  seq = _sequence(ex, s)
  words = data.titles[seq[int(rng.integers(len(seq)))] - 1].split()[:s.mlm_max_words]
  k = min(len(words), max(1, round(s.mlm_mask_rate * len(words))))
  hidden = sorted(rng.choice(len(words), k, replace=False).tolist())
  masked = " ".join(MASK if i in hidden else w for i, w in enumerate(words))
  return Prompt("mlm", ex.user, (MLM_QUESTION, Text(masked)), (Text(" ".join(words[i] for i in hidden)),))


GENERATORS = {"rec": rec_prompt, "mim": mim_prompt, "bpr": bpr_prompt, "mlm": mlm_prompt}


def make_prompt(task: str, data: nextitem.NextItemData, ex: nextitem.Example, rng: np.random.Generator,
                s: TaskSettings) -> Prompt:
  return GENERATORS[task](data, ex, rng, s)


def answer_lines(tasks: Sequence[str], s: TaskSettings) -> int:
  """The most answer lines a prompt of `tasks` has (`Layout.answer_lines`)."""
  return max(s.mim_max_masks if t == "mim" else 1 for t in tasks)


def prompt_bound(pt: PromptTokens, kind: str, task: str, s: TaskSettings) -> int:
  """An upper bound of the tokens of a `task` prompt (`candidates.max_prompt_tokens_needed`)."""
  header = nextitem.HEADERS[kind]
  if task == "rec":
    return candidates.max_prompt_tokens_needed(
        pt, [header, candidates.CANDIDATES_LINE, candidates.question(kind)], s.max_history + s.num_candidates)
  if task == "mim":  # a [MASK] line may be longer than a cut title
    return candidates.max_prompt_tokens_needed(pt, [header, MIM_QUESTION, *[MASK] * s.mim_max_masks],
                                               s.max_history)
  if task == "bpr":
    return candidates.max_prompt_tokens_needed(pt, [header, bpr_question(kind)], s.max_history + 2)
  return candidates.max_prompt_tokens_needed(pt, [MLM_QUESTION], 1)


# --- A checkpointable source of mixed batches ------------------------------------------------------

def epoch_plan(n: int, batch_size: int, probs: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  """One epoch: every example once in a random order, each row's task drawn by `probs`, cut into full
  batches (the remainder dropped); a batch is [b, 2] (example index, task index)."""
  order = rng.permutation(n)
  tasks = rng.choice(len(probs), size=n, p=probs)
  rows = np.stack([order, tasks], axis=1)
  return [rows[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


class MixedEpoch(Sequence):
  """An epoch's batches, made when read (prompts are drawn and tokenized per batch)."""

  def __init__(self, data: nextitem.NextItemData, pt: PromptTokens, examples: Sequence[nextitem.Example],
               tasks: Sequence[str], plan: list[np.ndarray], layout: Layout, settings: TaskSettings,
               seed: int, epoch: int):
    self.data, self.pt, self.examples, self.tasks, self.plan = data, pt, examples, tasks, plan
    self.layout, self.settings, self.seed, self.epoch = layout, settings, seed, epoch

  def __len__(self) -> int:
    return len(self.plan)

  def prompts(self, i: int) -> list[Prompt]:
    return [make_prompt(self.tasks[t], self.data, self.examples[e],
                        np.random.default_rng([self.seed, self.epoch, i, r]), self.settings)
            for r, (e, t) in enumerate(self.plan[i].tolist())]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return candidates.train_batch(self.pt, self.prompts(i), self.layout)


def train_batches(data: nextitem.NextItemData, pt: PromptTokens, examples: Sequence[nextitem.Example],
                  ratios: Mapping[str, float], batch_size: int, layout: Layout, settings: TaskSettings,
                  seed: int, field: str = "config.tasks.ratios") -> sequences.EpochBatches:
  """Endless seeded epochs (`epoch_plan` with `default_rng([seed, epoch])`) of batches mixing the tasks of
  `ratios` over the training `examples`; checkpointable (`get_state` / `set_state`)."""
  tasks, probs = mixture(ratios, field)
  make = lambda epoch: MixedEpoch(data, pt, examples, tasks, epoch_plan(  # noqa: E731
      len(examples), batch_size, probs, np.random.default_rng([seed, epoch])), layout, settings, seed, epoch)
  return sequences.EpochBatches(make)
