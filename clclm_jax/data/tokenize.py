"""Prompt + answer + EOS -> int32 tokens with a loss mask and the position that scores the answer.

Conventions (shared with `train/`): `loss_mask[i] = 1` when token i is a training target, predicted
by the logits at position i - 1 (position 0 never is); `answer_index` is the position whose logits
predict the first answer token, i.e. the last prompt token. Any tokenizer with
`encode(text, add_special_tokens=...)` and `eos_token_id` works; BOS is whatever the tokenizer adds.
"""

from collections.abc import Callable
import dataclasses
import functools
import os
from typing import Protocol

import numpy as np

from clclm_jax.data import prompts
from clclm_jax.data.errors import DataError
from clclm_jax.data.records import Catalogue, Interaction


class Tokenizer(Protocol):
  eos_token_id: int

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One tokenized example: tokens_t and loss_mask_t (int32), and the answer-scoring position."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  answer_index: int

  def __len__(self) -> int:
    return len(self.tokens)


class TooLong(ValueError):
  """The prompt and answer do not fit in `cutoff_len` tokens."""


def encode_example(tokenizer: Tokenizer, prompt: str, answer: str, *, cutoff_len: int,
                   train_on_inputs: bool = True) -> Encoded:
  """Tokenizes `prompt + answer` jointly (as TALLRec does) and appends EOS; raises TooLong, never cuts."""
  prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=True))
  full_ids = list(tokenizer.encode(prompt + answer, add_special_tokens=True))
  if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
    full_ids = prompt_ids + list(tokenizer.encode(answer, add_special_tokens=False))  # Merges across the seam.
  tokens = np.asarray(full_ids + [tokenizer.eos_token_id], np.int32)
  if len(tokens) > cutoff_len:
    raise TooLong(f"{len(tokens)} tokens > cutoff_len {cutoff_len}")
  first_target = 1 if train_on_inputs else len(prompt_ids)
  loss_mask = (np.arange(len(tokens)) >= first_target).astype(np.int32)
  return Encoded(tokens, loss_mask, len(prompt_ids) - 1)


@functools.lru_cache(maxsize=8)
def chars_per_token(tokenizer: Tokenizer) -> float:
  """The most characters one token covers (the longest vocabulary entry; inf without `get_vocab`): a text of n
  characters has at least n / this many tokens (no normalizer here deletes characters)."""
  return max(map(len, tokenizer.get_vocab()), default=1) if hasattr(tokenizer, "get_vocab") else float("inf")


def encode_fitting(tokenizer: Tokenizer, x: Interaction, render: Callable[[Interaction], str], *, cutoff_len: int,
                   train_on_inputs: bool = True, context: int | None = None, path: str | os.PathLike | None = None,
                   index: int | None = None) -> tuple[Encoded, Interaction, str]:
  """(Encoded, y, prompt) of `render(y)` and y's answer, y being `x` with as few of its oldest history items dropped
  as fit `cutoff_len`. A prompt longer in characters than `cutoff_len` tokens can hold is passed over untokenised,
  so a huge record costs no tokenisation. Errors name x's file and record (`Interaction.source`), else `path`,
  `index`; a prompt beyond the model's `context` (max_position_embeddings) is refused."""
  path, index = x.source or (path, index)
  most = cutoff_len * chars_per_token(tokenizer)
  for drop in range(len(x.history_ids) + 1):
    y = x.drop_oldest(drop)
    prompt, answer = render(y), prompts.ANSWERS[y.label]
    if len(prompt) + len(answer) > most:
      problem = f"{len(prompt) + len(answer)} characters, more than cutoff_len {cutoff_len} tokens hold"
      continue
    try:
      enc = encode_example(tokenizer, prompt, answer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
      break
    except TooLong as e:
      problem = str(e)
  else:
    raise DataError(path, index, f"even with no history the prompt is too long ({problem})",
                    "raise cutoff_len or shorten the target item's title")
  if context is not None and len(enc) > context:
    raise DataError(path, index, f"{len(enc)} tokens, more than the model's context of {context} "
                    "(max_position_embeddings)", f"set data.cutoff_len to {context} or less (older history items "
                    "are then left out)")
  return enc, y, prompt


def encode_interaction(tokenizer: Tokenizer, interaction: Interaction, catalogue: Catalogue, domain: str, *,
                       cutoff_len: int = 512, train_on_inputs: bool = True, template: str = "alpaca",
                       path: str | os.PathLike | None = None, index: int | None = None,
                       context: int | None = None) -> Encoded:
  """A TALLRec prompt, re-rendered with the oldest history items dropped until it fits `cutoff_len`
  (`encode_fitting`)."""
  tmpl = prompts.template(template)
  instruction = prompts.instruction(domain)
  render = lambda y: tmpl.prompt(instruction, prompts.render_tallrec(y, catalogue, domain))  # noqa: E731
  return encode_fitting(tokenizer, interaction, render, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
                        context=context, path=path, index=index)[0]


def answer_token_ids(tokenizer: Tokenizer, template: str = "alpaca") -> tuple[int, int]:
  """(yes_id, no_id): the first token of "Yes." and "No." right after a Response header, in context."""
  prompt = prompts.template(template).prompt(prompts.instruction("movie"), "User Preference: \"A\"")
  yes, no = (encode_example(tokenizer, prompt, a, cutoff_len=1 << 30) for a in ("Yes.", "No."))
  yes_id, no_id = int(yes.tokens[yes.answer_index + 1]), int(no.tokens[no.answer_index + 1])
  if yes_id == no_id:
    raise ValueError(f"'Yes.' and 'No.' start with the same token {yes_id}; use a tokenizer that separates them")
  return yes_id, no_id
