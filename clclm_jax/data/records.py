"""Items, catalogues and user interactions: the one source that prompts and id sequences render from."""

import dataclasses
from collections.abc import Iterable

PAD_ID = 0  # Item and user id 0 is padding; real ids start at 1.


@dataclasses.dataclass(frozen=True)
class Item:
  """One catalogue item; books carry an author, movies put the year in the title."""

  id: int
  title: str
  author: str | None = None
  year: int | None = None


@dataclasses.dataclass(frozen=True)
class Interaction:
  """A user's history (oldest first), and whether they liked the target (1 Yes / 0 No)."""

  user: int
  history_ids: tuple[int, ...]
  history_likes: tuple[bool, ...]
  target_id: int
  label: int
  timestamp: int | None = None
  # (file, record index) the interaction was read from, for errors; not part of its value
  source: tuple | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    if len(self.history_ids) != len(self.history_likes):
      raise ValueError(f"history_ids ({len(self.history_ids)}) and history_likes "
                       f"({len(self.history_likes)}) differ in length")

  def drop_oldest(self, n: int) -> "Interaction":
    """The same interaction with the `n` oldest history items removed."""
    return dataclasses.replace(self, history_ids=self.history_ids[n:], history_likes=self.history_likes[n:])


class Catalogue:
  """Items by id, and ids by (title, author); the first item wins when two share a key."""

  def __init__(self, items: Iterable[Item]):
    self._by_id: dict[int, Item] = {}
    self._by_key: dict[tuple[str, str | None], int] = {}
    for item in items:
      if item.id == PAD_ID or item.id in self._by_id:
        raise ValueError(f"item id {item.id} is padding or repeated; ids must be unique and >= 1")
      self._by_id[item.id] = item
      self._by_key.setdefault((item.title, item.author), item.id)

  def __getitem__(self, item_id: int) -> Item:
    return self._by_id[item_id]

  def __contains__(self, item_id: int) -> bool:
    return item_id in self._by_id

  def __len__(self) -> int:
    return len(self._by_id)

  def __iter__(self):
    return iter(self._by_id.values())

  @property
  def max_id(self) -> int:
    return max(self._by_id, default=PAD_ID)

  def find(self, title: str, author: str | None = None) -> int | None:
    """The id of the item with this title (and author), or None."""
    return self._by_key.get((title, author))
