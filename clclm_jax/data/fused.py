"""Fused prompts (CLCLMRec): TALLRec's prompt with a line of k soft-token placeholders, its history ids and likes,
target id and history span; collation and the train / eval batch builders.

A fused example holds `tokens`, `loss_mask` (never on placeholders), `answer_index`, `label`, `user_ids`,
`index`, `target_ids`, `history_ids` / `history_feedback` (left-padded; 1 liked, 2 disliked) and `history_mask`
(the history's tokens); with text views, `view1_tokens` / `view2_tokens`; with base logits (residual fusion's
frozen-base answer on text-only prompts, computed once), `base_logit`. `num_soft_tokens=0` gives TALLRec's
text-only prompt with the same arrays.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import math

import grain
import numpy as np

from clclm_jax.data import pipeline, prompts, textviews, tokenize
from clclm_jax.data.errors import DataError
from clclm_jax.data.records import Catalogue, Interaction

BEHAVIOR_LINE = "User Behavior Embedding:"
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """How examples are rendered: `num_soft_tokens=0` gives TALLRec's text-only prompt."""

  domain: str
  placeholder: str  # text of a token the tokenizer keeps whole, e.g. "<reponame>" for SmolLM2
  placeholder_id: int
  num_soft_tokens: int = 0
  cutoff_len: int = 512
  train_on_inputs: bool = False
  template: str = "alpaca"
  history_len: int = 10
  view_len: int = 128  # text views keep their last `view_len` tokens
  context: int | None = None  # the model's max_position_embeddings: a longer prompt is refused

  def with_soft_tokens(self, k: int) -> "PromptSpec":
    return dataclasses.replace(self, num_soft_tokens=k)


def fused_input(x: Interaction, catalogue: Catalogue, domain: str, slots: str = "") -> str:
  """TALLRec's input text; with `slots` a behaviour line holding them goes before the question."""
  text = prompts.render_tallrec(x, catalogue, domain)
  if not slots:
    return text
  history, question = text.rsplit("\n", 1)
  return f"{history}\n{BEHAVIOR_LINE}{slots}\n{question}"


def left_pad(values: Sequence[int], length: int) -> np.ndarray:
  values = list(values)[-length:]
  return np.asarray([0] * (length - len(values)) + values, np.int32)


def encode_fused(tokenizer: tokenize.Tokenizer, x: Interaction, catalogue: Catalogue, spec: PromptSpec,
                 index: int) -> Batch:
  """One example: tokens with k placeholders, loss mask (never on placeholders), history ids, likes, span."""
  tmpl = prompts.template(spec.template)
  render = lambda y: tmpl.prompt(prompts.instruction(spec.domain),  # noqa: E731
                                 fused_input(y, catalogue, spec.domain, spec.placeholder * spec.num_soft_tokens))
  enc, y, prompt = tokenize.encode_fitting(tokenizer, x, render, cutoff_len=spec.cutoff_len,
                                           train_on_inputs=spec.train_on_inputs, context=spec.context, index=index)
  slots = int((enc.tokens == spec.placeholder_id).sum())
  if slots != spec.num_soft_tokens:
    raise DataError(*(x.source or (None, index)), f"prompt holds {slots} tokens of placeholder id "
                    f"{spec.placeholder_id}, expected {spec.num_soft_tokens}",
                    "choose a placeholder the tokenizer keeps as one special token ('<reponame>' for SmolLM2)")
  start = prompt.index("User Preference:")
  end = prompt.index("\n", prompt.index("User Unpreference:"))
  history_mask = np.zeros(len(enc.tokens), np.int32)
  history_mask[len(tokenizer.encode(prompt[:start])):len(tokenizer.encode(prompt[:end]))] = 1
  return {"tokens": enc.tokens, "loss_mask": enc.loss_mask * (enc.tokens != spec.placeholder_id),
          "answer_index": np.int32(enc.answer_index), "label": np.int32(y.label), "user_ids": np.int32(y.user),
          "index": np.int32(index), "target_ids": np.int32(y.target_id),
          "history_ids": left_pad(y.history_ids, spec.history_len),
          "history_feedback": left_pad([1 if like else 2 for like in y.history_likes], spec.history_len),
          "history_mask": history_mask}


def encode_views(tokenizer: tokenize.Tokenizer, x: Interaction, catalogue: Catalogue, spec: PromptSpec,
                 rng: np.random.Generator) -> Batch:
  """Two text views of the history (crop / mask / reorder), without the target that both would share."""
  views = textviews.two_views(x, catalogue, spec.domain, rng)
  ids = [np.asarray(tokenizer.encode(v.rsplit("\n", 1)[0])[-spec.view_len:], np.int32) for v in views]
  return {"view1_tokens": ids[0], "view2_tokens": ids[1]}


def _pad_rows(rows: Sequence[np.ndarray], b: int, t: int) -> np.ndarray:
  out = np.zeros((b, t), np.int32)
  for r, row in enumerate(rows):
    out[r, :len(row)] = row
  return out


def target_index(loss_mask_bt: np.ndarray, multiple: int = 8) -> np.ndarray:
  """Positions `[b, n]` where `loss_mask` is 1 (n a multiple of `multiple`), padded with 0 (never a target)."""
  rows = [np.flatnonzero(m[1:]) + 1 for m in loss_mask_bt]
  n = multiple * max(1, math.ceil(max(len(r) for r in rows) / multiple))
  return _pad_rows(rows, len(rows), n)


def collate_fused(examples: Sequence[Batch], *, pad_multiple: int = 16, batch_size: int | None = None,
                  width: int | None = None) -> Batch:
  """`pipeline.collate` plus `history_feedback`, `history_mask`, `target_index`, `target_ids` and, when present,
  text views."""
  batch = pipeline.collate(examples, pad_multiple=pad_multiple, batch_size=batch_size, width=width)
  b, t = batch["tokens"].shape
  batch["target_index"] = target_index(batch["loss_mask"])
  batch["history_feedback"] = _pad_rows([e["history_feedback"] for e in examples], b,
                                        examples[0]["history_feedback"].shape[0])
  batch["history_mask"] = _pad_rows([e["history_mask"] for e in examples], b, t)
  batch["target_ids"] = _pad_rows([e["target_ids"][None] for e in examples], b, 1)[:, 0]
  if "base_logit" in examples[0]:
    batch["base_logit"] = np.zeros(b, np.float32)
    batch["base_logit"][:len(examples)] = [e["base_logit"] for e in examples]
  if "view1_tokens" in examples[0]:
    views = [e[f"view{i}_tokens"] for e in examples for i in (1, 2)]
    tv = pad_multiple * math.ceil(max(len(v) for v in views) / pad_multiple)
    for i in (1, 2):
      rows = [e[f"view{i}_tokens"] for e in examples]
      batch[f"view{i}_tokens"] = _pad_rows(rows, b, tv)
      batch[f"view{i}_mask"] = _pad_rows([np.ones_like(r) for r in rows], b, tv)
  return batch


def _check_base_logits(base_logits, interactions: Sequence[Interaction], spec: PromptSpec) -> None:
  if base_logits is None:
    return
  if spec.num_soft_tokens:
    raise ValueError(f"base logits with {spec.num_soft_tokens} soft tokens: the base pass of a prompt with soft "
                     "tokens changes as the projector trains; pass base_logits=None (recompute it)")
  if len(base_logits) != len(interactions):
    raise ValueError(f"{len(base_logits)} base logits for {len(interactions)} prompts: compute them for these prompts")


def with_base_logit(e: Batch, base_logits, i: int) -> Batch:
  return e if base_logits is None else e | {"base_logit": np.float32(base_logits[i])}


def train_batches(interactions: Sequence[Interaction], catalogue: Catalogue, tokenizer, spec: PromptSpec, *,
                  batch_size: int, seed: int, views: bool = False, pad_multiple: int = 16,
                  base_logits: np.ndarray | None = None) -> Iterator[Batch]:
  """Endless shuffled batches; text views are redrawn per epoch from grain's per-element generator. `base_logits`
  (one per interaction, text-only prompts): each example carries its own as `base_logit`."""
  _check_base_logits(base_logits, interactions, spec)

  def example(item, rng):
    i, x = item
    e = with_base_logit(encode_fused(tokenizer, x, catalogue, spec, i), base_logits, i)
    return e | encode_views(tokenizer, x, catalogue, spec, rng) if views else e

  ds = grain.MapDataset.source(list(enumerate(interactions))).shuffle(seed).repeat(None)
  ds = ds.random_map(example, seed=seed)
  return iter(ds.batch(batch_size, drop_remainder=True,
                       batch_fn=functools.partial(collate_fused, pad_multiple=pad_multiple)).to_iter_dataset())


def eval_batches(interactions: Sequence[Interaction], catalogue: Catalogue, tokenizer, spec: PromptSpec, *,
                 batch_size: int, pad_multiple: int = 16, max_widths: int = 0,
                 base_logits: np.ndarray | None = None) -> grain.MapDataset:
  """Every interaction once (this process's shard), sorted by length, the last batch filled with index -1
  rows; padded as `pipeline.eval_dataset` pads (at most `max_widths` widths, or multiples of `pad_multiple`).
  `base_logits` as in `train_batches`."""
  _check_base_logits(base_logits, interactions, spec)
  examples = grain.MapDataset.source(list(enumerate(interactions))).map(
      lambda ix: with_base_logit(encode_fused(tokenizer, ix[1], catalogue, spec, ix[0]), base_logits, ix[0]))
  return pipeline.eval_dataset(examples, batch_size=batch_size, pad_multiple=pad_multiple, max_widths=max_widths,
                               collate_fn=collate_fused)
