"""The TALLRec splits a config reads (built in, or your own files) and which of their prompts each part of a
run uses: the few-shot training set, the seeded validation and test subsets."""

import pathlib

import numpy as np
from ml_collections import ConfigDict

from clclm_jax.data import fewshot, paths, prompts, tallrec
from clclm_jax.data.records import Interaction
from clclm_jax.train.errors import ConfigError


def uses_files(config: ConfigDict) -> bool:
  """Whether `data.files` names your own TALLRec-format JSON files in place of the built-in splits."""
  return any(config.data.files[k] for k in ("train", "valid", "test"))


def data_file(config: ConfigDict, name: str) -> pathlib.Path | None:
  """`data.files.<name>` as given (absolute, or relative to the working directory), else under CLCLM_DATA."""
  given = config.data.files[name]
  if not given:
    return None
  path = pathlib.Path(given)
  if path.is_file():
    return path
  try:
    under_data = paths.data_root() / given
  except FileNotFoundError:  # no data root: the file can only be where the user said
    under_data = path
  if not path.is_absolute() and under_data.is_file():
    return under_data
  raise ConfigError(f"config.data.files.{name}={given!r}: no such file (looked in the working directory "
                    f"and in CLCLM_DATA); give an absolute path")


def rec_splits(config: ConfigDict) -> tallrec.TallrecSplits:
  """The TALLRec splits of `data.domain`: built in (MovieLens-100K / TALLRec's book files), or `data.files`."""
  d = config.data
  if not uses_files(config):
    if d.domain not in tallrec.DOMAINS:
      raise ConfigError(f"config.data.domain={d.domain!r}: the built-in data is {' and '.join(tallrec.DOMAINS)}; "
                        "for other items give your own TALLRec-format files (config.data.files.train / valid / test)")
    return tallrec.tallrec_splits(d.domain, seed=d.split_seed, book_valid_size=d.book_valid_size)
  try:
    prompts.check_domain(d.domain)
  except ValueError as e:
    raise ConfigError(f"config.data.{e}") from None
  missing = [k for k in ("train", "valid") if not d.files[k]]
  if missing:
    raise ConfigError(f"config.data.files: set {' and '.join(missing)} too (train and valid are needed, test is "
                      "optional)")
  if not d.files.test and d.test_size != 0:
    raise ConfigError("config.data.files.test is empty: set it, or data.test_size=0 to skip the test evaluation")
  return tallrec.tallrec_files(d.domain, *(data_file(config, k) for k in ("train", "valid", "test")))


def _positions(config: ConfigDict, sp: tallrec.TallrecSplits, split: str, field: str) -> np.ndarray:
  """Positions in `split` of its seeded `fewshot` subset of `data.<field>` (all when <= 0); a size beyond the
  split fails naming the config field to change."""
  n, size = config.data[field], len(getattr(sp, split))
  if n > size:
    raise ConfigError(f"config.data.{field}={n}, but the {split} split has {size} prompts: lower it, or "
                      f"set it <= 0 for all of them")
  return fewshot.fewshot_positions(size, n if n > 0 else None, config.data.fewshot_seed)


def eval_positions(config: ConfigDict, sp: tallrec.TallrecSplits, split: str) -> np.ndarray:
  """Which records of `split` evaluation scores, in scoring order: a seeded subset of `data.valid_size` /
  `data.test_size` (the whole split when <= 0). Positions are record indices in the split's file, where it
  has one (TALLRec's test.json, `data.files`)."""
  return _positions(config, sp, split, f"{split}_size")


def eval_interactions(config: ConfigDict, sp: tallrec.TallrecSplits, split: str) -> list[Interaction]:
  """The prompts of `split` that evaluation scores (`eval_positions`)."""
  return [getattr(sp, split)[i] for i in eval_positions(config, sp, split)]


def _indexed(xs: list[Interaction]) -> list[tuple[tuple, int]]:
  """(record, index) per interaction: its history, target and label, and its index in its file
  (`Interaction.source`, else its position)."""
  return [((x.history_ids, x.history_likes, x.target_id, x.label), x.source[1] if x.source else pos)
          for pos, x in enumerate(xs)]


def _repeats(xs: list[Interaction], earlier: dict | None = None) -> list[tuple[int, int]]:
  """(index, earlier index) pairs of the records of `xs` that `earlier` (record -> index) holds, or without it
  that come earlier in `xs`."""
  seen, out = {} if earlier is None else earlier, []
  for key, index in _indexed(xs):
    if key in seen:
      out.append((index, seen[key]))
    elif earlier is None:
      seen[key] = index
  return out


def check_splits(config: ConfigDict, sp: tallrec.TallrecSplits, log=print) -> None:
  """Before training: AUC needs both labels among the prompts each split scores; repeated records in a split
  (each weighs twice) are counted with their first indices, and so are valid or test records that are also
  training records: those in test would make the test AUC score prompts the model trained on, and stop the run
  unless `data.allow_test_in_train`."""
  def name(split):
    if uses_files(config):
      return f"config.data.files.{split}={config.data.files[split]!r}"
    file = next((x.source[0] for x in getattr(sp, split)[:1] if x.source), None)
    return f"the built-in {config.data.domain} {split} split" + (f" (records of {file})" if file is not None and
                                                                   not isinstance(file, str) else "")
  show = lambda pairs: ", ".join(f"{a} = {b}" for a, b in pairs[:3]) + (", ..." if len(pairs) > 3 else "")  # noqa: E731
  scored = [s for s in ("valid", "test") if not (s == "test" and (config.data.test_size == 0 or not sp.test))]
  for split in scored:
    labels = {x.label for x in eval_interactions(config, sp, split)}
    if len(labels) < 2:
      raise ConfigError(f"{name(split)}: the prompts {split} scores all have the label "
                        f"{prompts.ANSWERS[labels.pop()]!r}, and AUC needs both; give {split} prompts of both "
                        f"labels, or a larger data.{split}_size")
  for split in ["train"] + scored:
    if pairs := _repeats(getattr(sp, split)):
      fix = "remove the repeats" if uses_files(config) else "TALLRec's file as published; kept for comparability"
      log(f"warning: {name(split)} repeats {len(pairs)} records (record = earlier record: {show(pairs)}): each "
          f"weighs twice ({fix})")
  train = dict(reversed(_indexed(sp.train)))  # record -> its first index
  for split in scored:
    if pairs := _repeats(getattr(sp, split), train):
      said = (f"{name(split)} holds {len(pairs)} training records ({split} record = train record: {show(pairs)}): "
              f"the {split} AUC scores prompts the model trained on")
      if split == "test" and not config.data.allow_test_in_train:
        raise ConfigError(f"{said}; remove them, or set data.allow_test_in_train=True")
      log(f"warning: {said}")


def train_interactions(config: ConfigDict, sp: tallrec.TallrecSplits) -> list[Interaction]:
  """The few-shot training set: `data.shots` prompts of the training pool (all when <= 0)."""
  return [sp.train[i] for i in _positions(config, sp, "train", "shots")]
