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
