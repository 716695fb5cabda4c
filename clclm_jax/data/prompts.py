"""Prompt templates and TALLRec's Yes/No recommendation prompts, kept as data in small registries.

Template choice: TALLRec's `generate_prompt` (copied from early alpaca-lora) has a stray
`  # noqa: E501` inside the string literal, so its models saw that text. `alpaca` is the clean
Stanford Alpaca template and the default here (we train our own adapters, and the comment is a
formatting accident that costs tokens); `tallrec_verbatim` keeps the comment for exact reproduction.
"""

import dataclasses
import re
from collections.abc import Sequence

from clclm_jax.data.records import Catalogue, Interaction, Item

_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request.{noqa}\n\n"
               "### Instruction:\n{{instruction}}\n\n### Input:\n{{input}}\n\n### Response:\n")
_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.{noqa}\n\n### Instruction:\n{{instruction}}\n\n### Response:\n")


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt with `{instruction}` and `{input}` slots; the answer follows the prompt directly."""

  with_input: str
  without_input: str

  def prompt(self, instruction: str, input_text: str = "") -> str:
    if input_text:
      return self.with_input.format(instruction=instruction, input=input_text)
    return self.without_input.format(instruction=instruction)


TEMPLATES: dict[str, Template] = {
    "alpaca": Template(_WITH_INPUT.format(noqa=""), _NO_INPUT.format(noqa="")),
    "tallrec_verbatim": Template(_WITH_INPUT.format(noqa="  # noqa: E501"),
                                 _NO_INPUT.format(noqa="  # noqa: E501")),
}

ANSWERS = ("No.", "Yes.")  # indexed by label: 0 No, 1 Yes.

_DOMAIN_WORD = re.compile(r"[A-Za-z][A-Za-z0-9 -]*")


def check_domain(domain: str) -> str:
  """`domain` if it can be the item word of TALLRec's prompts ("the target movie"); ValueError if not."""
  if not isinstance(domain, str) or not _DOMAIN_WORD.fullmatch(domain):
    raise ValueError(f"domain {domain!r} is not an item word (letters, digits, spaces, hyphens: 'movie', 'book', "
                     "'game', ...)")
  return domain


def instruction(domain: str) -> str:
  """TALLRec's instruction for items of `domain`; only the item word changes between domains."""
  return ("Given the user's preference and unpreference, identify whether the user will like the "
          f'target {check_domain(domain)} by answering "Yes." or "No.".')


INSTRUCTION_RE = re.compile(r"Given the user's preference and unpreference, identify whether the user will like "
                            r'the target (.+) by answering "Yes\." or "No\."\.')


def template(name: str) -> Template:
  if name not in TEMPLATES:
    raise KeyError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def render_item(item: Item, domain: str) -> str:
  """A history item as TALLRec writes it: `"Title"` (movies, and any domain but books), or `"Title" written by
  Author` for books."""
  if domain == "book":
    return f'"{item.title}" written by {item.author}'
  return f'"{item.title}"'


def render_target(item: Item, domain: str) -> str:
  """The target item; TALLRec's book files quote the whole `"Title" written by Author` once more."""
  if domain == "book":
    return f'"{render_item(item, domain)}"'
  return render_item(item, domain)


def render_input(history: Sequence[tuple[Item, bool]], target: Item, domain: str) -> str:
  """TALLRec's `input` text from (item, liked) pairs, oldest first: liked items, disliked items, target."""
  check_domain(domain)
  liked = ", ".join(render_item(item, domain) for item, like in history if like)
  disliked = ", ".join(render_item(item, domain) for item, like in history if not like)
  return (f"User Preference: {liked}\nUser Unpreference: {disliked}\n"
          f"Whether the user will like the target {domain} {render_target(target, domain)}?")


def render_tallrec(interaction: Interaction, catalogue: Catalogue, domain: str) -> str:
  """TALLRec's `input` text for one interaction, items looked up in the catalogue."""
  history = [(catalogue[i], like) for i, like in zip(interaction.history_ids, interaction.history_likes)]
  return render_input(history, catalogue[interaction.target_id], domain)


def tallrec_record(interaction: Interaction, catalogue: Catalogue, domain: str) -> dict[str, str]:
  """The `{instruction, input, output}` record TALLRec stores for one interaction."""
  return {"instruction": instruction(domain), "input": render_tallrec(interaction, catalogue, domain),
          "output": ANSWERS[interaction.label]}
