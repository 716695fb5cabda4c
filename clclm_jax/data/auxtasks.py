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
With `soft_share` (unified prompts, `seqrec/unified.py`) a share of each batch's rows, a function of the batch's
number in the stage (LLaRA's curriculum), is made of unified prompts; which rows, is seeded the same way.
`calrec_train_batches` mixes the same auxiliary rows into CALRec's next-item batches (part 1's path).
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from clclm_jax.data import candidates, nextitem, nextitem_tokens, sequences
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


def settings(config) -> TaskSettings:
  """What a config's prompts read: `data.max_history`, `data.num_candidates` (candidate configs; CALRec's have none)
  and its `tasks` block."""
  d, t = config.data, config.tasks
  return TaskSettings(d.max_history, d.get("num_candidates", candidates.NUM_CANDIDATES), t.mim_max_masks,
                      t.mlm_max_words, t.mlm_mask_rate)


def check_tasks(tasks, field: str = "config.tasks") -> tuple[tuple[str, ...], np.ndarray]:
  """A config's `tasks` block (`ratios`, `mim_max_masks`, `mlm_max_words`, `mlm_mask_rate`; configs/cand_ml100k.py,
  configs/calrec_ml100k.py:aux): its `mixture`, or a one-line ValueError naming the field."""
  out = mixture(dict(tasks.ratios), f"{field}.ratios")
  if tasks.mim_max_masks < 1 or tasks.mlm_max_words < 1:
    raise ValueError(f"{field}: mim_max_masks={tasks.mim_max_masks} and mlm_max_words={tasks.mlm_max_words} must "
                     "be 1 or more")
  if not 0 < tasks.mlm_mask_rate <= 1:
    raise ValueError(f"{field}.mlm_mask_rate={tasks.mlm_mask_rate}: use a share in (0, 1]")
  return out


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


def prompt_bound(pt: PromptTokens, kind: str, task: str, s: TaskSettings, soft: bool = False) -> int:
  """An upper bound of the tokens of a `task` prompt (`candidates.max_prompt_tokens_needed`; `soft`: unified)."""
  header = nextitem.HEADERS[kind]
  if task == "rec":
    return candidates.max_prompt_tokens_needed(
        pt, [header, candidates.CANDIDATES_LINE, candidates.question(kind)], s.max_history + s.num_candidates,
        soft)
  if task == "mim":  # a [MASK] line may be longer than a cut title
    return candidates.max_prompt_tokens_needed(pt, [header, MIM_QUESTION, *[MASK] * s.mim_max_masks],
                                               s.max_history, soft)
  if task == "bpr":
    return candidates.max_prompt_tokens_needed(pt, [header, bpr_question(kind)], s.max_history + 2, soft)
  return candidates.max_prompt_tokens_needed(pt, [MLM_QUESTION], 1, soft)


def max_items(tasks: Sequence[str], s: TaskSettings) -> int:
  """The most item lines a prompt of `tasks` holds (`Layout.max_items`: the unified prompts' slots)."""
  most = {"rec": s.max_history + s.num_candidates, "mim": s.max_history, "bpr": s.max_history + 2, "mlm": 0}
  return max(most[t] for t in tasks)


# --- A checkpointable source of mixed batches ------------------------------------------------------

def epoch_plan(n: int, batch_size: int, probs: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  """One epoch: every example once in a random order, each row's task drawn by `probs`, cut into full
  batches (the remainder dropped); a batch is [b, 2] (example index, task index)."""
  order = rng.permutation(n)
  tasks = rng.choice(len(probs), size=n, p=probs)
  rows = np.stack([order, tasks], axis=1)
  return [rows[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


SOFT_DRAW = 1 << 20  # the last seed word of a batch's soft-row draw (row draws use the row's index, far below)


def soft_rows(share: float, n: int, rng: np.random.Generator) -> np.ndarray:
  """[n] bool: `round(share * n)` rows, drawn by `rng`, are unified prompts."""
  return np.isin(np.arange(n), rng.permutation(n)[:round(min(max(share, 0.0), 1.0) * n)])


class MixedEpoch(Sequence):
  """An epoch's batches, made when read (prompts are drawn and tokenized per batch); with `soft_share`, batch i
  of the epoch is batch `epoch * len(self) + i` of the stage (every epoch has as many) and that share of its rows
  are unified prompts (`soft_rows`)."""

  def __init__(self, data: nextitem.NextItemData, pt: PromptTokens, examples: Sequence[nextitem.Example],
               tasks: Sequence[str], plan: list[np.ndarray], layout: Layout, settings: TaskSettings,
               seed: int, epoch: int, soft_share: Callable[[int], float] | None = None):
    self.data, self.pt, self.examples, self.tasks, self.plan = data, pt, examples, tasks, plan
    self.layout, self.settings, self.seed, self.epoch = layout, settings, seed, epoch
    self.soft_share = soft_share

  def __len__(self) -> int:
    return len(self.plan)

  def prompts(self, i: int) -> list[Prompt]:
    return [make_prompt(self.tasks[t], self.data, self.examples[e],
                        np.random.default_rng([self.seed, self.epoch, i, r]), self.settings)
            for r, (e, t) in enumerate(self.plan[i].tolist())]

  def soft(self, i: int) -> np.ndarray | None:
    """Which rows of batch i are unified prompts (None: all text)."""
    if self.soft_share is None:
      return None
    rng = np.random.default_rng([self.seed, self.epoch, i, SOFT_DRAW])
    return soft_rows(self.soft_share(self.epoch * len(self.plan) + i), len(self.plan[i]), rng)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return candidates.train_batch(self.pt, self.prompts(i), self.layout, self.soft(i))


def train_batches(data: nextitem.NextItemData, pt: PromptTokens, examples: Sequence[nextitem.Example],
                  ratios: Mapping[str, float], batch_size: int, layout: Layout, settings: TaskSettings,
                  seed: int, field: str = "config.tasks.ratios",
                  soft_share: Callable[[int], float] | None = None) -> sequences.EpochBatches:
  """Endless seeded epochs (`epoch_plan` with `default_rng([seed, epoch])`) of batches mixing the tasks of
  `ratios` over the training `examples`; checkpointable (`get_state` / `set_state`). The answer width
  (`target_index`) holds the longest answer of the mixed tasks (`answer_lines`). `soft_share(t)`: the share of
  unified prompts in the stage's batch t (`MixedEpoch`; `layout.max_items` must hold the tasks' items)."""
  tasks, probs = mixture(ratios, field)
  layout = dataclasses.replace(layout, answer_lines=max(layout.answer_lines, answer_lines(tasks, settings)))
  make = lambda epoch: MixedEpoch(data, pt, examples, tasks, epoch_plan(  # noqa: E731
      len(examples), batch_size, probs, np.random.default_rng([seed, epoch])), layout, settings, seed, epoch,
      soft_share)
  return sequences.EpochBatches(make)


# --- Auxiliary rows in CALRec's batches (part 1's path) ----------------------------------------------

def _widen(x: np.ndarray, width: int) -> np.ndarray:
  return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def with_aux_rows(calrec_batch: dict[str, np.ndarray], aux_batch: dict[str, np.ndarray],
                  rows: Sequence[int]) -> dict[str, np.ndarray]:
  """CALRec's training batch (`nextitem_tokens.train_batch`) with its `rows` replaced by auxiliary-task rows
  (`candidates.train_batch` of as many prompts, in order): they take part in next-item generation
  (`calrec_nig` reads their answer at `target_index`) and in neither InfoNCE term (`contrastive_valid` 0, no
  history or target span; their item-tower rows stay and are masked out)."""
  rows = list(rows)
  width = max(calrec_batch["tokens"].shape[1], aux_batch["tokens"].shape[1])
  width_a = max(calrec_batch["target_index"].shape[1], aux_batch["target_index"].shape[1])
  out = {k: v.copy() for k, v in calrec_batch.items()}
  for k in ("tokens", "attention_mask", "loss_mask", "history_mask", "target_mask"):
    out[k] = _widen(out[k], width)
  for k in ("tokens", "attention_mask", "loss_mask"):
    out[k][rows] = _widen(aux_batch[k], width)
  out["target_index"] = _widen(out["target_index"], width_a)
  out["target_index"][rows] = _widen(aux_batch["target_index"], width_a)
  out["history_mask"][rows] = 0
  out["target_mask"][rows] = 0
  out["contrastive_valid"][rows] = 0
  return out


class CalrecMixedEpoch(Sequence):
  """CALRec's epoch (`nextitem_tokens.epoch_plan`) with each row's task drawn by the ratios ("rec": CALRec's own
  next-item row) from a generator seeded by (seed, epoch, batch); an auxiliary row's prompt is made from the
  row's training example (`make_prompt`, seeded by (seed, epoch, batch, row))."""

  def __init__(self, sources, plan, layout, aux_layout: Layout, tasks: Sequence[str], probs: np.ndarray,
               settings: TaskSettings, seed: int, epoch: int):
    self.sources, self.plan, self.layout, self.aux_layout = sources, plan, layout, aux_layout
    self.tasks, self.probs, self.settings, self.seed, self.epoch = tasks, probs, settings, seed, epoch

  def __len__(self) -> int:
    return len(self.plan)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    source, rows = self.plan[i]
    it, examples, data, pt = self.sources[source]
    xs = [examples[r] for r in rows]
    batch = nextitem_tokens.train_batch(it, xs, self.layout)
    drawn = np.random.default_rng([self.seed, self.epoch, i]).choice(len(self.probs), size=len(xs), p=self.probs)
    aux = [r for r, t in enumerate(drawn.tolist()) if self.tasks[t] != "rec"]
    if not aux:
      return batch
    prompts = [make_prompt(self.tasks[drawn[r]], data, xs[r], np.random.default_rng([self.seed, self.epoch, i, r]),
                           self.settings) for r in aux]
    return with_aux_rows(batch, candidates.train_batch(pt, prompts, self.aux_layout), aux)


def calrec_train_batches(sources, batch_size: int, layout, aux_layout: Layout, ratios: Mapping[str, float],
                         settings: TaskSettings, seed: int,
                         field: str = "config.tasks.ratios") -> sequences.EpochBatches:
  """`nextitem_tokens.train_batches` for CALRec with auxiliary rows mixed in at `ratios`; `sources` are
  (ItemTokens, training examples, NextItemData, PromptTokens) per dataset; checkpointable, seeded per batch."""
  tasks, probs = mixture(ratios, field)
  aux_layout = dataclasses.replace(aux_layout, answer_lines=max(aux_layout.answer_lines,
                                                                answer_lines(tasks, settings)))
  sources = list(sources)
  sizes = [len(s[1]) for s in sources]
  make = lambda epoch: CalrecMixedEpoch(  # noqa: E731
      sources, nextitem_tokens.epoch_plan(sizes, batch_size, np.random.default_rng([seed, epoch])), layout,
      aux_layout, tasks, probs, settings, seed, epoch)
  return sequences.EpochBatches(make)
