"""Tokenization: answer position, loss masks, truncation that keeps the answer and target, Yes/No ids."""

import numpy as np
import pytest

from clclm_jax.data import prompts, tokenize
from clclm_jax.data.errors import DataError
from clclm_jax.data.records import Catalogue, Interaction, Item


class ByteTokenizer:
  """UTF-8 bytes as ids 3..258 after <pad>=0, <s>=1, </s>=2; BOS is added with special tokens."""

  bos_token_id, eos_token_id = 1, 2

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return [self.bos_token_id] * add_special_tokens + [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(int(i) - 3 for i in ids if i >= 3).decode("utf-8")


CATALOGUE = Catalogue([Item(i, f"Movie number {i} (19{i:02d})") for i in range(1, 21)] + [Item(99, "T" * 40)])
USER = Interaction(7, tuple(range(1, 11)), (True, False) * 5, 15, 1)


def test_answer_index_and_masks():
  tok = ByteTokenizer()
  enc = tokenize.encode_example(tok, "Q:\n", "Yes.", cutoff_len=64)
  assert tok.decode(enc.tokens) == "Q:\nYes." and enc.tokens[0] == 1 and enc.tokens[-1] == 2
  assert enc.tokens.dtype == np.int32 and enc.answer_index == 3  # <s> Q : \n -> predicts "Y".
  assert tok.decode(enc.tokens[enc.answer_index + 1:]) == "Yes."
  np.testing.assert_array_equal(enc.loss_mask, [0] + [1] * (len(enc) - 1))
  inputs_off = tokenize.encode_example(tok, "Q:\n", "Yes.", cutoff_len=64, train_on_inputs=False)
  np.testing.assert_array_equal(inputs_off.loss_mask, [0] * 4 + [1] * 5)  # "Yes." and EOS.


def test_fits_without_truncation():
  enc = tokenize.encode_interaction(ByteTokenizer(), USER, CATALOGUE, "movie", cutoff_len=1024)
  text = ByteTokenizer().decode(enc.tokens)
  assert text == prompts.template("alpaca").prompt(prompts.instruction("movie"),
                                                   prompts.render_tallrec(USER, CATALOGUE, "movie")) + "Yes."


def test_truncation_drops_oldest_history_keeps_answer_and_target():
  tok = ByteTokenizer()
  full = len(tokenize.encode_interaction(tok, USER, CATALOGUE, "movie", cutoff_len=1024))
  cutoff = full - 60  # Room for all but two or three history titles.
  enc = tokenize.encode_interaction(tok, USER, CATALOGUE, "movie", cutoff_len=cutoff)
  text = tok.decode(enc.tokens)
  assert len(enc) <= cutoff and text.endswith('target movie "Movie number 15 (1915)"?\n\n### Response:\nYes.')
  assert "Movie number 1 (1901)" not in text and "Movie number 10 (1910)" in text  # Oldest went first.
  assert tok.decode(enc.tokens[enc.answer_index + 1:]) == "Yes."


def test_no_history_cannot_fit_is_a_clear_error():
  x = Interaction(1, (1, 2), (True, True), 99, 0)
  with pytest.raises(DataError, match=r"test.json record 5: even with no history the prompt is too long "
                                      r"\(\d+ tokens > cutoff_len 150\); fix: raise cutoff_len"):
    tokenize.encode_interaction(ByteTokenizer(), x, CATALOGUE, "movie", cutoff_len=150, path="test.json", index=5)


def test_answer_token_ids_byte_tokenizer():
  assert tokenize.answer_token_ids(ByteTokenizer()) == (ord("Y") + 3, ord("N") + 3)


def _smollm2_tokenizer():
  """The tokenizer `load_model("smollm2-135m-instruct")` returns, without loading the weights."""
  gguf = pytest.importorskip("gguf")
  from clclm_jax.model import loading
  try:
    path = loading.smollm2_gguf()
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"SmolLM2 GGUF not available: {e}")
  return loading.gguf_tokenizer(gguf.GGUFReader(path), path)


@pytest.mark.slow
def test_real_tokenizer_answer_in_context():
  tok = _smollm2_tokenizer()
  yes_id, no_id = tokenize.answer_token_ids(tok)
  assert tok.decode([yes_id]) == "Yes" and tok.decode([no_id]) == "No"
  enc = tokenize.encode_interaction(tok, Interaction(1, (1, 2), (True, False), 3, 0), CATALOGUE, "movie")
  assert enc.tokens[enc.answer_index + 1] == no_id and enc.tokens[-1] == tok.eos_token_id
  assert tok.decode(enc.tokens[enc.answer_index + 1:-1]) == "No."
