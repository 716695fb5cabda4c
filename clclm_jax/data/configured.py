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


def check_eval_labels(config: ConfigDict, sp: tallrec.TallrecSplits) -> None:
  """AUC needs both labels among the prompts each split scores: checked before training, not after it."""
  for split in ("valid", "test"):
    if split == "test" and (config.data.test_size == 0 or not getattr(sp, split)):
      continue
    labels = {x.label for x in eval_interactions(config, sp, split)}
    if len(labels) < 2:
      source = (f"config.data.files.{split}={config.data.files[split]!r}" if uses_files(config)
                else f"the built-in {config.data.domain} {split} split")
      raise ConfigError(f"{source}: the prompts {split} scores all have the label {prompts.ANSWERS[labels.pop()]!r}, "
                        f"and AUC needs both; give {split} prompts of both labels, or a larger data.{split}_size")


def train_interactions(config: ConfigDict, sp: tallrec.TallrecSplits) -> list[Interaction]:
  """The few-shot training set: `data.shots` prompts of the training pool (all when <= 0)."""
  return [sp.train[i] for i in _positions(config, sp, "train", "shots")]
