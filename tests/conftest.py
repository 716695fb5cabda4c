"""Shared fixtures: the real data root (required in CI, skipped elsewhere when absent)."""

import os

import pytest

from clclm_jax.data import paths


@pytest.fixture(scope="session")
def data_root():
  try:
    return paths.data_root()
  except FileNotFoundError as e:
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI needs the shared data: {e}")
    pytest.skip(f"shared data not found: {e}")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
  """train.py's XLA cache ($CLCLM_CACHE/xla) for the tests too: most of the suite's time is XLA compiling the same
  tiny programs, so both workers and the subprocesses (train.py, eval.py, tests/train_worker.py) share one cache and
  a rerun loads what an earlier run compiled. Its key holds the program, the XLA flags and the devices: a hit is the
  executable XLA would compile again. Programs compiled in under 1 s stay out."""
  from clclm_jax.train import cli  # pylint: disable=g-import-not-at-top
  cli.enable_compilation_cache(1.0)
  yield


def pytest_addoption(parser):
  parser.addoption("--extended", action="store_true",
                   help="also run the tests marked `extended` (more mesh shapes and process counts; `make test-all`)")


# `make test` runs the files on two workers, a whole file per worker (`--dist loadfile`, so module fixtures are
# built once); the longest files go first so that neither worker is left with one at the end.
LONGEST_FIRST = ("test_sharding.py", "test_train_loop.py", "test_cli.py", "test_fusion.py", "test_contrastive.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a file is kept
  if config.getoption("--extended") or os.environ.get("CLCLM_EXTENDED_TESTS") == "1":
    return
  skip = pytest.mark.skip(reason="extended: run with `make test-all` (pytest --extended)")
  for item in items:
    if "extended" in item.keywords:
      item.add_marker(skip)
