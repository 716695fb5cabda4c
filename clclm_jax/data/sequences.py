"""Per-user item-id sequences (Amazon Beauty 5-core, MovieLens-100K) with the leave-one-out split.

Ids run 1..N; 0 is padding and N + 1 the mask id. For a user's items `s`, the test example is
`s[:-1] -> s[-1]`, the validation example `s[:-2] -> s[-2]` and training sees only `s[:-2]`
(next-item pairs `s[:-3] -> s[1:-2]`), so valid/test targets never reach training.
"""

import dataclasses
import os
import pathlib

import numpy as np

from clclm_jax.data import paths
from clclm_jax.data.errors import DataError

PAD = 0
MIN_LENGTH = 4  # one training pair plus the valid and test targets


@dataclasses.dataclass(frozen=True)
class SequenceData:
  """Chronological item sequences (ids 1..num_items), one per user."""

  name: str
  sequences: tuple[np.ndarray, ...]
  num_items: int

  @property
  def mask_id(self) -> int:
    return self.num_items + 1

  @property
  def vocab_size(self) -> int:
    """Embedding rows: padding, the items, the mask id."""
    return self.num_items + 2


def _reindex(name: str, raw: list[list[int]]) -> SequenceData:
  """Maps raw item ids to 1..N in ascending raw order; keeps users with >= MIN_LENGTH items."""
  raw = [np.asarray(s, np.int64) for s in raw if len(s) >= MIN_LENGTH]
  vocab = np.unique(np.concatenate(raw))
  seqs = tuple((np.searchsorted(vocab, s) + 1).astype(np.int32) for s in raw)
  return SequenceData(name, seqs, len(vocab))


def read_p5(path: pathlib.Path) -> list[tuple[int, int, tuple[int, ...]]]:
  """P5's `sequential_data.txt` (`user item item ...` a line, oldest first, CRLF) -> (line number, user id,
  item ids) per line."""
  if not path.exists():
    raise DataError(path, None, "file not found", "use the dataset's sequential_data.txt from the shared data")
  rows = []
  with open(path, encoding="ascii", newline="") as f:
    for line_no, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) < 2 or not all(x.isdigit() for x in fields):
        raise DataError(path, line_no, f"expected 'user item item ...' of integers, got {line[:60]!r}",
                        "use P5's sequential_data.txt: space-separated integer ids, one user a line")
      rows.append((line_no, int(fields[0]), tuple(int(x) for x in fields[1:])))
  if not rows:
    raise DataError(path, None, "no sequences", "point at a non-empty sequential_data.txt")
  return rows


def load_beauty(path: str | os.PathLike | None = None) -> SequenceData:
  """Amazon Beauty 5-core from P5's `sequential_data.txt` (`read_p5`)."""
  path = pathlib.Path(path) if path else paths.data_path("amazon-beauty-5core", "sequential_data.txt")
  return _reindex("beauty", [list(items) for _, _, items in read_p5(path)])


def load_ml100k(path: str | os.PathLike | None = None) -> SequenceData:
  """MovieLens-100K `u.data` (user, item, rating, timestamp); each user's items by timestamp."""
  path = pathlib.Path(path) if path else paths.data_path("ml-100k", "u.data")
  rows = []
  with open(path, encoding="ascii") as f:
    for line_no, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 4 or not all(x.isdigit() for x in fields):
        raise DataError(path, line_no, f"expected 'user<TAB>item<TAB>rating<TAB>timestamp', got {line[:60]!r}",
                        "use GroupLens ml-100k/u.data unmodified")
      rows.append([int(x) for x in fields])
  if not rows:
    raise DataError(path, None, "no ratings", "point at a non-empty u.data")
  user, item, _, time = np.asarray(rows, np.int64).T
  order = np.lexsort((item, time, user))  # by user, then timestamp; ties broken by item id
  user, item = user[order], item[order]
  starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
  return _reindex("ml100k", [s.tolist() for s in np.split(item, starts[1:])])


def load(dataset: str) -> SequenceData:
  """The built-in sequence data named by a pretraining config's `dataset`."""
  loaders = {"beauty": load_beauty, "ml100k": load_ml100k}
  if dataset not in loaders:
    raise ValueError(f"config.dataset={dataset!r}: the built-in sequence data is {' or '.join(loaders)}")
  return loaders[dataset]()


def split(data: SequenceData, part: str) -> tuple[list[np.ndarray], list[np.ndarray] | np.ndarray]:
  """Leave-one-out inputs and targets: 'train' (a target per position), 'valid' or 'test' (one each)."""
  if part == "train":
    return [s[:-3] for s in data.sequences], [s[1:-2] for s in data.sequences]
  if part == "valid":
    return [s[:-2] for s in data.sequences], np.asarray([s[-2] for s in data.sequences], np.int32)
  if part == "test":
    return [s[:-1] for s in data.sequences], np.asarray([s[-1] for s in data.sequences], np.int32)
  raise ValueError(f"part must be 'train', 'valid' or 'test', got {part!r}")


def train_sequences(data: SequenceData) -> list[np.ndarray]:
  """Everything training may see per user: all but the last two items."""
  return [s[:-2] for s in data.sequences]


def pad(seqs: list[np.ndarray], max_len: int = 50, *, side: str = "right") -> tuple[np.ndarray, np.ndarray]:
  """Keeps each sequence's last `max_len` items and pads with 0 -> (ids [B, max_len], lengths [B])."""
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  ids_bl = np.zeros((len(seqs), max_len), np.int32)
  lengths_b = np.zeros(len(seqs), np.int32)
  for row, s in enumerate(seqs):
    n = min(len(s), max_len)
    lengths_b[row] = n
    if n:
      ids_bl[row, :n] = s[len(s) - n:]
      if side == "left":
        ids_bl[row] = np.roll(ids_bl[row], max_len - n)
  return ids_bl, lengths_b


def bucket_width(length: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket that holds `length` (the last bucket caps it)."""
  return next((b for b in buckets if length <= b), buckets[-1])


@dataclasses.dataclass(frozen=True)
class SameTargetIndex:
  """Every training prefix `train_sequences[user][:pos]` (pos >= 1), grouped by its next item."""

  user: np.ndarray  # [P] prefix owner, sorted by next item
  pos: np.ndarray  # [P] prefix length
  start: np.ndarray  # [vocab + 1] prefixes with next item i are rows start[i]:start[i + 1]
  anchor: np.ndarray  # [users] row of each user's own last training prefix


def same_target_index(data: SequenceData) -> SameTargetIndex:
  """Index for DuoRec's supervised positives: other prefixes that precede the same next item."""
  seqs = train_sequences(data)
  user = np.concatenate([np.full(len(s) - 1, u, np.int32) for u, s in enumerate(seqs)])
  pos = np.concatenate([np.arange(1, len(s), dtype=np.int32) for s in seqs])
  nxt = np.concatenate([s[1:] for s in seqs])
  order = np.argsort(nxt, kind="stable")
  start = np.searchsorted(nxt[order], np.arange(data.vocab_size + 1)).astype(np.int64)
  ends = np.cumsum([len(s) - 1 for s in seqs]) - 1  # each user's last prefix, before sorting
  anchor = np.empty(len(order), np.int64)
  anchor[order] = np.arange(len(order))
  return SameTargetIndex(user[order], pos[order], start, anchor[ends])


def same_target_views(index: SameTargetIndex, data: SequenceData, users: np.ndarray,
                      rng: np.random.Generator) -> list[np.ndarray]:
  """For each user, a random other training prefix with the same next item (its own input if none)."""
  seqs = data.sequences  # training prefixes end at least three items before a sequence's end
  views = []
  for u in users:
    target = seqs[u][-3]
    lo, n = index.start[target], index.start[target + 1] - index.start[target]
    if n <= 1:
      views.append(seqs[u][:-3])
      continue
    pick = lo + rng.integers(n - 1)
    pick += pick >= index.anchor[u]  # skip the anchor itself
    views.append(seqs[index.user[pick]][:index.pos[pick]])
  return views


def train_batches(data: SequenceData, batch_size: int, rng: np.random.Generator, *,
                  buckets: tuple[int, ...] = (4, 8, 16, 50), group: int = 32,
                  same_target: SameTargetIndex | None = None):
  """One epoch of right-padded next-item batches {items, targets, lengths}, remainder dropped.

  Users are shuffled, sorted by length within chunks of `group` batches and padded to the
  smallest bucket width, so short sequences do not pay for max_len (positions are counted from
  the last item, so the width does not change the model's output). With `same_target`, the batch
  also holds `same_target` [B, width]: another prefix ending before the same next item as each
  user's input; the width holds the longest input or view (up to the last bucket).
  """
  inputs, targets = split(data, "train")
  order = rng.permutation(len(inputs))
  chunk = batch_size * group
  batches = []
  for start in range(0, len(order), chunk):
    part = order[start:start + chunk]
    part = part[np.argsort([len(inputs[u]) for u in part], kind="stable")]
    batches += [part[i:i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
  for b in rng.permutation(len(batches)):
    users = batches[b]
    views = same_target_views(same_target, data, users, rng) if same_target is not None else []
    width = bucket_width(max(len(s) for s in [inputs[u] for u in users] + views), buckets)
    items, lengths = pad([inputs[u] for u in users], width)
    tgt, _ = pad([targets[u] for u in users], width)
    batch = {"items": items, "targets": tgt, "lengths": lengths}
    if same_target is not None:
      batch["same_target"] = pad(views, width)[0]
    yield batch


class EpochBatches:
  """Endless epochs of batches, `make_epoch(epoch)` each (seeded by the epoch, e.g. `train_batches` with
  `np.random.default_rng([seed, epoch])`); checkpointable like a grain iterator: the state is (epoch, batch)."""

  def __init__(self, make_epoch):
    self.make_epoch, self.epoch, self.index = make_epoch, 0, 0
    self.batches = make_epoch(0)
    if not self.batches:
      raise ValueError("an epoch holds no batch: fewer training sequences than batch_size")

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index == len(self.batches):
      self.set_state({"epoch": self.epoch + 1, "index": 0})
    self.index += 1
    return self.batches[self.index - 1]

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state: dict[str, int]) -> None:
    if state["epoch"] != self.epoch:
      self.batches = self.make_epoch(state["epoch"])
    self.epoch, self.index = state["epoch"], state["index"]


def eval_batches(data: SequenceData, part: str, batch_size: int, *, buckets: tuple[int, ...] = (4, 8, 16, 50)):
  """Right-padded {items, lengths, target} batches for 'valid' or 'test', users sorted by length."""
  inputs, targets = split(data, part)
  order = np.argsort([len(s) for s in inputs], kind="stable")
  for i in range(0, len(order), batch_size):
    users = order[i:i + batch_size]
    width = bucket_width(max(len(inputs[u]) for u in users), buckets)
    items, lengths = pad([inputs[u] for u in users], width)
    yield {"items": items, "lengths": lengths, "target": targets[users]}
