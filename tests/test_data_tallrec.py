"""TALLRec sources: byte-identical movie files, JSON round trips, the book procedure, the command line."""

import json
import pathlib
import subprocess
import sys

import pytest

from clclm_jax.data import prompts, tallrec
from clclm_jax.data.errors import DataError
from clclm_jax.data.instruct import read_json_records
from clclm_jax.data.records import Catalogue, Item


def test_movie_files_byte_identical(data_root, tmp_path):
  counts = tallrec.build_tallrec("movie", data_root / "ml-100k", tmp_path)
  assert counts == {"train": 8000, "valid": 1000, "test": 1000}
  movie = data_root / "tallrec" / "movie"
  for ours, theirs in [("train", "train_regenerated"), ("valid", "valid"), ("test", "test")]:
    assert (tmp_path / f"{ours}.json").read_bytes() == (movie / f"{theirs}.json").read_bytes(), ours


@pytest.mark.parametrize("domain,split", [("movie", "valid"), ("movie", "test"), ("book", "valid")])
def test_json_round_trip(data_root, domain, split):
  """Parsing a TALLRec file and rendering it again gives every record back exactly."""
  catalogue = tallrec.read_movielens(data_root / "ml-100k")[0] if domain == "movie" else None
  path = data_root / "tallrec" / domain / f"{split}.json"
  records = read_json_records(path)
  ids = tallrec.ItemIds(catalogue)
  xs = tallrec.read_tallrec(path, domain, ids)
  catalogue = ids.catalogue()
  assert [prompts.tallrec_record(x, catalogue, domain) for x in xs] == records


def test_text_ids_follow_first_appearance(data_root):
  ids = tallrec.ItemIds()
  xs = tallrec.read_tallrec(data_root / "tallrec" / "movie" / "valid.json", "movie", ids)
  seen = []
  for x in xs:
    seen += [i for i in (*x.history_ids[:sum(x.history_likes)], *x.history_ids[sum(x.history_likes):], x.target_id)
             if i not in seen]
  assert seen == list(range(1, len(seen) + 1))
  assert ids.catalogue()[1].title == "Silence of the Lambs, The (1991)"


def test_movie_splits_match_files(data_root):
  s = tallrec.tallrec_splits("movie", data_root)
  records = read_json_records(data_root / "tallrec" / "movie" / "test.json")
  assert [prompts.tallrec_record(x, s.catalogue, "movie") for x in s.test] == records
  assert all(x.user > 0 and x.timestamp for x in s.train[:10])


def test_book_splits_seeded_and_disjoint(data_root):
  a, b = tallrec.tallrec_splits("book", data_root, seed=0), tallrec.tallrec_splits("book", data_root, seed=0)
  assert a.train == b.train and a.valid == b.valid
  assert (len(a.train), len(a.valid), len(a.test)) == (1427, 1000, 2427)
  c = tallrec.tallrec_splits("book", data_root, seed=1)
  assert c.train != a.train and sorted(map(repr, c.train + c.valid)) == sorted(map(repr, a.train + a.valid))
  test = read_json_records(data_root / "tallrec" / "book" / "test.json")
  assert [prompts.tallrec_record(x, a.catalogue, "book") for x in a.test] == test


def _write_bx(folder: pathlib.Path, n_users: int = 30) -> None:
  """A tiny Book-Crossing dump: `;`-separated, quoted, latin-1, with a `;` and an accent in titles."""
  books = ['"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher"']
  books += [f'"{i:04d}";"Book {i}; vol. é";"Author {i % 7}";"{1990 + i % 10}";"P"' for i in range(40)]
  ratings = ['"User-ID";"ISBN";"Book-Rating"']
  for u in range(1, n_users + 1):
    for k in range(u % 8):  # users 1..30 rate 0..7 books; those with <= 3 ratings are dropped.
      ratings.append(f'"{u}";"{(u * 3 + k) % 40:04d}";"{(u + k) % 11}"')
  ratings.append('"5";"unknown-isbn";"9"')  # Not in BX-Books: dropped by the inner join.
  (folder / "BX-Books.csv").write_bytes(("\r\n".join(books) + "\r\n").encode("latin-1"))
  (folder / "BX-Book-Ratings.csv").write_bytes(("\r\n".join(ratings) + "\r\n").encode("latin-1"))


def test_book_procedure_on_synthetic_csv(tmp_path):
  _write_bx(tmp_path)
  catalogue, ratings = tallrec.read_bookcrossing(tmp_path)
  assert catalogue[2].title == "Book 1; vol. é" and catalogue[2].author == "Author 1" and catalogue[2].year == 1991
  train, valid, test = tallrec.book_interactions(ratings, seed=3)
  users = [x.user for x in train + valid + test]
  assert sorted(users) == [u for u in range(1, 31) if u % 8 >= 4]
  assert (len(train), len(valid), len(test)) == (int(len(users) * 0.8), 1, len(users) - int(len(users) * 0.8) - 1)
  for x in train + valid + test:
    rated = {((x.user * 3 + k) % 40) + 1: (x.user + k) % 11 for k in range(x.user % 8)}
    assert len(x.history_ids) == len(rated) - 1 and x.target_id not in x.history_ids
    assert set(x.history_ids) | {x.target_id} == set(rated)
    assert x.label == int(rated[x.target_id] > 5)
    assert x.history_likes == tuple(rated[i] > 5 for i in x.history_ids)
  assert tallrec.book_interactions(ratings, seed=3) == (train, valid, test)
  assert tallrec.book_interactions(ratings, seed=4) != (train, valid, test)


def test_book_history_capped_at_ten():
  ratings = [(7, i, 8) for i in range(1, 16)]
  (x,) = [y for split in tallrec.book_interactions(ratings, seed=0) for y in split]
  assert len(x.history_ids) == 10 and x.label == 1


def test_command_line_writes_three_files(tmp_path):
  _write_bx(tmp_path)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "clclm_jax.data", "tallrec", "--dataset", "book", "--raw", str(tmp_path),
         "--out", str(out)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=True)
  assert "train=" in done.stdout
  assert sorted(p.name for p in out.iterdir()) == ["test.json", "train.json", "valid.json"]
  records = json.loads((out / "train.json").read_text())
  assert records[0]["instruction"] == prompts.instruction("book")
  assert '" written by Author ' in records[0]["input"] + records[1]["input"]


def test_command_line_failure_leaves_nothing(tmp_path):
  _write_bx(tmp_path)
  (tmp_path / "BX-Book-Ratings.csv").write_bytes(b'"User-ID";"ISBN";"Book-Rating"\r\n"x";"0001";"5"\r\n')
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "clclm_jax.data", "tallrec", "--dataset", "book", "--raw", str(tmp_path),
         "--out", str(out)]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 1
  assert "BX-Book-Ratings.csv record 0: User-ID and Book-Rating must be integers" in done.stderr
  assert not out.exists() or not list(out.iterdir())


def test_atomic_write_failure_leaves_no_file(tmp_path):
  with pytest.raises(TypeError):
    tallrec.write_files_atomically({tmp_path / "a.json": "[]", tmp_path / "b.json": None})
  assert list(tmp_path.iterdir()) == []


def test_unknown_item_with_catalogue(tmp_path):
  path = tmp_path / "x.json"
  record = {"instruction": prompts.instruction("movie"), "output": "Yes.",
            "input": 'User Preference: "A (1990)"\nUser Unpreference: \n'
                     'Whether the user will like the target movie "B (1991)"?'}
  path.write_text(json.dumps([record]))
  with pytest.raises(DataError, match=r"x.json record 0: unknown item 'B \(1991\)' by None; fix: pass the catalogue"):
    tallrec.read_tallrec(path, "movie", tallrec.ItemIds(Catalogue([Item(1, "A (1990)")])))
