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
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session: tests that train the same tiny model several times (resume,
  kill and rerun) compile each program once."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  yield
