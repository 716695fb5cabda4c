"""Next-item data as text: time-ordered histories, leave-one-out splits and CALRec's rendering.

Datasets with item text: MovieLens-100K (`ml100k`: every rating in `u.data`, ordered by timestamp with ties
broken by item id, items `Title (Year)` with their `u.item` genres) and Amazon Beauty 5-core (`beauty`: P5's
`sequential_data.txt` with `item_titles.tsv`). The histories and item ids are those of `sequences.py`, so the
ID encoder and the LLM see the same users, items and splits. Sports and Toys have no titles: they serve
ID-only pretraining (`sequences.py`) and loading them here fails.

Leave-one-out: for a user's items `s`, test is `s[:-1] -> s[-1]`, validation `s[:-2] -> s[-2]`, and
training examples are the prefixes of `s[:-2]` only, so no validation or test target is ever a training target.

Rendering (CALRec): a header (`This is the user's purchase history:`, `watch` for movies), one item a line
(`Title: ...`, plus ` Genres: ...` for movies), `The next item is as follows:` and the target's line. The same
line alone is the item's text for an item tower and for BM25.
"""

import dataclasses
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from clclm_jax.data import paths, sequences
from clclm_jax.data.errors import DataError
from clclm_jax.data.tallrec import read_movielens

TEXT_DATASETS = {"ml100k": "ml-100k", "beauty": "amazon-beauty-5core"}
ID_ONLY_DATASETS = {"sports": "amazon-sports-5core", "toys": "amazon-toys-5core"}
HEADERS = {"movie": "This is the user's watch history:", "product": "This is the user's purchase history:"}
NEXT_ITEM = "The next item is as follows:"
PARTS = ("train", "valid", "test")
# MovieLens-100K's genres in u.item's flag order (its u.genre).
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


def untitled_text(item_id: int) -> str:
  """The stable stand-in title of an item whose source has none: its id, so no two items share a text."""
  return f"item {item_id}"


@dataclasses.dataclass(frozen=True)
class NextItemData:
  """One dataset's users and their time-ordered histories over a catalogue of items with ids 1..num_items.

  `titles[i - 1]` and `genres[i - 1]` describe item i (genres are empty for products); `untitled` lists the
  ids whose source has no title (rendered as `untitled_text(id)`), reported because they carry no signal."""

  name: str
  kind: str  # "movie" or "product": picks the history header
  users: tuple[int, ...]  # the source's user id of each history
  histories: tuple[tuple[int, ...], ...]  # oldest first
  titles: tuple[str, ...]
  genres: tuple[tuple[str, ...], ...]
  untitled: tuple[int, ...] = ()

  @property
  def num_items(self) -> int:
    return len(self.titles)

  @property
  def item_ids(self) -> np.ndarray:
    """Every catalogue id, in the order of `catalogue_texts` (row r is item r + 1)."""
    return np.arange(1, self.num_items + 1, dtype=np.int32)


class Example(NamedTuple):
  """One next-item example: a user's history before the target (oldest first) and the target."""

  user: int  # index into NextItemData.histories
  history: tuple[int, ...]
  target: int


# --- Loading -------------------------------------------------------------------------------------

def _dataset_dir(root: pathlib.Path, name: str) -> pathlib.Path:
  if name in ID_ONLY_DATASETS:
    raise DataError(root / ID_ONLY_DATASETS[name], None, f"{name} has no item titles: it serves ID-only pretraining",
                    f"load it with clclm_jax.data.sequences, or take text from one of {sorted(TEXT_DATASETS)}")
  if name not in TEXT_DATASETS:
    raise KeyError(f"unknown next-item dataset {name!r}; choose one of {sorted(TEXT_DATASETS)}")
  folder = root / TEXT_DATASETS[name]
  if not folder.is_dir():
    raise DataError(folder, None, "dataset folder not found",
                    "set CLCLM_DATA to the folder holding it, or download it with `python -m clclm_jax.data fetch`")
  return folder


def _check_catalogue(path: pathlib.Path, titles: Sequence[str]) -> None:
  if not titles:
    raise DataError(path, None, "the catalogue has no item text", "use the dataset's full item file")


def _check_history(path: pathlib.Path, record: int, history: Sequence[int], num_items: int, fix: str) -> None:
  unknown = [i for i in history if not 1 <= i <= num_items]
  if unknown:
    raise DataError(path, record, f"history holds item ids {unknown[:5]} outside the catalogue 1..{num_items}", fix)


def _movie_genres(folder: pathlib.Path, num_items: int) -> list[tuple[str, ...]]:
  """Genre names per item from `u.item`'s 19 0/1 flag columns (named as in `u.genre`, which `fetch` does not
  download, so the names are written out here)."""
  item_path = folder / "u.item"
  genres = [()] * num_items
  for line_no, line in enumerate(item_path.read_bytes().decode("latin-1").splitlines(), start=1):
    fields = line.split("|")
    flags = fields[5:]
    if len(flags) != len(ML100K_GENRES) or any(f not in ("0", "1") for f in flags):
      raise DataError(item_path, line_no, f"has {len(flags)} genre flags, not {len(ML100K_GENRES)} zeros and ones",
                      "use GroupLens' ml-100k u.item unmodified")
    genres[int(fields[0]) - 1] = tuple(name for name, flag in zip(ML100K_GENRES, flags) if flag == "1")
  return genres


def load_ml100k(root: pathlib.Path) -> NextItemData:
  """MovieLens-100K: every rating, per user by timestamp then item id (the order of `sequences.load_ml100k`)."""
  folder = _dataset_dir(root, "ml100k")
  catalogue, ratings = read_movielens(folder)  # raises DataError on unknown item ids in u.data
  ids = sorted(item.id for item in catalogue)
  _check_catalogue(folder / "u.item", ids)
  if ids != list(range(1, len(ids) + 1)):
    raise DataError(folder / "u.item", None, "item ids are not 1..N", "use GroupLens' u.item unmodified")
  titles = tuple(catalogue[i].title for i in ids)
  by_user: dict[int, list[tuple[int, int]]] = {}
  for user, item, _, ts in ratings:
    by_user.setdefault(user, []).append((ts, item))
  users = sorted(by_user)
  histories = tuple(tuple(item for _, item in sorted(by_user[u])) for u in users)
  return NextItemData("ml100k", "movie", tuple(users), histories, titles, tuple(_movie_genres(folder, len(ids))))


def _read_titles(path: pathlib.Path) -> tuple[list[str], list[int]]:
  """`item_titles.tsv` (`p5_item_id<TAB>asin<TAB>title`, a header, ids 1..N in order) -> titles, untitled ids."""
  if not path.exists():
    raise DataError(path, None, "file not found", "use amazon-beauty-5core/item_titles.tsv from the shared data")
  lines = path.read_text(encoding="utf-8").splitlines()
  titles, untitled = [], []
  for line_no, line in enumerate(lines[1:], start=2):
    fields = line.split("\t")
    if len(fields) != 3 or fields[0] != str(len(titles) + 1):
      raise DataError(path, line_no, f"expected `{len(titles) + 1}<TAB>asin<TAB>title`, got {line[:60]!r}",
                      "one row per P5 item id, in id order, after the header")
    title = fields[2].strip()
    if not title:
      untitled.append(len(titles) + 1)
      title = untitled_text(len(titles) + 1)
    titles.append(title)
  _check_catalogue(path, titles)
  return titles, untitled


def read_p5(path: pathlib.Path, num_items: int) -> tuple[list[int], list[tuple[int, ...]]]:
  """P5's `sequential_data.txt` (`sequences.read_p5`) -> user ids, histories; every item id must be in
  1..num_items, the catalogue's ids."""
  users, histories = [], []
  for line_no, user, history in sequences.read_p5(path):
    _check_history(path, line_no, history, num_items, "use the sequential_data.txt and item_titles.tsv of one dataset")
    users.append(user)
    histories.append(history)
  return users, histories


def load_beauty(root: pathlib.Path) -> NextItemData:
  """Amazon Beauty 5-core: P5 histories and ids (the ids of `sequences.load_beauty`), titles by P5 id."""
  folder = _dataset_dir(root, "beauty")
  titles, untitled = _read_titles(folder / "item_titles.tsv")
  users, histories = read_p5(folder / "sequential_data.txt", len(titles))
  if untitled:
    warnings.warn(f"{folder / 'item_titles.tsv'}: {len(untitled)} items have no title and are rendered as "
                  f"{untitled_text(untitled[0])!r} (ids {untitled})", stacklevel=2)
  return NextItemData("beauty", "product", tuple(users), tuple(histories), tuple(titles),
                      ((),) * len(titles), tuple(untitled))


def load(name: str, root: str | os.PathLike | None = None) -> NextItemData:
  """A next-item dataset with item text by name: `ml100k` or `beauty` (`sports` / `toys` are ID-only)."""
  root = pathlib.Path(root) if root is not None else paths.data_root()
  loaders = {"ml100k": load_ml100k, "beauty": load_beauty}
  if name not in loaders:
    _dataset_dir(root, name)  # raises: ID-only or unknown
  return loaders[name](root)


def from_histories(name: str, kind: str, histories: Sequence[Sequence[int]], titles: Sequence[str],
                   genres: Sequence[Sequence[str]] | None = None) -> NextItemData:
  """A dataset built in memory (tests, your own data): item i is `titles[i - 1]`; every id must be a title's."""
  if kind not in HEADERS:
    raise ValueError(f"kind must be one of {sorted(HEADERS)}, got {kind!r}")
  _check_catalogue(pathlib.Path(f"<{name} titles>"), titles)
  for i, title in enumerate(titles):
    if not title.strip():
      raise DataError(f"<{name} titles>", i, "the item text is empty",
                      f"give it a title, e.g. {untitled_text(i + 1)!r}")
  for user, history in enumerate(histories):
    _check_history(pathlib.Path(f"<{name} histories>"), user, history, len(titles), "map items to catalogue ids")
  genres = tuple(tuple(g) for g in genres) if genres is not None else ((),) * len(titles)
  return NextItemData(name, kind, tuple(range(1, len(histories) + 1)), tuple(tuple(h) for h in histories),
                      tuple(titles), genres)


# --- Splits --------------------------------------------------------------------------------------

def train_histories(data: NextItemData) -> list[tuple[int, ...]]:
  """Everything training may see per user: all but the last two items (validation and test targets)."""
  return [h[:-2] for h in data.histories]


def examples(data: NextItemData, part: str, *, max_prefixes: int | None = None, seed: int = 0) -> list[Example]:
  """Leave-one-out examples of `part`.

  'valid' / 'test': one per user with at least 2 / 1 earlier items, (the whole history before the target,
  target). 'train': every prefix of the training history `h[:-2]` with at least one item, predicting the
  next one; with `max_prefixes`, a user with more keeps that many, chosen by `default_rng([seed, user])` (so
  a user's choice does not depend on the others) and kept in time order."""
  if part not in PARTS:
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")
  out = []
  for user, h in enumerate(data.histories):
    if part == "test" and len(h) >= 2:
      out.append(Example(user, h[:-1], h[-1]))
    elif part == "valid" and len(h) >= 3:
      out.append(Example(user, h[:-2], h[-2]))
    elif part == "train":
      train = h[:-2]
      ends = np.arange(1, len(train))  # prefix train[:end] -> train[end]
      if max_prefixes is not None and len(ends) > max_prefixes:
        ends = np.sort(np.random.default_rng([seed, user]).choice(ends, max_prefixes, replace=False))
      out += [Example(user, train[:end], train[end]) for end in ends.tolist()]
  return out


# --- Text ----------------------------------------------------------------------------------------

def item_text(data: NextItemData, item_id: int) -> str:
  """An item's one-line text: `Title: ...`, plus ` Genres: a, b` when it has genres."""
  text = f"Title: {data.titles[item_id - 1]}"
  genres = data.genres[item_id - 1]
  return f"{text} Genres: {', '.join(genres)}" if genres else text


def catalogue_texts(data: NextItemData) -> list[str]:
  """Every item's text in id order (row r is item r + 1): the corpus of BM25 and of an item tower."""
  return [item_text(data, i) for i in range(1, data.num_items + 1)]


def render_prompt(data: NextItemData, history: Sequence[int], *, max_history: int | None = None) -> str:
  """The history part of CALRec's text, ending with the line that asks for the next item and a newline, so
  that `prompt + item_text(target)` is the training text and the model generates an item line after it.
  `max_history` keeps the most recent items (prompts must fit the context)."""
  if max_history is not None:
    history = history[max(0, len(history) - max_history):] if max_history > 0 else ()
  lines = [HEADERS[data.kind], *(item_text(data, i) for i in history), NEXT_ITEM]
  return "\n".join(lines) + "\n"


def render_example(data: NextItemData, example: Example, *, max_history: int | None = None) -> tuple[str, str]:
  """(prompt, target text): the loss covers the target text only."""
  return render_prompt(data, example.history, max_history=max_history), item_text(data, example.target)
