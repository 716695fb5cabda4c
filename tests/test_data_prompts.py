"""Prompt templates, TALLRec rendering, text views and Alpaca instruction sources."""

import numpy as np
import pytest

from clclm_jax.data import instruct, prompts, textviews
from clclm_jax.data.records import Catalogue, Interaction, Item

MOVIES = Catalogue([Item(1, "A (1990)"), Item(2, "B (1991)"), Item(3, "C (1992)"), Item(4, "T (1993)")])
BOOKS = Catalogue([Item(1, "Kiss the Girls", "James Patterson"), Item(2, "Rising Sun", "MICHAEL CRICHTON"),
                   Item(3, "Friday", "Robert Heinlein")])


def test_alpaca_template_text():
  with_input = prompts.template("alpaca").prompt("Do X.", "some input")
  assert with_input == ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.\n\n"
                        "### Instruction:\nDo X.\n\n### Input:\nsome input\n\n### Response:\n")
  assert prompts.template("alpaca").prompt("Do X.") == (
      "Below is an instruction that describes a task. Write a response that appropriately completes the request."
      "\n\n### Instruction:\nDo X.\n\n### Response:\n")
  verbatim = prompts.template("tallrec_verbatim").prompt("Do X.", "in")
  assert verbatim == with_input.replace("the request.\n", "the request.  # noqa: E501\n").replace("some input", "in")
  with pytest.raises(KeyError, match="unknown template 'nope'"):
    prompts.template("nope")


def test_render_movie_and_book():
  x = Interaction(1, (1, 2, 3), (True, False, True), 4, 1)
  assert prompts.render_tallrec(x, MOVIES, "movie") == (
      'User Preference: "A (1990)", "C (1992)"\nUser Unpreference: "B (1991)"\n'
      'Whether the user will like the target movie "T (1993)"?')
  b = Interaction(1, (2,), (False,), 3, 1)
  assert prompts.render_tallrec(b, BOOKS, "book") == (
      'User Preference: \nUser Unpreference: "Rising Sun" written by MICHAEL CRICHTON\n'
      'Whether the user will like the target book ""Friday" written by Robert Heinlein"?')
  assert prompts.tallrec_record(b, BOOKS, "book")["output"] == "Yes."
  assert prompts.instruction("movie") == ("Given the user's preference and unpreference, identify whether the user "
                                           'will like the target movie by answering "Yes." or "No.".')


def test_text_views():
  x = Interaction(1, tuple(range(1, 4)) * 3 + (1,), (True, False) * 5, 4, 0)
  rng = np.random.default_rng(0)
  crop = textviews.view_positions(10, "crop", rng, 0.6)
  assert [i for i, _ in crop] == list(range(crop[0][0], crop[0][0] + 6))
  mask = textviews.view_positions(10, "mask", rng, 0.3)
  assert sum(m for _, m in mask) == 3 and [i for i, _ in mask] == list(range(10))
  reorder = textviews.view_positions(10, "reorder", rng, 0.6)
  assert sorted(i for i, _ in reorder) == list(range(10))
  text = textviews.render_view(x, MOVIES, "movie", mask)
  assert text.count('"[MASK]"') == 3 and text.endswith('target movie "T (1993)"?')
  a = textviews.two_views(x, MOVIES, "movie", np.random.default_rng(5))
  assert a == textviews.two_views(x, MOVIES, "movie", np.random.default_rng(5))
  assert all(v.endswith('"T (1993)"?') for v in a)
  assert textviews.two_views(Interaction(1, (), (), 4, 0), MOVIES, "movie", rng)[0].startswith(
      "User Preference: \nUser Unpreference: \n")


def test_alpaca_sources(data_root):
  small = instruct.read_alpaca(data_root / "instruct" / "alpaca_small.json")
  one_k = instruct.read_alpaca(data_root / "instruct" / "alpaca_data_1k.json")
  assert (len(small), len(one_k)) == (2000, 1000)
  assert sum(r["input"] == "" for r in small) == 1247 and sum(r["input"] == "" for r in one_k) == 608
  seeds = instruct.read_seed_tasks(data_root / "instruct" / "seed_tasks.jsonl")
  assert len(seeds) == 175 and set(seeds[0]) == {"instruction", "input", "output"} and seeds[0]["output"]


def test_jsonl_source(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text('{"instruction": "i", "input": "", "output": "o"}\n\n'
                  '{"instruction": "j", "input": "x", "output": "p"}\n')
  assert instruct.read_alpaca(path) == [{"instruction": "i", "input": "", "output": "o"},
                                        {"instruction": "j", "input": "x", "output": "p"}]
