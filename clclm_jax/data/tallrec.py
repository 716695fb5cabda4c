"""TALLRec's datasets: MovieLens-100K and Book-Crossing procedures, and TALLRec JSON parsed back to records.

Movie (TALLRec `preprocess_movie.py`): users in order of first rating in `u.data`, each user's ratings
stably sorted by timestamp, one sample per position i >= 10 with the 10 previous ratings as history,
like = rating > 3; the last 10,000 samples split 8000/1000/1000 in order. Book (`preprocess_book.py`):
ratings inner-joined with books, users with > 3 ratings, users split 80/10/10 after a seeded shuffle,
each user's ratings shuffled (seeded) with the last one as target and up to 10 others as history,
like = rating > 5. TALLRec shuffled users without a seed, so no book split can be reproduced exactly.
"""

import csv
import dataclasses
import io
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from clclm_jax.data import paths, prompts
from clclm_jax.data.errors import DataError
from clclm_jax.data.instruct import read_json_records
from clclm_jax.data.records import Catalogue, Interaction, Item

DOMAINS = ("movie", "book")
# TALLRec (arXiv 2305.00447), its few-shot table: test AUC x 100 of LLaMA-7B rec tuning, by training shots.
PUBLISHED_AUC = {"movie": {16: 67.24, 64: 67.48, 256: 71.98}, "book": {16: 56.36, 64: 60.39, 256: 64.38}}


# --- MovieLens-100K -> TALLRec movie -------------------------------------------------------------

def _read_text(path: pathlib.Path, encoding: str) -> str:
  if not path.exists():
    raise DataError(path, None, "file not found", "pass --raw pointing at the unpacked dataset folder")
  try:
    return path.read_bytes().decode(encoding)
  except UnicodeDecodeError as e:
    raise DataError(path, None, f"byte {e.start} is not {encoding}", f"use the original {encoding} file") from None


def read_movielens(raw_dir: str | os.PathLike) -> tuple[Catalogue, list[tuple[int, int, int, int]]]:
  """`u.item` (latin-1) as a catalogue, and `u.data` as (user, item, rating, timestamp) in file order."""
  raw_dir = pathlib.Path(raw_dir)
  items = []
  for i, line in enumerate(_read_text(raw_dir / "u.item", "latin-1").splitlines()):
    fields = line.split("|")
    if len(fields) < 3 or not fields[0].isdigit():
      raise DataError(raw_dir / "u.item", i, "is not `id|title|release date|...`", "use GroupLens' u.item")
    year = int(fields[2][-4:]) if fields[2][-4:].isdigit() else None
    items.append(Item(int(fields[0]), fields[1], year=year))
  catalogue = Catalogue(items)
  ratings = []
  for i, line in enumerate(_read_text(raw_dir / "u.data", "ascii").splitlines()):
    fields = line.split("\t")
    if len(fields) != 4 or not all(f.strip().isdigit() for f in fields):
      raise DataError(raw_dir / "u.data", i, "is not `user<TAB>item<TAB>rating<TAB>timestamp`",
                      "use GroupLens' u.data")
    user, item, rating, ts = map(int, fields)
    if item not in catalogue:
      raise DataError(raw_dir / "u.data", i, f"unknown item id {item}", "use the u.item that ships with u.data")
    ratings.append((user, item, rating, ts))
  return catalogue, ratings


def movie_interactions(ratings: Sequence[tuple[int, int, int, int]], *, window: int = 10,
                       keep: int = 10_000) -> list[Interaction]:
  """Sliding windows over each user's timeline, users in order of first appearance; the last `keep`."""
  by_user: dict[int, list[tuple[int, int, int]]] = {}
  for user, item, rating, ts in ratings:
    by_user.setdefault(user, []).append((item, rating, ts))
  samples = []
  for user, rows in by_user.items():
    rows = sorted(rows, key=lambda r: r[2])  # Stable: equal timestamps keep file order.
    likes = [r[1] > 3 for r in rows]
    for i in range(window, len(rows)):
      samples.append(Interaction(user, tuple(r[0] for r in rows[i - window:i]), tuple(likes[i - window:i]),
                                 rows[i][0], int(likes[i]), rows[i][2]))
  return samples[-keep:]


def split_80_10_10(samples: Sequence) -> tuple[list, list, list]:
  """TALLRec's ordered split: first 80% train, next 10% valid, last 10% test."""
  n = len(samples)
  return list(samples[:int(n * 0.8)]), list(samples[int(n * 0.8):int(n * 0.9)]), list(samples[int(n * 0.9):])


# --- Book-Crossing -> TALLRec book ---------------------------------------------------------------

def _read_bx_csv(path: pathlib.Path, columns: Sequence[str]) -> list[dict[str, str]]:
  rows = list(csv.reader(io.StringIO(_read_text(path, "latin-1"), newline=""), delimiter=";"))
  if not rows:
    raise DataError(path, None, "the file is empty", "use the original Book-Crossing dump")
  header = rows[0]
  missing = [c for c in columns if c not in header]
  if missing:
    raise DataError(path, None, f"header lacks columns {missing}", f"the header must name {list(columns)}")
  out = []
  for i, row in enumerate(rows[1:]):
    if len(row) != len(header):
      raise DataError(path, i, f"has {len(row)} fields, the header has {len(header)}",
                      'quote fields that contain ";" and use ";" as the separator')
    out.append(dict(zip(header, row)))
  return out


def read_bookcrossing(raw_dir: str | os.PathLike) -> tuple[Catalogue, list[tuple[int, int, int]]]:
  """`BX-Books.csv` as a catalogue (id = row + 1), and ratings of known books as (user, item, rating)."""
  raw_dir = pathlib.Path(raw_dir)
  books = _read_bx_csv(raw_dir / "BX-Books.csv", ("ISBN", "Book-Title", "Book-Author", "Year-Of-Publication"))
  isbn_to_id, items = {}, []
  for i, b in enumerate(books):
    year = b["Year-Of-Publication"]
    items.append(Item(i + 1, b["Book-Title"], b["Book-Author"], int(year) if year.isdigit() else None))
    isbn_to_id.setdefault(b["ISBN"], i + 1)
  path = raw_dir / "BX-Book-Ratings.csv"
  ratings = []
  for i, r in enumerate(_read_bx_csv(path, ("User-ID", "ISBN", "Book-Rating"))):
    if not (r["User-ID"].isdigit() and r["Book-Rating"].isdigit()):
      raise DataError(path, i, "User-ID and Book-Rating must be integers", "use the original ratings file")
    if r["ISBN"] in isbn_to_id:  # TALLRec inner-joins ratings with books.
      ratings.append((int(r["User-ID"]), isbn_to_id[r["ISBN"]], int(r["Book-Rating"])))
  return Catalogue(items), ratings


def book_interactions(ratings: Sequence[tuple[int, int, int]], *, seed: int = 42, history: int = 10,
                      min_ratings: int = 4) -> tuple[list[Interaction], list[Interaction], list[Interaction]]:
  """One interaction per user with >= `min_ratings` ratings; users split 80/10/10 after a seeded shuffle."""
  by_user: dict[int, list[tuple[int, int]]] = {}
  for user, item, rating in ratings:
    by_user.setdefault(user, []).append((item, rating))
  users = [u for u, rows in by_user.items() if len(rows) >= min_ratings]
  users = [users[i] for i in np.random.default_rng(seed).permutation(len(users))]
  samples = []
  for user in users:
    rows = by_user[user]
    rows = [rows[i] for i in np.random.default_rng([seed, user]).permutation(len(rows))]
    hist, (target, rating) = rows[:-1][:history], rows[-1]
    samples.append(Interaction(user, tuple(r[0] for r in hist), tuple(r[1] > 5 for r in hist), target, int(rating > 5)))
  return split_80_10_10(samples)


# --- TALLRec JSON -> records ---------------------------------------------------------------------

_INPUT_RE = re.compile(r"User Preference: (.*)\nUser Unpreference: (.*)\n"
                       r'Whether the user will like the target (.+?) (".*")\?')
_BOOK_ITEM_RE = re.compile(r'"(.*)" written by (.*)')


def _split_items(text: str, domain: str) -> list[tuple[str, str | None]] | None:
  """`"A", "B"` (movie, any domain but books) or `"A" written by X, "B" written by Y` (book) as (title, author)
  pairs."""
  if not text:
    return []
  out, piece = [], ""
  for part in re.split(r', (?=")', text):
    piece = f"{piece}, {part}" if piece else part
    if domain == "book" and (m := _BOOK_ITEM_RE.fullmatch(piece)):
      out.append((m[1], m[2]))
      piece = ""
    elif domain != "book" and len(piece) >= 2 and piece[0] == piece[-1] == '"':
      out.append((piece[1:-1], None))
      piece = ""
  return None if piece else out


def _parse_target(text: str, domain: str) -> tuple[str, str | None] | None:
  if len(text) < 2 or text[0] != '"' or text[-1] != '"':
    return None
  if domain != "book":
    return text[1:-1], None
  m = _BOOK_ITEM_RE.fullmatch(text[1:-1])
  return (m[1], m[2]) if m else None


class ItemIds:
  """Resolves (title, author) to ids: through a catalogue, or numbered in order of first appearance."""

  def __init__(self, catalogue: Catalogue | None = None):
    self._catalogue = catalogue
    self._new: dict[tuple[str, str | None], int] = {}

  def __call__(self, title: str, author: str | None, path, index: int) -> int:
    if self._catalogue is not None:
      item_id = self._catalogue.find(title, author)
      if item_id is None:
        raise DataError(path, index, f"unknown item {title!r} by {author!r}",
                        "pass the catalogue the file was made from, or none to number items from the text")
      return item_id
    return self._new.setdefault((title, author), len(self._new) + 1)

  def catalogue(self) -> Catalogue:
    if self._catalogue is not None:
      return self._catalogue
    return Catalogue(Item(i, title, author) for (title, author), i in self._new.items())


def parse_tallrec(records: Sequence[dict], domain: str, ids: ItemIds, path=None) -> list[Interaction]:
  """TALLRec records back to interactions; history is liked then disliked items, as the prompt lists them."""
  out = []
  for i, r in enumerate(records):
    if r["instruction"] != prompts.instruction(domain):
      m = prompts.INSTRUCTION_RE.fullmatch(r["instruction"])
      raise DataError(path, i, f"instruction is not TALLRec's {domain} instruction" +
                      (f" (it asks about the target {m[1]})" if m else ""),
                      f"set config.data.domain={m[1]!r}" if m else
                      "TALLRec's wording with your item word: " + prompts.instruction("<item word>"))
    if r["output"] not in prompts.ANSWERS:
      raise DataError(path, i, f"output {r['output']!r} is not 'Yes.' or 'No.'", "label every record Yes. or No.")
    m = _INPUT_RE.fullmatch(r["input"])
    liked = _split_items(m[1], domain) if m else None
    disliked = _split_items(m[2], domain) if m else None
    target = _parse_target(m[4], domain) if m and m[3] == domain else None
    if liked is None or disliked is None or target is None:
      raise DataError(path, i, "input is not `User Preference: ...\\nUser Unpreference: ...\\nWhether the user "
                      f"will like the target {domain} \"...\"?`", "render inputs with prompts.render_tallrec")
    history = liked + disliked
    out.append(Interaction(0, tuple(ids(t, a, path, i) for t, a in history),
                           (True,) * len(liked) + (False,) * len(disliked), ids(*target, path, i),
                           prompts.ANSWERS.index(r["output"]), source=None if path is None else (path, i)))
  return out


def read_tallrec(path: str | os.PathLike, domain: str, ids: ItemIds) -> list[Interaction]:
  """A TALLRec JSON file as interactions (user 0: the files do not name users)."""
  return parse_tallrec(read_json_records(path), domain, ids, path)


# --- Splits used for training --------------------------------------------------------------------

class TallrecSplits(NamedTuple):
  """Few-shot training pool, validation and test interactions, and the catalogue that renders them."""

  train: list[Interaction]
  valid: list[Interaction]
  test: list[Interaction]
  catalogue: Catalogue


def tallrec_splits(domain: str, root: str | os.PathLike | None = None, *, seed: int = 0,
                   book_valid_size: int = 1000) -> TallrecSplits:
  """Movie: MovieLens-100K via TALLRec's procedure (renders to train_regenerated/valid/test.json).

  Book: TALLRec's book valid.json, permuted with `seed`, gives `book_valid_size` validation records
  and the rest as the training pool; test.json is only ever the test set.
  """
  root = pathlib.Path(root) if root is not None else paths.data_root()
  if domain == "movie":
    catalogue, ratings = read_movielens(root / "ml-100k")
    splits = split_80_10_10(movie_interactions(ratings))
    return TallrecSplits(*([dataclasses.replace(x, source=(f"the built-in movie {name} split", i))
                            for i, x in enumerate(xs)] for name, xs in zip(("train", "valid", "test"), splits)),
                         catalogue)
  if domain != "book":
    raise KeyError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
  ids = ItemIds()
  valid = read_tallrec(root / "tallrec" / "book" / "valid.json", "book", ids)
  test = read_tallrec(root / "tallrec" / "book" / "test.json", "book", ids)
  if not 0 < book_valid_size < len(valid):
    raise ValueError(f"book_valid_size={book_valid_size} must be in (0, {len(valid)})")
  order = np.random.default_rng(seed).permutation(len(valid))
  return TallrecSplits([valid[i] for i in order[book_valid_size:]], [valid[i] for i in order[:book_valid_size]],
                       test, ids.catalogue())


def tallrec_files(domain: str, train: str | os.PathLike, valid: str | os.PathLike,
                  test: str | os.PathLike | None = None) -> TallrecSplits:
  """Splits from your own TALLRec-format JSON files (what TALLRec's `--train_data_path` / `--val_data_path`
  take), parsed with `domain`'s instruction (any item word: "movie", "book", "game", ...); items are numbered
  across the three files from their text. Without `test`, the test split is empty."""
  prompts.check_domain(domain)
  ids = ItemIds()
  train_xs, valid_xs = read_tallrec(train, domain, ids), read_tallrec(valid, domain, ids)
  test_xs = read_tallrec(test, domain, ids) if test else []
  for path, xs in ((train, train_xs), (valid, valid_xs)):
    if not xs:
      raise DataError(path, None, "holds no records", "give it at least one TALLRec record")
  return TallrecSplits(train_xs, valid_xs, test_xs, ids.catalogue())


# --- Writing ------------------------------------------------------------------------------------

def dumps_tallrec(records: Sequence[dict]) -> str:
  """TALLRec's file format: `json.dump(indent=4)`, ASCII escapes, no trailing newline."""
  return json.dumps(list(records), indent=4)


def write_files_atomically(files: dict[pathlib.Path, str]) -> None:
  """Write every file to a temporary sibling first, then rename them all; a failure leaves no file."""
  temps = {}
  try:
    for path, text in files.items():
      path.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
      temps[path] = tmp
      with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    for path, tmp in temps.items():
      os.replace(tmp, path)
  finally:
    for tmp in temps.values():
      if os.path.exists(tmp):
        os.remove(tmp)


def build_tallrec(dataset: str, raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 42) -> dict:
  """Raw MovieLens-100K or Book-Crossing -> `train.json`, `valid.json`, `test.json` in `out_dir`."""
  if dataset == "movie":
    catalogue, ratings = read_movielens(raw_dir)
    splits = split_80_10_10(movie_interactions(ratings))
  elif dataset == "book":
    catalogue, ratings = read_bookcrossing(raw_dir)
    splits = book_interactions(ratings, seed=seed)
  else:
    raise KeyError(f"unknown dataset {dataset!r}; choose one of {DOMAINS}")
  out_dir = pathlib.Path(out_dir)
  files = {out_dir / f"{name}.json": dumps_tallrec([prompts.tallrec_record(x, catalogue, dataset) for x in split])
           for name, split in zip(("train", "valid", "test"), splits)}
  write_files_atomically(files)
  return {name: len(split) for name, split in zip(("train", "valid", "test"), splits)}

