"""Next-item text data: leave-one-out splits, CALRec rendering, MovieLens / Beauty loading, bad input."""

import warnings

import numpy as np
import pytest

from clclm_jax.data import nextitem, sequences
from clclm_jax.data.errors import DataError


def toy(kind="product"):
  titles = ["Lipstick", "Mascara", "Blush", "Toner", "Serum", "Primer"]
  genres = [("Red", "Matte"), ("Black",), (), ("Daily",), (), ()] if kind == "movie" else None
  histories = [[1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1, 2], [3, 1]]
  return nextitem.from_histories("toy", kind, histories, titles, genres)


def test_leave_one_out_targets():
  data = toy()
  test = nextitem.examples(data, "test")
  valid = nextitem.examples(data, "valid")
  assert test[0] == nextitem.Example(0, (1, 2, 3, 4), 5)
  assert valid[0] == nextitem.Example(0, (1, 2, 3), 4)
  assert [ex.target for ex in test] == [5, 2, 1]  # every user's last item
  assert [ex.target for ex in valid] == [4, 1]  # second-last; user 2 (2 items) has no earlier item for it
  train = nextitem.examples(data, "train")
  assert [(ex.user, ex.history, ex.target) for ex in train if ex.user == 0] == [(0, (1,), 2), (0, (1, 2), 3)]
  assert not [ex for ex in train if ex.user == 2]  # 2 items: both held out
  for ex in train:  # training sees only h[:-2]: never a validation or test position
    h = data.histories[ex.user]
    assert len(ex.history) + 1 <= len(h) - 2
    assert h[:len(ex.history) + 1] == ex.history + (ex.target,)


def test_max_prefixes_is_seeded_and_in_order():
  data = nextitem.from_histories("toy", "product", [list(range(1, 21))] * 3, [f"t{i}" for i in range(1, 21)])
  a = nextitem.examples(data, "train", max_prefixes=4, seed=1)
  assert a == nextitem.examples(data, "train", max_prefixes=4, seed=1)
  assert a != nextitem.examples(data, "train", max_prefixes=4, seed=2)
  for user in range(3):
    lengths = [len(ex.history) for ex in a if ex.user == user]
    assert len(lengths) == 4 and lengths == sorted(lengths)
    assert all(ex.target <= 18 for ex in a)  # 19 and 20 are valid / test targets
  assert len(nextitem.examples(data, "train", max_prefixes=100)) == 3 * 17


def test_render_product_exact():
  data = toy()
  prompt, target = nextitem.render_example(data, nextitem.examples(data, "test")[0])
  assert prompt == ("This is the user's purchase history:\n"
                    "Title: Lipstick\nTitle: Mascara\nTitle: Blush\nTitle: Toner\n"
                    "The next item is as follows:\n")
  assert target == "Title: Serum"
  assert nextitem.render_prompt(data, (1, 2, 3, 4), max_history=2) == (
      "This is the user's purchase history:\nTitle: Blush\nTitle: Toner\nThe next item is as follows:\n")
  assert nextitem.render_prompt(data, (1, 2), max_history=5) == nextitem.render_prompt(data, (1, 2))
  assert nextitem.catalogue_texts(data)[:2] == ["Title: Lipstick", "Title: Mascara"]


def test_render_movie_exact():
  data = toy("movie")
  assert nextitem.render_prompt(data, (1, 3)) == (
      "This is the user's watch history:\n"
      "Title: Lipstick Genres: Red, Matte\nTitle: Blush\nThe next item is as follows:\n")
  assert nextitem.item_text(data, 2) == "Title: Mascara Genres: Black"


def test_ml100k(data_root):
  data = nextitem.load("ml100k", data_root)
  assert (len(data.histories), data.num_items, sum(map(len, data.histories))) == (943, 1682, 100_000)
  assert data.users == tuple(range(1, 944)) and data.untitled == ()
  assert nextitem.item_text(data, 1) == "Title: Toy Story (1995) Genres: Animation, Children's, Comedy"
  genre_lines = (data_root / "ml-100k" / "u.genre").read_text(encoding="latin-1").split()
  assert tuple(line.split("|")[0] for line in genre_lines) == nextitem.ML100K_GENRES
  # Same histories and ids as the ID encoder's sequences (timestamp, then item id).
  ids = sequences.load_ml100k(data_root / "ml-100k" / "u.data")
  assert ids.num_items == data.num_items
  assert all(np.array_equal(a, b) for a, b in zip(ids.sequences, data.histories))
  for ex in nextitem.examples(data, "test"):
    assert not {data.histories[ex.user][-1], data.histories[ex.user][-2]} & set(data.histories[ex.user][:-2])
  train_targets = {}
  for ex in nextitem.examples(data, "train"):
    train_targets.setdefault(ex.user, set()).add(ex.target)
  for ex in nextitem.examples(data, "valid") + nextitem.examples(data, "test"):
    assert ex.target not in train_targets[ex.user]
  assert nextitem.render_prompt(data, data.histories[0][:2]).startswith("This is the user's watch history:\n")


def test_beauty(data_root):
  with pytest.warns(UserWarning, match="7 items have no title"):
    data = nextitem.load("beauty", data_root)
  assert (len(data.histories), data.num_items, sum(map(len, data.histories))) == (22_363, 12_101, 198_502)
  assert data.untitled == (495, 1454, 2015, 5336, 7406, 7410, 9178)
  assert nextitem.item_text(data, 495) == "Title: item 495"
  assert len(set(nextitem.catalogue_texts(data))) > 12_000
  ids = sequences.load_beauty(data_root / "amazon-beauty-5core" / "sequential_data.txt")
  assert ids.num_items == data.num_items
  assert all(np.array_equal(a, b) for a, b in zip(ids.sequences, data.histories))
  test = nextitem.examples(data, "test")
  assert len(test) == 22_363 and test[0] == nextitem.Example(0, (1, 2, 3, 4), 5)


@pytest.mark.parametrize("name", ["sports", "toys"])
def test_id_only_datasets_refuse_text(tmp_path, name):
  with pytest.raises(DataError, match="ID-only pretraining") as e:
    nextitem.load(name, tmp_path)
  assert "\n" not in str(e.value)


def test_missing_folder_and_unknown_name(tmp_path):
  with pytest.raises(DataError, match="amazon-beauty-5core: dataset folder not found; fix: set CLCLM_DATA"):
    nextitem.load("beauty", tmp_path)
  with pytest.raises(KeyError, match="unknown next-item dataset"):
    nextitem.load("books", tmp_path)


def write_beauty(root, titles, lines):
  folder = root / "amazon-beauty-5core"
  folder.mkdir()
  (folder / "item_titles.tsv").write_text("p5_item_id\tasin\ttitle\n" + "".join(
      f"{i}\tA{i}\t{t}\n" for i, t in enumerate(titles, start=1)))
  (folder / "sequential_data.txt").write_text("".join(line + "\r\n" for line in lines))
  return folder


def test_beauty_bad_input(tmp_path):
  folder = write_beauty(tmp_path, ["a", "b", "c"], ["1 1 2 3", "2 3 9 1"])
  with pytest.raises(DataError) as e:
    nextitem.load("beauty", tmp_path)
  msg = str(e.value)
  assert msg.startswith(f"{folder / 'sequential_data.txt'} record 2: history holds item ids [9] outside")
  assert "fix:" in msg and "\n" not in msg
  (folder / "item_titles.tsv").write_text("p5_item_id\tasin\ttitle\n")
  with pytest.raises(DataError, match=r"item_titles.tsv: the catalogue has no item text; fix:"):
    nextitem.load("beauty", tmp_path)


def test_untitled_placeholder_small(tmp_path):
  write_beauty(tmp_path, ["a", "", "c"], ["1 1 2 3"])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    data = nextitem.load("beauty", tmp_path)
  assert data.untitled == (2,) and "1 items have no title" in str(caught[0].message)
  assert nextitem.catalogue_texts(data) == ["Title: a", "Title: item 2", "Title: c"]


def test_movielens_small_and_unknown_item(tmp_path):
  folder = tmp_path / "ml-100k"
  folder.mkdir()
  flags = lambda *on: "|".join("1" if g in on else "0" for g in nextitem.ML100K_GENRES)
  (folder / "u.item").write_bytes(f"1|Caf\xe9 (1990)|01-Jan-1990||url|{flags('Action', 'Drama')}\n"
                                  f"2|B (1991)|01-Jan-1991||url|{flags('unknown')}\n".encode("latin-1"))
  (folder / "u.data").write_text("7\t2\t5\t200\n7\t1\t3\t100\n7\t2\t4\t100\n")
  data = nextitem.load("ml100k", tmp_path)
  assert data.histories == ((1, 2, 2),)  # by timestamp, ties by item id
  assert nextitem.item_text(data, 1) == "Title: Caf\xe9 (1990) Genres: Action, Drama"
  assert nextitem.item_text(data, 2) == "Title: B (1991) Genres: unknown"
  (folder / "u.data").write_text("7\t1\t5\t200\n7\t3\t3\t100\n")
  with pytest.raises(DataError, match=r"u.data record 1: unknown item id 3; fix:"):
    nextitem.load("ml100k", tmp_path)
  (folder / "u.data").write_text("7\t1\t5\t200\n")
  (folder / "u.item").write_text(f"1|A (1990)|01-Jan-1990||url|{flags()}\n2|B (1991)|01-Jan-1991||url|0|1\n")
  with pytest.raises(DataError, match=r"u.item record 2: has 2 genre flags, not 19"):
    nextitem.load("ml100k", tmp_path)


def test_in_memory_bad_input():
  with pytest.raises(DataError, match="the item text is empty"):
    nextitem.from_histories("x", "product", [[1, 2]], ["a", " "])
  with pytest.raises(DataError, match="the catalogue has no item text"):
    nextitem.from_histories("x", "product", [], [])
  with pytest.raises(DataError, match=r"record 0: history holds item ids \[3\]"):
    nextitem.from_histories("x", "product", [[1, 3]], ["a", "b"])
